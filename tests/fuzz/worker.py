"""The worker (`python -m fuzz.worker`, with tests/ on sys.path) imports
TensorFlow once and runs `merge.cli.main(argv)` / `trainer.cli.main(argv)` in
its own process, so a segfault, abort or C-level hang in a reader costs one
case, not the session. Requests come on stdin, one JSON object a line; answers
go to stdout after PROTO. It finds the repository from its own path (REPO)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .seeds import build_seeds
from .settings import PROTO, REPO


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a command that ran past its time (BaseException:
    an `except Exception` in the code under test does not swallow it)."""


def _status(field: str) -> int:
    """kB of a /proc/self/status field."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _frames(tb) -> list[list]:
    import traceback
    return [[f.filename, f.lineno, f.name] for f in traceback.extract_tb(tb)]


def run_command(tool: str, argv: list[str], timeout: float) -> dict:
    """One CLI call in this process: exit code, captured fd 1/2 (Python and
    native writes), the exception that escaped main() if any, peak memory."""
    import signal
    import tempfile
    import time
    mod = sys.modules["merge.cli" if tool == "merge" else "trainer.cli"]
    res = {"tool": tool, "argv": argv, "rc": None, "exc": None, "timeout": False}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)

        def alarm(signum, frame):
            raise CaseTimeout(f"still running after {timeout:.0f}s")

        old = signal.signal(signal.SIGALRM, alarm)
        rss0 = _status("VmRSS")
        peak_ok = _reset_peak()
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            try:
                res["rc"] = mod.main(list(argv))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SystemExit as e:
            res["rc"] = e.code if isinstance(e.code, int) or e.code is None else 1
            if e.code is None:
                res["rc"] = 0
        except CaseTimeout as e:
            res["timeout"] = True
            res["exc"] = {"type": "CaseTimeout", "msg": str(e), "frames": _frames(e.__traceback__)}
        except BaseException as e:  # noqa: BLE001  anything escaping main() is the finding
            res["exc"] = {"type": type(e).__name__, "msg": str(e)[:2000], "frames": _frames(e.__traceback__)}
        finally:
            signal.signal(signal.SIGALRM, old)
            res["seconds"] = round(time.monotonic() - t0, 3)
            res["peak_mb"] = round((_status("VmHWM") - rss0) / 1024, 1) if peak_ok else None
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        res["stdout"] = out.read()[-4000:].decode("utf-8", "replace")
        res["stderr"] = err.read()[-8000:].decode("utf-8", "replace")
    return res


def run_case(spec: dict, timeout: float, trainer_timeout: float) -> list[dict]:
    case_dir = spec["dir"]
    sentinel = Path(spec["sentinel"])
    results = []
    cwd = os.getcwd()
    os.chdir(case_dir)
    if spec.get("syspath"):
        sys.path.insert(0, case_dir)
    try:
        for cmd in spec["cmds"]:
            r = run_command(cmd["tool"], cmd["argv"], trainer_timeout if cmd["tool"] == "trainer" else timeout)
            r["allowed"] = cmd["allowed"]
            r["sentinel"] = sentinel.exists()
            results.append(r)
            if r["sentinel"]:
                break
    finally:
        os.chdir(cwd)
        if spec.get("syspath"):
            sys.path.remove(case_dir)
        for name in [m for m in sys.modules if m.startswith("fuzzevil")]:
            del sys.modules[name]
    return results


def _limit_resources(headroom_mb: int) -> dict:
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
    vm = _status("VmSize") * 1024
    limit = vm + headroom_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return {"vm_mb": vm >> 20, "limit_mb": limit >> 20}


def worker() -> None:
    """Requests on stdin, one JSON object a line; answers on stdout after PROTO."""
    import faulthandler
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray writes outside a command go to the log, not the protocol pipe
    # Its own descriptor of the log: a command's fd 2 is captured, and a crash
    # inside one must still reach the log the parent reads.
    crash_log = os.fdopen(os.dup(2), "w")
    faulthandler.enable(file=crash_log, all_threads=False)
    sys.path.insert(0, str(REPO))
    from trainer.quiet import install
    install()
    import merge.cli  # noqa: F401
    import trainer.cli  # noqa: F401
    import tensorflow  # noqa: F401
    import keras  # noqa: F401
    import h5py  # noqa: F401
    import merge.layers  # noqa: F401
    import trainer.models  # noqa: F401

    def send(obj):
        proto.write(PROTO + json.dumps(obj) + "\n")
        proto.flush()

    def call(tool, argv):
        r = run_command(tool, argv, 300)
        if r["exc"] or r["rc"] != 0:
            sys.stderr.write(json.dumps(r)[:3000] + "\n")
        return r["rc"]

    send({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "seeds":
            seeds = build_seeds(Path(req["root"]), call)
            send({"seeds": seeds})
        elif op == "warm":
            for argv in req["argvs"]:
                call("merge", argv)
            send({"warm": True, **_limit_resources(req["headroom_mb"])})
        elif op == "case":
            sys.stderr.write(f"--- case {req['spec']['id']}\n")
            sys.stderr.flush()
            res = run_case(req["spec"], req["timeout"], req["trainer_timeout"])
            send({"results": res, "vm_mb": _status("VmSize") >> 10})
        elif op == "exit":
            break




if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("usage: python -m fuzz.worker   (run from a path where tests/ is on sys.path)")
    worker()
