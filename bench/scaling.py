"""Data-parallel scaling of cifar10_cnn on synthetic data, measured in one run.

Configurations (one intra-op thread per rank unless noted), each run REPS
times, interleaved so that drifting load on a shared machine hits them all
alike; the median is reported:
  plain np=1, plain np=2 (gloo, mpi): bench/plain_horovod.py, Horovod's
      documented TF2 loop, the baseline;
  ours np=1, ours np=2 (gloo, mpi): python -m trainer with its defaults;
  ours np=2 with HOROVOD_IDLE_CYCLE_TIME=0: the same with Horovod's upstream
      idle cycling instead of the project patch's waits (part 3);
  one process, all cores: python -m trainer --threads <cores>;
  the machine's ceiling: two independent single-process trainers at once,
      each pinned to its own core (taskset), no communication at all,
      against one such trainer alone.
Scaling efficiency = np=2 throughput / (2 x np=1 throughput of the same loop).

Every ratio is taken within one repetition, between runs minutes apart,
and the median of those paired ratios is reported: on a shared 2-core VM
the same configuration drifts by 15% within minutes (np=1 ran at 324 and
383 samples/s within 5 minutes), and a ratio of medians taken
across repetitions mixes that drift into the ratio.

Each repetition also measures what synchronizing must cost here
(bench/sync_floor.py): the CPU time the allreduce of one step's gradients
takes from a rank's core, and the straggler cost, the mean of the slower of
two unsynchronized single-core trainers' step times over the mean of both.
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
        _pinned_at_once({core: [sys.executable, "-m", "trainer", "--backend", "single", "--model", "cifar10_cnn",
                                "--data", "synthetic", "--batch-size", batch, "--max-steps", steps + 1,
                                "--epochs", 1000, "--threads", 1, "--out", Path(tmp) / f"run{core}", "--quiet"]
                         for core in cores})
        return sum(json.loads((Path(tmp) / f"run{core}" / "manifest.json").read_text())["final"]["samples_per_sec"]
                   for core in cores)


def allreduce_cost(controller):
    """The trainer's allreduce of cifar10_cnn's gradients alone, np=2: wall and CPU ms per step on rank 0."""
    out = _run([BIN / "horovodrun", "-np", 2, f"--{controller}", sys.executable, REPO / "bench" / "sync_floor.py",
                "allreduce"], None)
    return json.loads(re.search(r"(\{\"rank\".*\})", out).group(1))


def straggler(batch, steps, cores=(0, 1)):
    """Two single-core trainers' compiled steps, at once, each pinned to its
    own core, no communication: (mean step ms, mean of the slower / mean of both)."""
    outs = _pinned_at_once({core: [sys.executable, REPO / "bench" / "sync_floor.py", "steps", "--steps", steps,
                                   "--batch-size", batch] for core in cores})
    pairs = list(zip(*(json.loads(out.strip().splitlines()[-1])["step_ms"] for out in outs)))
    mean = statistics.mean(sum(p) / len(p) for p in pairs)
    return mean, statistics.mean(max(p) for p in pairs) / mean


def _pinned_at_once(commands):
    """Run each command pinned to its core (taskset), all at once; their stdouts."""
    procs = [subprocess.Popen(["taskset", "-c", str(core), *map(str, cmd)], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for core, cmd in commands.items()]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(p.args[3:6])}... failed:\n{err[-2000:]}")
        outs.append(out)
    return outs


def _run(cmd, env):
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=_env(env), capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench scaling")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--reps", type=int, default=5)
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
        UPSTREAM_IDLE + " gloo": lambda: ours(2, "gloo", B, S, env={"HOROVOD_IDLE_CYCLE_TIME": "0"}),
        UPSTREAM_IDLE + " mpi": lambda: ours(2, "mpi", B, S, env={"HOROVOD_IDLE_CYCLE_TIME": "0"}),
        ONE_PROCESS: lambda: ours(0, None, B, S, threads=cores),
        "one single process alone, one core": lambda: independent(B, S, cores=(0,)),
        "two independent processes, one core each": lambda: independent(B, S),
    }
    floors = {
        "allreduce gloo": lambda: allreduce_cost("gloo"),
        "allreduce mpi": lambda: allreduce_cost("mpi"),
        "straggler": lambda: straggler(B, S),
    }
    results = {k: [] for k in [*configs, *floors]}
    started = time.time()
    for rep in range(a.reps):
        for name, fn in [*configs.items(), *floors.items()]:
            results[name].append(fn())
            print(f"rep {rep + 1}/{a.reps} {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    report = render(results, list(configs), a, cores, time.time() - started)
    print(report)
    if a.write:
        write_section(Path(a.write), "scaling", report)
    return 0


ONE_PROCESS = "one process, all cores"
# The trainer with Horovod's upstream idle behaviour (a cross-rank exchange
# every 5 ms cycle even with nothing to reduce) instead of the patch's part 3.
UPSTREAM_IDLE = "ours np=2, HOROVOD_IDLE_CYCLE_TIME=0,"

# (label, ratio of one repetition's results, target)
RATIOS = [
    ("scaling efficiency, ours, gloo", lambda r: r["ours np=2 gloo"] / (2 * r["ours np=1"]), ">= 0.90"),
    ("scaling efficiency, ours, mpi", lambda r: r["ours np=2 mpi"] / (2 * r["ours np=1"]), ">= 0.90"),
    ("scaling efficiency, ours, gloo, --accum-steps 4",
     lambda r: r["ours np=2 gloo, --accum-steps 4"] / (2 * r["ours np=1"]), "(4x the batch per allreduce)"),
    ("scaling efficiency, ours, mpi, --accum-steps 4",
     lambda r: r["ours np=2 mpi, --accum-steps 4"] / (2 * r["ours np=1"]), "(4x the batch per allreduce)"),
    ("scaling efficiency, ours, gloo, --fp16-allreduce",
     lambda r: r["ours np=2 gloo, --fp16-allreduce"] / (2 * r["ours np=1"]), "(reference)"),
    ("scaling efficiency, plain loop, gloo", lambda r: r["plain np=2 gloo"] / (2 * r["plain np=1"]), "(baseline)"),
    ("scaling efficiency, plain loop, mpi", lambda r: r["plain np=2 mpi"] / (2 * r["plain np=1"]), "(baseline)"),
    ("ours np=2 gloo / the same with HOROVOD_IDLE_CYCLE_TIME=0",
     lambda r: r["ours np=2 gloo"] / r[UPSTREAM_IDLE + " gloo"], "(the patch's idle waits)"),
    ("ours np=2 mpi / the same with HOROVOD_IDLE_CYCLE_TIME=0",
     lambda r: r["ours np=2 mpi"] / r[UPSTREAM_IDLE + " mpi"], "(the patch's idle waits)"),
    ("ours / plain at np=1", lambda r: r["ours np=1"] / r["plain np=1"], ">= 1.0"),
    ("ours / plain at np=2, gloo", lambda r: r["ours np=2 gloo"] / r["plain np=2 gloo"], ">= 1.0"),
    ("ours / plain at np=2, mpi", lambda r: r["ours np=2 mpi"] / r["plain np=2 mpi"], ">= 1.0"),
    ("one process with all cores / (2 x ours np=1)", lambda r: r[ONE_PROCESS] / (2 * r["ours np=1"]), "(reference)"),
    ("machine ceiling: two independent processes / (2 x one alone)",
     lambda r: r["two independent processes, one core each"] / (2 * r["one single process alone, one core"]),
     "(what no communication would give)"),
    ("ours np=1 under horovodrun / one single process alone",
     lambda r: r["ours np=1"] / r["one single process alone, one core"], "(Horovod's cost at size 1)"),
    ("ours np=2 gloo / machine ceiling",
     lambda r: r["ours np=2 gloo"] / r["two independent processes, one core each"], "(the cost of synchronizing)"),
]


def _floor(r):
    """One repetition's costs of synchronizing, and the efficiency they leave
    to synchronous SGD with Gloo: each rank's core computes its step and the
    allreduce's CPU work, and a synchronized step lasts as long as the slower
    rank's. Horovod's negotiation and cycle waits are not in it."""
    step, lag = r["straggler"]
    cpu = r["allreduce gloo"]["cpu_ms"]
    return {"step": step, "lag": lag, "gloo": r["allreduce gloo"], "mpi": r["allreduce mpi"],
            "bound": 1 / ((1 + cpu / step) * lag)}


def render(results, configs, a, cores, seconds) -> str:
    reps = [{k: v[i] for k, v in results.items()} for i in range(a.reps)]
    med = {k: statistics.median(results[k]) for k in configs}

    def row(values, fmt="{:.2f}"):
        return f"{fmt.format(statistics.median(values))} | {', '.join(fmt.format(v) for v in values)}"

    floors = [_floor(r) for r in reps]
    lines = [
        "## Data-parallel scaling (cifar10_cnn, synthetic data)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {cores} cores "
        f"({_cpu_name()}), Python {platform.python_version()}, per-rank batch {a.batch_size}, "
        f"{a.steps} timed steps after one untimed compile step, {a.reps} interleaved repetitions "
        f"({seconds / 60:.1f} min in all). `python -m bench scaling` reproduces it.",
        "",
        "| configuration | samples/s (median) | runs |",
        "|---|---|---|",
        *[f"| {k.replace(ONE_PROCESS, f'one process, {cores} threads')} | {med[k]:.1f} | "
          f"{', '.join(f'{v:.0f}' for v in results[k])} |" for k in configs],
        "",
        "Each ratio is computed within a repetition; the median of the repetitions is shown, then each one.",
        "",
        "| ratio | median | per repetition | target |",
        "|---|---|---|---|",
        *[f"| {label} | {row([fn(r) for r in reps])} | {target} |" for label, fn, target in RATIOS],
        "",
        "What synchronizing costs here (`bench/sync_floor.py`; medians, then each repetition):",
        "",
        "| measure | median | per repetition |",
        "|---|---|---|",
        f"| allreduce of one step's gradients alone, np=2 gloo: wall ms | {row([f['gloo']['wall_ms'] for f in floors], '{:.1f}')} |",
        f"| the same: CPU ms per rank | {row([f['gloo']['cpu_ms'] for f in floors], '{:.1f}')} |",
        f"| allreduce alone, np=2 mpi: wall ms | {row([f['mpi']['wall_ms'] for f in floors], '{:.1f}')} |",
        f"| the same: CPU ms per rank | {row([f['mpi']['cpu_ms'] for f in floors], '{:.1f}')} |",
        f"| compiled step of one single-core trainer, ms | {row([f['step'] for f in floors], '{:.1f}')} |",
        f"| straggler cost: slower of two unsynchronized trainers / their mean | {row([f['lag'] for f in floors], '{:.3f}')} |",
        f"| efficiency left to synchronous SGD with gloo: 1 / ((1 + allreduce CPU / step) x straggler cost) "
        f"| {row([f['bound'] for f in floors])} |",
    ]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    """The CPU's name, family and model, and its widest vector unit.

    A VM may name its CPU only "AMD EPYC", yet two machines of that name ran
    the same trainer at speeds a factor of two apart, and TensorFlow turned
    oneDNN on by itself on one of them only (docs/benchmarks.md): figures
    are comparable only between machines where this whole line matches.
    """
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('model name', 'unknown CPU')}, family {fields.get('cpu family', '?')} " \
           f"model {fields.get('model', '?')}, {vector}"


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
