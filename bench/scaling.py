"""Data-parallel scaling of cifar10_cnn on synthetic data, measured in one run.

Configurations (one intra-op thread per rank unless noted), each run REPS
times, interleaved so that drifting load on a shared machine hits them all
alike; the median is reported:
  plain np=1, plain np=2 (gloo, mpi): bench/plain_horovod.py, Horovod's
      documented TF2 loop, the baseline;
  ours np=1, ours np=2 (gloo, mpi): python -m trainer with its defaults;
  one process, all cores: python -m trainer --threads <cores>;
  the machine's ceiling: two independent single-process trainers at once,
      each pinned to its own core (taskset), no communication at all,
      against one such trainer alone.
Scaling efficiency = np=2 throughput / (2 x np=1 throughput of the same loop).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(extra=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra or {})
    return env


def plain(np_, controller, batch, steps, threads=1, env=None):
    cmd = [BIN / "horovodrun", "-np", np_, f"--{controller}", sys.executable, REPO / "bench" / "plain_horovod.py",
           "--batch-size", batch, "--steps", steps, "--warmup", 1, "--threads", threads]
    out = _run(cmd, env)
    return json.loads(re.search(r"(\{\"samples_per_sec\".*\})", out).group(1))["samples_per_sec"]


def ours(np_, controller, batch, steps, threads=1, extra=(), env=None):
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "trainer", "--model", "cifar10_cnn", "--data", "synthetic",
                "--batch-size", batch, "--max-steps", steps + 1, "--epochs", 1000, "--threads", threads,
                "--out", Path(tmp) / "run", "--quiet", *extra]
        if np_ == 0:  # no launcher: one process
            _run(args, env)
        else:
            _run([BIN / "horovodrun", "-np", np_, f"--{controller}", *args], env)
        return json.loads((Path(tmp) / "run" / "manifest.json").read_text())["final"]["samples_per_sec"]


def independent(batch, steps, cores=(0, 1)):
    """Summed throughput of trainers (--backend single, one thread, pinned to
    one core each) that run at once and share nothing but the machine."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for core in cores:
            args = ["taskset", "-c", core, sys.executable, "-m", "trainer", "--backend", "single",
                    "--model", "cifar10_cnn", "--data", "synthetic", "--batch-size", batch,
                    "--max-steps", steps + 1, "--epochs", 1000, "--threads", 1,
                    "--out", Path(tmp) / f"run{core}", "--quiet"]
            procs.append(subprocess.Popen([str(a) for a in args], cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, text=True))
        for p in procs:
            _, err = p.communicate(timeout=900)
            if p.returncode != 0:
                raise RuntimeError(f"independent trainer failed:\n{err[-2000:]}")
        return sum(json.loads((Path(tmp) / f"run{core}" / "manifest.json").read_text())["final"]["samples_per_sec"]
                   for core in cores)


def _run(cmd, env):
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=_env(env), capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench scaling")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--write", default=str(REPO / "docs" / "benchmarks.md"))
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    B, S = a.batch_size, a.steps
    configs = {
        "plain np=1": lambda: plain(1, "gloo", B, S),
        "plain np=2 gloo": lambda: plain(2, "gloo", B, S),
        "plain np=2 mpi": lambda: plain(2, "mpi", B, S),
        "ours np=1": lambda: ours(1, "gloo", B, S),
        "ours np=2 gloo": lambda: ours(2, "gloo", B, S),
        "ours np=2 mpi": lambda: ours(2, "mpi", B, S),
        "ours np=2 gloo, --accum-steps 4": lambda: ours(2, "gloo", B, S // 4, extra=("--accum-steps", 4)),
        "ours np=2 mpi, --accum-steps 4": lambda: ours(2, "mpi", B, S // 4, extra=("--accum-steps", 4)),
        "ours np=2 gloo, --fp16-allreduce": lambda: ours(2, "gloo", B, S, extra=("--fp16-allreduce",)),
        f"one process, {cores} threads": lambda: ours(0, None, B, S, threads=cores),
        "one single process alone, one core": lambda: independent(B, S, cores=(0,)),
        "two independent processes, one core each": lambda: independent(B, S),
    }
    results = {k: [] for k in configs}
    started = time.time()
    for rep in range(a.reps):
        for name, fn in configs.items():
            results[name].append(fn())
            print(f"rep {rep + 1}/{a.reps} {name}: {results[name][-1]:.1f} samples/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    report = render(med, results, a, cores, time.time() - started)
    print(report)
    if a.write:
        write_section(Path(a.write), "scaling", report)
    return 0


def render(med, results, a, cores, seconds) -> str:
    eff = lambda two, one: med[two] / (2 * med[one])  # noqa: E731
    rows = [f"| {k} | {med[k]:.1f} | {', '.join(f'{v:.0f}' for v in results[k])} |" for k in med]
    lines = [
        "## Data-parallel scaling (cifar10_cnn, synthetic data)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {cores} cores "
        f"({_cpu_name()}), Python {platform.python_version()}, per-rank batch {a.batch_size}, "
        f"{a.steps} timed steps after one untimed compile step, median of {a.reps} interleaved runs "
        f"({seconds / 60:.1f} min in all). `python -m bench scaling` reproduces it.",
        "",
        "| configuration | samples/s (median) | runs |",
        "|---|---|---|",
        *rows,
        "",
        "| ratio | value | target |",
        "|---|---|---|",
        f"| scaling efficiency, ours, gloo | {eff('ours np=2 gloo', 'ours np=1'):.2f} | >= 0.90 |",
        f"| scaling efficiency, ours, mpi | {eff('ours np=2 mpi', 'ours np=1'):.2f} | >= 0.90 |",
        f"| scaling efficiency, ours, gloo, --accum-steps 4 | {eff('ours np=2 gloo, --accum-steps 4', 'ours np=1'):.2f} | >= 0.90 |",
        f"| scaling efficiency, ours, mpi, --accum-steps 4 | {eff('ours np=2 mpi, --accum-steps 4', 'ours np=1'):.2f} | >= 0.90 |",
        f"| scaling efficiency, ours, gloo, --fp16-allreduce | {eff('ours np=2 gloo, --fp16-allreduce', 'ours np=1'):.2f} | >= 0.90 |",
        f"| scaling efficiency, plain loop, gloo | {eff('plain np=2 gloo', 'plain np=1'):.2f} | (baseline) |",
        f"| scaling efficiency, plain loop, mpi | {eff('plain np=2 mpi', 'plain np=1'):.2f} | (baseline) |",
        f"| ours / plain at np=1 | {med['ours np=1'] / med['plain np=1']:.2f} | >= 1.0 |",
        f"| ours / plain at np=2, gloo | {med['ours np=2 gloo'] / med['plain np=2 gloo']:.2f} | >= 1.0 |",
        f"| ours / plain at np=2, mpi | {med['ours np=2 mpi'] / med['plain np=2 mpi']:.2f} | >= 1.0 |",
        f"| one process with all cores / (2 x ours np=1) | "
        f"{med[[k for k in med if k.startswith('one process')][0]] / (2 * med['ours np=1']):.2f} | (reference) |",
        f"| machine ceiling: two independent processes / (2 x one alone) | "
        f"{med['two independent processes, one core each'] / (2 * med['one single process alone, one core']):.2f} "
        f"| (what no communication would give) |",
        f"| ours np=1 under horovodrun / one single process alone | "
        f"{med['ours np=1'] / med['one single process alone, one core']:.2f} | (Horovod's cost at size 1) |",
        f"| ours np=2 gloo / machine ceiling | "
        f"{med['ours np=2 gloo'] / med['two independent processes, one core each']:.2f} | (the cost of synchronizing) |",
    ]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_section(path: Path, key: str, body: str) -> None:
    """Replace this benchmark's section of docs/benchmarks.md, keep the others."""
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here was measured by a script under bench/ on the machine named with it.\n"
    block = f"{begin}\n{body}{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
