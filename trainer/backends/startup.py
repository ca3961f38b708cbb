"""Start-up waits for peers end: at most --startup-timeout seconds, saying who is missing.

MultiWorkerMirroredStrategy's constructor waits for every worker of TF_CONFIG
inside TensorFlow, holding the GIL: no Python thread, no signal handler runs
until the last worker arrives, and a worker that never starts keeps the
others silent and unkillable (TensorFlow also takes over SIGTERM there). So
the workers meet first here, in Python: each listens on its own TF_CONFIG
port and connects to the others' until all answered (a peer counts whether
our listener or, a moment later, TensorFlow's server answers), then closes
its listener and lets TensorFlow bind the port. Only then is the strategy
made, with everyone known to be up.

Horovod's hvd.init waits inside a ctypes call, which releases the GIL, so a
timer thread can watch it: `Deadline` prints who it waits for after a few
seconds and ends the process (exit 1) at the timeout.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

from ..errors import UsageError

SAY_AFTER = 5.0  # seconds before "waiting for ..." is printed: a healthy start is quicker


class StartupTimeout(RuntimeError):
    """A peer did not start within --startup-timeout (exit 1, one line)."""


def check_timeout(seconds: float) -> float:
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"--startup-timeout must be a number of seconds > 0, got {seconds:g}")
    return seconds


def _address(worker: str) -> tuple[str, int]:
    host, _, port = worker.rpartition(":")
    return host.strip("[]"), int(port)


def _answers(worker: str) -> bool:
    try:
        with socket.create_connection(_address(worker), timeout=1.0):
            return True
    except OSError:
        return False


def _listen(worker: str):
    """A listener on this worker's port, so that peers see it before
    TensorFlow's server exists; None if the port is taken (TensorFlow will say)."""
    _, port = _address(worker)
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind((host, port))
            s.listen(64)  # never accept(): the kernel completes the handshake, close() resets it
            return s
        except OSError:
            s.close()
    return None


def wait_for_workers(workers: list[str], index: int, timeout: float, say=None, rank_name: str = "worker") -> None:
    """Return once every other worker of `workers` answers on its port;
    raise StartupTimeout naming the missing ones after `timeout` seconds."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    listener = _listen(workers[index])
    try:
        missing = [i for i in range(len(workers)) if i != index]
        start, told = time.monotonic(), False
        while True:
            missing = [i for i in missing if not _answers(workers[i])]
            if not missing:
                return
            waited = time.monotonic() - start
            names = ", ".join(f"{rank_name} {i} ({workers[i]})" for i in missing)
            if waited >= timeout:
                raise StartupTimeout(f"{names} did not start within --startup-timeout {timeout:g} s; "
                                     f"start {'it' if len(missing) == 1 else 'them'} (same TF_CONFIG cluster, "
                                     f"own task index) or check the address, then run again")
            if not told and waited >= min(SAY_AFTER, timeout / 2):
                say(f"{rank_name} {index}: waiting for {names} to start (up to --startup-timeout {timeout:g} s)")
                told = True
            time.sleep(min(0.5, max(0.05, timeout - waited)))
    finally:
        if listener is not None:
            listener.close()


class Deadline:
    """A watch on a blocking call that releases the GIL (hvd.init): after a
    few seconds one line saying what it waits for, at `timeout` one error
    line and exit 1. `with Deadline(...):` around the call."""

    def __init__(self, timeout: float, waiting: str, failed: str, speak: bool = True):
        self.timeout, self.waiting, self.failed, self.speak = timeout, waiting, failed, speak
        self.done = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="dpt-startup").start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def _watch(self):
        if self.timeout > SAY_AFTER and not self.done.wait(SAY_AFTER):
            if self.speak:
                _say(self.waiting)
        if not self.done.wait(max(0.0, self.timeout - (SAY_AFTER if self.timeout > SAY_AFTER else 0))):
            _say(f"error: {self.failed}")
            os._exit(1)


def _say(text: str) -> None:
    sys.stderr.flush()
    os.write(2, (text + "\n").encode())
