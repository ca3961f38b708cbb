"""Fuzz the readers: every mutated input (tests/fuzz/) must make every
CLI exit 0 or 2 (`merge diff`: 0, 1 or 2), never print a traceback, never hang,
never allocate GBs, and never run code the input names. On exit 2, stderr must
be one `error:` line (`warning:` lines before it are allowed).

Cases run in-process in one worker process (TensorFlow imported once), which
this test restarts after a crash or a hang, so a segfault or an endless C loop
costs one case, not the session. Each command has a soft time limit (SIGALRM,
which records where it was stuck) and a hard one (the worker is killed); the
worker runs with RLIMIT_AS / RLIMIT_FSIZE and its peak RSS is measured per
command.

Every failure goes to /tmp/fuzz-failures.txt, grouped by signature, with one
case id to reproduce each:
    FUZZ_CASE=keras_zip:17 ./run test tests/test_fuzz.py -q -s
reruns one case and prints its commands, outputs and tracebacks;
`-k keras_zip` runs one family.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

import fuzz as fz

RESULTS = Path(os.environ.get("FUZZ_RESULTS", "/tmp/fuzz-results"))
REPORT = Path(os.environ.get("FUZZ_REPORT", "/tmp/fuzz-failures.txt"))
CASE = os.environ.get("FUZZ_CASE")          # family:index, rerun one case verbosely
TIMEOUT = 20           # s, soft limit of one merge command (SIGALRM in the worker)
TRAINER_TIMEOUT = 45   # s, soft limit of one `trainer --init` command
HARD_EXTRA = 20        # s past the soft limits before the worker is killed
HEADROOM_MB = 1536     # RLIMIT_AS: the worker's address space after warm-up plus this
PEAK_MB = 400          # a command whose RSS peaks this far above its start allocated too much
FAMILY_BUDGET = 150    # s per family; past it the remaining cases are reported as not run
REPO = fz.REPO
FUZZ_PATH = Path(fz.__file__).resolve().parents[1]  # the directory holding the fuzz package


# -- the worker -------------------------------------------------------------------

class Worker:
    def __init__(self, log: Path):
        self.log_path = log
        self.proc = None
        self.buf = b""
        self.limit_mb = None

    def start(self):
        env = dict(os.environ)
        for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "TF_CONFIG",
                    "PYTHONSTARTUP"):
            env.pop(var, None)
        env.update(PYTHONPATH=os.pathsep.join([str(FUZZ_PATH), str(REPO)]),  # for `python -m fuzz.worker`
                   CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1",
                   OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fuzz.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=str(REPO))
        self.buf = b""
        self.eof = False
        if self.recv(180) is None:
            raise RuntimeError(f"fuzz worker did not start; see {self.log_path}")

    def recv(self, timeout: float):
        """The next protocol message, or None if the worker died or ran out of time."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                if text.startswith(fz.PROTO):
                    return json.loads(text[len(fz.PROTO):])
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self.eof = True
                    return None
                self.buf += chunk

    def request(self, obj: dict, timeout: float):
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self.recv(timeout)

    def log_offset(self) -> int:
        self.log.flush()
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def stop(self, kill=False):
        if self.proc is None:
            return
        if kill or self.proc.poll() is not None:
            if self.proc.poll() is None:
                self.proc.kill()
        else:
            try:
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.flush()
            except OSError:
                pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.proc = None


class Session:
    def __init__(self, root: Path):
        self.root = root
        self.worker = Worker(root / "worker.log")
        self.worker.start()
        got = self.worker.request({"op": "seeds", "root": str(root / "seeds")}, 600)
        if not got or "seeds" not in got:
            raise RuntimeError(f"building the seed inputs failed; see {root / 'worker.log'}")
        self.seeds = got["seeds"]
        self.warm()
        self.restarts = 0

    def warm(self):
        g = self.seeds["good_keras"]
        got = self.worker.request({"op": "warm", "headroom_mb": HEADROOM_MB,
                                   "argvs": [["evaluate", g, "--data", "digits"], ["inspect", g]]}, 300)
        if not got:
            raise RuntimeError(f"fuzz worker warm-up failed; see {self.worker.log_path}")
        self.worker.limit_mb = got["limit_mb"]

    def restart(self):
        self.worker.stop(kill=True)
        self.worker.start()
        self.warm()
        self.restarts += 1

    def run(self, spec: dict, timeout=TIMEOUT, trainer_timeout=TRAINER_TIMEOUT,
            hard_extra=HARD_EXTRA) -> tuple[list[dict], dict | None]:
        """(per-command results, crash) for one case; crash = the worker died or hung."""
        n_trainer = sum(c["tool"] == "trainer" for c in spec["cmds"])
        hard = (len(spec["cmds"]) - n_trainer) * timeout + n_trainer * trainer_timeout + hard_extra
        offset = self.worker.log_offset()
        t0 = time.monotonic()
        got = self.worker.request({"op": "case", "spec": spec, "timeout": timeout,
                                   "trainer_timeout": trainer_timeout}, hard)
        if got is not None:
            if got["vm_mb"] > self.worker.limit_mb - HEADROOM_MB // 2:
                self.restart()  # the address space grew: restore the headroom
            return got["results"], None
        if self.worker.eof:  # it died: let it be reaped for its exit status
            try:
                self.worker.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        alive = self.worker.proc.poll() is None
        rc = self.worker.proc.returncode
        self.worker.stop(kill=True)
        log = self.worker.log_since(offset)
        crash = {"hung": alive, "seconds": round(time.monotonic() - t0, 1), "returncode": rc, "log": log[-6000:]}
        self.restart()
        return [], crash


@pytest.fixture(scope="session")
def fuzz(tmp_path_factory):
    s = Session(tmp_path_factory.mktemp("fuzz"))
    yield s
    s.worker.stop()


# -- judging ----------------------------------------------------------------------

def _where(frame) -> str:
    f, line, func = frame
    p = Path(f)
    try:
        rel = p.resolve().relative_to(REPO)
    except ValueError:
        parts = p.parts
        rel = Path(*parts[-2:]) if len(parts) > 1 else p
    return f"{rel}:{line} {func}"


def _project_frame(frames) -> str | None:
    for f in reversed(frames):
        p = Path(f[0]).resolve()
        if str(p).startswith(str(REPO)) and not str(p).startswith(str(REPO / "tests")):
            return _where(f)
    return None


def normalize(text: str) -> str:
    text = re.sub(r"'[^']*/fuzz\d*/[^']*'", "'<path>'", text)
    text = re.sub(r"(/[\w.@+-]+)+/?", "<path>", text)
    text = re.sub(r"0x[0-9a-fA-F]+", "0x…", text)
    text = re.sub(r"\d+", "N", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text[:160]


def _cmd_name(r) -> str:
    if r["tool"] == "merge":
        return f"merge {r['argv'][0]}"
    return "trainer --init" if r["argv"][:1] == ["--init"] else "trainer"


def judge(results: list[dict], crash: dict | None, spec: dict) -> list[dict]:
    """Failures of one case: dicts with a signature `sig` (what groups them) and details."""
    fails = []

    def fail(r, kind, sig, detail):
        fails.append({"kind": kind, "sig": sig, "cmd": _cmd_name(r) if r else "?",
                      "argv": ([r["tool"]] + r["argv"]) if r else None, "rc": r["rc"] if r else None,
                      "detail": detail})

    for r in results:
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        exc = r["exc"]
        if r["sentinel"]:
            fail(r, "executed", "runs code the input names (the sentinel file was created)",
                 f"{spec['desc']}; sentinel {spec['sentinel']} exists after this command")
        if r["timeout"]:
            loc = _project_frame(exc["frames"]) or (_where(exc["frames"][-1]) if exc["frames"] else "?")
            fail(r, "timeout", f"hangs: still running after its time limit, in {loc}", exc["msg"])
        elif exc:
            loc = _project_frame(exc["frames"]) or "outside the project"
            deepest = _where(exc["frames"][-1]) if exc["frames"] else "?"
            fail(r, "exception", f"{exc['type']} escapes main() via {loc}",
                 f"{exc['type']}: {(exc['msg'].splitlines() or [''])[0][:300]}  [raised at {deepest}]")
        elif r["rc"] not in r["allowed"]:
            fail(r, "exit", f"exit {r['rc']}: {normalize(last)}", last[:300])
        if "Traceback (most recent call last)" in r["stderr"]:
            fail(r, "traceback", f"prints a traceback: {normalize(last)}", last[:300])
        elif r["rc"] == 2 and not exc:
            bad = [ln for ln in lines[:-1] if not ln.startswith("warning:")]
            if not last.startswith("error:"):
                fail(r, "stderr", f"exit 2 without a final error: line: {normalize(last) or '<empty stderr>'}",
                     last[:300])
            elif bad:
                fail(r, "stderr", f"exit 2 with extra stderr lines: {normalize(bad[0])}", bad[0][:300])
        if r.get("peak_mb") and r["peak_mb"] > PEAK_MB:
            fail(r, "memory", f"allocates too much memory (peak RSS > {PEAK_MB} MB above its start) "
                 f"on input: {spec['op']}", f"peak RSS {r['peak_mb']:.0f} MB above its start")
    if crash:
        done = {(_cmd_name(r)) for r in results}
        log = crash["log"]
        m = re.search(r"Fatal Python error: ([^\n]+)", log)
        frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', log.split("Fatal Python error")[-1])
        proj = next((f"{Path(f).resolve().relative_to(REPO)}:{ln} {fn}" for f, ln, fn in frames
                     if str(Path(f).resolve()).startswith(str(REPO)) and "/tests/" not in f), None)
        top = f"{Path(frames[0][0]).name}:{frames[0][1]} {frames[0][2]}" if frames else "?"
        tail = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith("---")][-3:]
        if crash["hung"]:
            sig = f"hangs past the hard limit ({crash['seconds']:.0f}s), uninterruptible (C code?)"
        else:
            sig = f"the process dies: {m.group(1) if m else 'exit ' + str(crash['returncode'])} at {proj or top}"
        fails.append({"kind": "crash", "sig": sig, "cmd": "one of: " + ", ".join(
            _cmd_name({"tool": c["tool"], "argv": c["argv"]}) for c in spec["cmds"]
            if _cmd_name({"tool": c["tool"], "argv": c["argv"]}) not in done),
            "argv": None, "rc": crash["returncode"], "detail": " | ".join(tail)[:400]})
    return fails


# -- reporting --------------------------------------------------------------------

def write_report() -> str:
    files = sorted(RESULTS.glob("*.json"))
    fams = [json.loads(f.read_text()) for f in files]
    groups: dict[str, list] = defaultdict(list)
    for fam in fams:
        for case in fam["failures"]:
            for f in case["fails"]:
                groups[f["sig"]].append((case, f))
    order = {k: i for i, k in enumerate(fz.FAMILIES)}

    def case_key(item):
        fam, idx = item[0]["id"].split(":")
        return order.get(fam, 99), int(idx)

    lines = [f"fuzz failures, written {time.strftime('%Y-%m-%d %H:%M:%S')} by tests/test_fuzz.py",
             "families: " + ", ".join(f"{f['family']} {f['cases']} cases, {f['failing']} failing, "
                                      f"{f['seconds']:.0f}s (run {f['when']})" for f in fams),
             f"{len(groups)} distinct failure signatures; rerun one case with "
             "FUZZ_CASE=<id> ./run test tests/test_fuzz.py -q -s", ""]
    for n, (sig, items) in enumerate(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])), 1):
        items.sort(key=case_key)
        case, f = items[0]
        ids = sorted({c["id"] for c, _ in items}, key=lambda i: (order.get(i.split(":")[0], 99),
                                                                int(i.split(":")[1])))
        cmds = sorted({x["cmd"] for _, x in items})
        famset = sorted({c["id"].split(":")[0] for c, _ in items}, key=lambda x: order.get(x, 99))
        lines += [f"[{n}] {sig}",
                  f"    {len(ids)} case(s) in {', '.join(famset)}; commands: {', '.join(cmds)}",
                  f"    reproduce: FUZZ_CASE={case['id']}   input: {case['desc']}",
                  f"    command: {' '.join(f['argv']) if f['argv'] else f['cmd']}",
                  f"    exit code: {f['rc'] if f['kind'] not in ('exception', 'timeout') else 'none (exception)'}",
                  f"    {f['detail']}",
                  f"    other cases: {' '.join(ids[1:12])}{' ...' if len(ids) > 12 else ''}", ""]
    lines.append("how far the mutants got (per family, command: exit code or escaped exception, count):")
    for fam in fams:
        lines.append(f"  {fam['family']}: " + ", ".join(f"{k} x{v}" for k, v in fam.get("outcomes", {}).items()))
    text = "\n".join(lines) + "\n"
    REPORT.write_text(text)
    return text


def _show(spec, results, crash, fails) -> str:
    out = [f"case {spec['id']}: {spec['desc']}", f"case directory: {spec['dir']}"]
    for r in results:
        out += [f"$ python -m {r['tool']} {' '.join(r['argv'])}",
                f"  exit {r['rc']} in {r['seconds']}s, peak +{r['peak_mb']} MB, sentinel {r['sentinel']}"]
        if r["stdout"].strip():
            out.append("  stdout: " + r["stdout"].strip()[-1500:].replace("\n", "\n          "))
        if r["stderr"].strip():
            out.append("  stderr: " + r["stderr"].strip()[-3000:].replace("\n", "\n          "))
        if r["exc"]:
            out.append(f"  escaped: {r['exc']['type']}: {r['exc']['msg'][:500]}")
            out += [f"    {_where(f)}" for f in r["exc"]["frames"]]
    if crash:
        out.append(f"worker died or hung: {json.dumps({k: v for k, v in crash.items() if k != 'log'})}")
        out.append(crash["log"][-3000:])
    out += [f"FAIL [{f['kind']}] {f['cmd']}: {f['sig']}" for f in fails] or ["no failure"]
    return "\n".join(out)


# -- the test ---------------------------------------------------------------------

@pytest.mark.parametrize("family", list(fz.FAMILIES))
def test_fuzz(fuzz, family, tmp_path_factory):
    if CASE:
        fam, _, idx = CASE.partition(":")
        if fam != family:
            pytest.skip(f"FUZZ_CASE={CASE}")
        indexes = [int(idx)]
    else:
        indexes = list(range(fz.FAMILIES[family]))
    base = tmp_path_factory.mktemp(family)
    t0 = time.monotonic()
    failures, not_run, times, outcomes = [], [], {}, defaultdict(int)
    for i in indexes:
        if not CASE and time.monotonic() - t0 > FAMILY_BUDGET:
            not_run.append(f"{family}:{i}")
            continue
        d = base / f"case{i:03d}"
        case = fz.make_case(family, i, fuzz.seeds, d)
        spec = case.spec(d)
        t_case = time.monotonic()
        results, crash = fuzz.run(spec)
        times[spec["id"]] = round(time.monotonic() - t_case, 2)
        for r in results:
            outcomes[f"{_cmd_name(r)}: " + (f"exit {r['rc']}" if not r["exc"] else r["exc"]["type"])] += 1
        fails = judge(results, crash, spec)
        if CASE:
            print("\n" + _show(spec, results, crash, fails))
        if fails:
            failures.append({"id": spec["id"], "desc": spec["desc"], "fails": fails})
        elif not CASE:
            shutil.rmtree(d, ignore_errors=True)
    seconds = time.monotonic() - t0
    if not CASE:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{family}.json").write_text(json.dumps({
            "family": family, "cases": len(indexes) - len(not_run), "failing": len(failures),
            "seconds": seconds, "when": time.strftime("%H:%M:%S"), "failures": failures,
            "slowest": sorted(times.items(), key=lambda kv: -kv[1])[:8], "outcomes": dict(sorted(outcomes.items()))},
            indent=1))
        write_report()
    sigs = sorted({f["sig"] for c in failures for f in c["fails"]})
    msg = [f"{family}: {len(failures)} of {len(indexes)} cases fail ({len(sigs)} signatures, "
           f"{seconds:.0f}s; worker restarts so far {fuzz.restarts}); details in {REPORT}"]
    msg += [f"  {s}  (e.g. FUZZ_CASE={next(c['id'] for c in failures if any(f['sig'] == s for f in c['fails']))})"
            for s in sigs]
    if not_run:
        msg.append(f"  {len(not_run)} case(s) not run: the family's time budget ({FAMILY_BUDGET}s) ran out")
    assert not failures and not not_run, "\n".join(msg)


def test_harness_flags_known_bad_cases(fuzz, tmp_path):
    """The harness is not vacuous: code a model name makes it import (a user's
    own --model, which the trainer does import) is caught by the sentinel and
    the exception it raises ends the command with exit 1; a command past its time limit is
    a timeout; a segfault costs the worker, which comes back."""
    sentinel = tmp_path / fz.SENTINEL
    (tmp_path / "fuzzevil.py").write_text(
        "import os, signal, time\n"
        f"open({str(sentinel)!r}, 'w')\n"
        "def build(*a, **k):\n    raise RuntimeError('boom')\n"
        "def slow(*a, **k):\n    time.sleep(60)\n"
        "def segv(*a, **k):\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    base = ["--epochs", "1", "--max-steps", "1", "--backend", "single", "--quiet", "--out", str(tmp_path / "o")]

    def spec(fn):
        sentinel.unlink(missing_ok=True)
        return {"id": f"selftest:{fn}", "dir": str(tmp_path), "desc": f"--model fuzzevil:{fn}", "syspath": True,
                "sentinel": str(sentinel), "op": "selftest",
                "cmds": [{"tool": "trainer", "argv": ["--model", f"fuzzevil:{fn}", *base], "allowed": [0, 2]}]}

    s = spec("build")
    fails = judge(*fuzz.run(s), s)
    # main() turns an unexpected exception into one line and exit 1 (the
    # traceback goes to a log file): judged as an exit outside "allowed".
    assert {f["kind"] for f in fails} == {"executed", "exit"}, fails
    assert any(f["kind"] == "exit" and "RuntimeError: boom" in f["sig"] for f in fails), fails
    s = spec("slow")
    fails = judge(*fuzz.run(s, trainer_timeout=2, hard_extra=30), s)
    timeouts = [f for f in fails if f["kind"] == "timeout"]
    assert timeouts and "_build_user_model" in timeouts[0]["sig"], fails
    restarts = fuzz.restarts
    s = spec("segv")
    fails = judge(*fuzz.run(s, trainer_timeout=30, hard_extra=10), s)
    assert [f["kind"] for f in fails] == ["crash"] and "Segmentation fault" in fails[0]["sig"], fails
    assert fuzz.restarts == restarts + 1
