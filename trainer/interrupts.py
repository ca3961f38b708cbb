"""SIGTERM and SIGINT end every entry point within seconds, whatever it is doing.

Python runs a signal handler only in the main thread, between bytecodes: a
main thread waiting inside TensorFlow or Horovod (an allreduce whose peer is
gone, a rendezvous) would not see the signal until that call returns, maybe
never. And TensorFlow's multi-worker runtime installs a SIGTERM handler of
its own, which swallows the signal. So, after `install()`:

- the handler raises `Interrupted` in the main thread: the current step is
  abandoned, `finally`/`except BaseException` blocks remove temporaries, the
  last checkpoint stays. `deferred()` holds the exception back while a
  checkpoint is being written, so it is written whole or not at all;
- the C-level part of Python's handler also writes the signal number to a
  wakeup fd, which a watchdog thread reads: if the process has not ended
  `GRACE` seconds later (main thread stuck in native code), it runs the
  registered cleanups and hard-exits with the same code, 128 + signal;
  a second signal more than a second after the first ends it at once;
- `reinstall()` takes the signals back after TensorFlow set its own handler.

Children are started in their own process group (`start_child`) and get the
signal forwarded once (`stop_child`), then SIGKILL if they outlive the grace.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE = 7.0  # seconds between the signal and a hard exit; launchers add their children's on top within 10 s
CHILD_GRACE = 6.0  # what a launcher gives its children after forwarding the signal

_state = {"installed": False, "deferred": 0, "pending": None, "announce": True}
_cleanups: list = []


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived. A KeyboardInterrupt, so that code which
    already stops cleanly on Ctrl-C does the same for SIGTERM, and no
    `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.code = 128 + signum  # what a shell reports for a process ended by that signal


def exit_code(e: BaseException) -> int:
    return e.code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def install(grace: float = GRACE) -> None:
    """Call once from a `__main__`, in the main thread."""
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for s in SIGNALS:
        signal.signal(s, _handler)
    threading.Thread(target=_watch, args=(r, grace), daemon=True, name="dpt-interrupts").start()
    _state["installed"] = True


def reinstall() -> None:
    """Take SIGTERM and SIGINT back (TensorFlow's coordination service sets
    its own SIGTERM handler when a multi-worker strategy starts)."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


def set_announce(on: bool) -> None:
    """Whether a hard exit prints its line (only rank 0 speaks)."""
    _state["announce"] = on


def on_hard_exit(cleanup) -> None:
    """Run `cleanup()` before a hard exit (temporaries a `finally` would have removed)."""
    _cleanups.append(cleanup)


@contextlib.contextmanager
def deferred():
    """Hold an interrupt back until the block is done (a checkpoint being written)."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
    if not _state["deferred"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        raise Interrupted(signum)


def _handler(signum, frame):
    if _state["deferred"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def _watch(r: int, grace: float) -> None:
    first = deadline = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            _hard_exit(first, f"did not stop within {grace:g} s of {signal.Signals(first).name}")
        for signum in os.read(r, 64):
            if signum not in SIGNALS:
                continue
            now = time.monotonic()
            if first is None:
                first, deadline, at = signum, now + grace, now
            elif now - at > 1.0:  # a repeat at once (several senders) is the same request
                _hard_exit(signum, f"a second {signal.Signals(signum).name}")


def _hard_exit(signum: int, why: str) -> None:
    for cleanup in reversed(_cleanups):
        try:
            cleanup()
        except BaseException:
            pass
    if _state["announce"]:
        _write(f"error: stopped by {signal.Signals(signum).name}: {why}, so ended without cleaning up; "
               "the last checkpoint is kept\n")
    os._exit(128 + signum)


def _write(text: str) -> None:
    try:
        sys.stderr.flush()
    except BaseException:
        pass
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def start_child(cmd, **kw) -> subprocess.Popen:
    """A child in its own process group, so that a signal reaches it (and
    whatever it starts) once, forwarded by us, not also from the terminal."""
    return subprocess.Popen(cmd, start_new_session=True, **kw)


def stop_child(proc: subprocess.Popen, signum: int = signal.SIGTERM, grace: float = CHILD_GRACE) -> None:
    """Forward `signum` to the child's process group; SIGKILL it if it outlives `grace`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except KeyboardInterrupt:  # a second signal while waiting: stop waiting
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise


def run_child(cmd, **kw) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) whose child, and the
    child's own children, get our SIGTERM/SIGINT and end with us."""
    proc = start_child(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate()
    except KeyboardInterrupt as e:
        stop_child(proc, getattr(e, "signum", signal.SIGINT))
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def call(cmd, **kw) -> int:
    """subprocess.call whose child gets our SIGTERM/SIGINT forwarded (see run_child)."""
    proc = start_child(cmd, **kw)
    try:
        return proc.wait()
    except KeyboardInterrupt as e:
        stop_child(proc, getattr(e, "signum", signal.SIGINT))
        raise
