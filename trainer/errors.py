"""The one exception type that means "the user can fix this"."""
import argparse
import sys


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
    """argparse that reports a bad flag like any other bad input: one line, exit 2."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def run_cli(body) -> int:
    """A CLI's exit code: `body()`'s, or 2 with one `error:` line for a
    UsageError, 130 for Ctrl-C."""
    try:
        return body()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
