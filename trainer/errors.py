"""The one exception type that means "the user can fix this"."""
import argparse
import sys


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type if it has none):
    libraries explain a damaged file over many lines."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def one_line(e: BaseException, limit: int | None = 200, typed: bool = True) -> str:
    """The whole message on one line, `Type: message` when `typed`, cut to
    `limit`: Keras quotes whole model configs over many lines."""
    text = " ".join(str(e).split())
    if typed:
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    text = text or type(e).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


class UsageError(Exception):
    """Bad input: the CLI prints this as one line and exits with code 2.

    The message names the problem and what to do about it; no traceback.
    """


class ReplicaMismatch(RuntimeError):
    """Replicas that must hold identical values do not: the run stops, exit 1,
    with one line naming the first differing weight and the replicas, before
    a checkpoint or an export records the chief's copy as the truth."""


class MaskMismatch(ReplicaMismatch):
    """Pruning or freezing masks differ across replicas, or a masked-out weight
    is nonzero (--verify-masks)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag like any other bad input: one line, exit 2.

    Every command and sub-command gets --verbose. trainer/quiet.py reads it
    from sys.argv before TensorFlow is imported; here it is only accepted and
    documented. Its default is suppressed so that a sub-parser does not reset
    a --verbose given before the sub-command."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="show TensorFlow's and oneDNN's native log lines and pass --verbose on to the "
                               "processes started (default: hidden; TF_CPP_MIN_LOG_LEVEL set in the "
                               "environment also shows them, at that level)")

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def run_cli(body, prog: str = "dptoolkit") -> int:
    """A CLI's exit code: `body()`'s, or 2 with one `error:` line for a
    UsageError, 128 + the signal for SIGINT/SIGTERM (trainer/interrupts.py),
    1 with one line naming the traceback's file for anything unexpected."""
    from . import failures, interrupts
    try:
        return body()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Temporaries are removed on the way out (their writers clean up on
        # BaseException); an output is renamed into place whole or not at all.
        print(f"stopped by {e.args[0] if isinstance(e, interrupts.Interrupted) else 'SIGINT'}", file=sys.stderr,
              flush=True)
        return interrupts.exit_code(e)
    except Exception as e:
        print(failures.report(e, prog), file=sys.stderr, flush=True)
        return 1
