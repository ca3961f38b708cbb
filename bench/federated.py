"""Federated learning on non-IID digits: FedAvg, FedProx, FedAvgM and SCAFFOLD side by side.

`python -m bench federated` runs every setting of issue 12 through
`python -m launch federated --simulate` (which gives the process path's
global models, tests/test_federated_algorithms.py), each algorithm from the
same `trainer init` as its centralized reference: one `python -m trainer
--init INIT` run on all training data with the clients' flags for rounds x
local epochs epochs, the samples all clients together see. Accuracy is the
global model's on the full digits test split after every round; a target
counts as met by the LAST round's accuracy, not the best one.

It also times `launch federated` for 10 clients x 1 round with and without
--simulate, and checks that both wrote the same global model. Results go to
docs/benchmarks.md (section `federated`) and docs/federated.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .scaling import REPO, _cpu_name, _run, write_section

TARGET = 0.97
SPEEDUP_TARGET = 5.0


@dataclass
class Setting:
    key: str
    title: str
    clients: int
    split: str
    rounds: int
    decay: float             # --lr-decay: the clients' lr falls to about a quarter by the last round
    per_round: int | None = None
    target: float | None = TARGET


SETTINGS = [
    Setting("pathological", "2 clients, `--split classes:5`, 10 rounds x 1 local epoch", 2, "classes:5", 10, 0.85),
    Setting("dirichlet", "10 clients, `--split dirichlet:0.1`, 20 rounds x 1 local epoch", 10, "dirichlet:0.1", 20,
            0.926),
    Setting("many", "100 clients, 10 sampled per round, `--split dirichlet:0.3`, 30 rounds x 1 local epoch",
            100, "dirichlet:0.3", 30, 0.95, per_round=10, target=None),
]
# (label, launch federated flags). Every algorithm gets the same client flags.
ALGORITHMS = [
    ("FedAvg", ["--algorithm", "fedavg"]),
    ("FedProx (mu 0.01)", ["--algorithm", "fedprox", "--prox-mu", "0.01"]),
    ("FedAvgM (server momentum 0.9)", ["--algorithm", "fedavg", "--server-opt", "fedavgm"]),
    ("SCAFFOLD", ["--algorithm", "scaffold"]),
]
# The clients' trainer flags (docs/benchmarks.md says how they were chosen),
# with each setting's --lr-decay.
CLIENT_FLAGS = ["--optimizer", "sgd", "--lr", "0.15", "--batch-size", "8"]
# What else was run beside the four, on the settings with a target: SCAFFOLD
# without the schedule, with the trainer's defaults, and with server momentum.
VARIANTS = [
    ("SCAFFOLD, constant lr (no --lr-decay)", ["--algorithm", "scaffold"], CLIENT_FLAGS, False),
    ("SCAFFOLD, trainer defaults (Adam, lr 1e-3, batch 32, constant)", ["--algorithm", "scaffold"], [], False),
    ("SCAFFOLD + server momentum 0.9", ["--algorithm", "scaffold", "--server-opt", "fedavgm"], CLIENT_FLAGS, True),
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _py(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _rounds(out: Path) -> list[float]:
    return [float(r["global_accuracy"]) for r in csv.DictReader(open(out / "rounds.csv"))]


def federated(work: Path, init: Path, s: Setting, label: str, flags: list[str], client=CLIENT_FLAGS,
              schedule=True) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{s.key}-", dir=work)) / "fed"
    t0 = time.perf_counter()
    _run(_py("launch", "federated", "--simulate", "--init", init, "--clients", s.clients, "--rounds", s.rounds,
             "--split", s.split, "--quiet", "--out", out,
             *(["--clients-per-round", s.per_round] if s.per_round else []), *flags,
             *(["--lr-decay", s.decay] if schedule else []), "--", *client), None)
    seconds = time.perf_counter() - t0
    acc = _rounds(out)
    _log(f"[{s.key}] {label}: last {acc[-1]:.4f}, best {max(acc):.4f} ({seconds:.0f} s)")
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"label": label, "accuracy": acc, "seconds": seconds}


def centralized(work: Path, init: Path, s: Setting) -> dict:
    out = work / f"central-{s.key}"
    t0 = time.perf_counter()
    _run(_py("trainer", "--init", init, "--epochs", s.rounds, "--out", out, "--quiet", *CLIENT_FLAGS), None)
    manifest = json.loads((out / "manifest.json").read_text())
    lines = list(csv.DictReader(open(out / "history.csv")))
    return {"accuracy": manifest["final"]["test_accuracy"], "seconds": time.perf_counter() - t0,
            "curve": [float(r["test_accuracy"]) for r in lines]}


def speed(work: Path, init: Path, reps: int) -> dict:
    """launch federated, 10 clients x 1 round, as processes and --simulate,
    interleaved; the two global models compared."""
    times = {"processes": [], "simulate": []}
    outs = {}
    for rep in range(reps):
        for mode in ("processes", "simulate"):
            out = work / f"speed-{mode}-{rep}"
            t0 = time.perf_counter()
            _run(_py("launch", "federated", "--init", init, "--clients", 10, "--rounds", 1, "--split", "iid",
                     "--quiet", "--out", out, *(["--simulate"] if mode == "simulate" else [])), None)
            times[mode].append(time.perf_counter() - t0)
            outs[mode] = out / "round-001" / "global"
            _log(f"[speed] {mode}: {times[mode][-1]:.1f} s")
    from merge.models import load_model
    a, b = (load_model(outs[m]) for m in ("processes", "simulate"))
    diff = max(float(abs(x.numpy() - y.numpy()).max()) for x, y in zip(a.weights, b.weights))
    best = {m: min(t) for m, t in times.items()}
    return {"times": times, "best": best, "ratio": best["processes"] / best["simulate"], "max_abs_diff": diff}


def plot(path: Path, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from trainer.checkpoint import atomic_write
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(5 * len(SETTINGS), 4))
    for ax, s in zip(axes, SETTINGS):
        r = results[s.key]
        for run in r["runs"]:
            ax.plot(range(1, len(run["accuracy"]) + 1), run["accuracy"], marker=".", label=run["label"])
        c = r["central"]
        ax.plot(range(1, len(c["curve"]) + 1), c["curve"], "k--", lw=1, label="centralized (per epoch)")
        if s.target:
            ax.axhline(s.target * c["accuracy"], color="grey", lw=0.8, ls=":",
                       label=f"{s.target} x centralized")
        ax.set(title=f"{s.clients} clients, {s.split}" + (f", {s.per_round}/round" if s.per_round else ""),
               xlabel="round (centralized: epoch)", ylabel="test accuracy (digits)", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def report(results: dict, spd: dict, minutes: float) -> str:
    lines = [f"## Federated learning on non-IID clients (digits_cnn, digits)\n",
             f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with 2 cores ({_cpu_name()}), Python "
             f"{platform.python_version()} ({minutes:.1f} min in all). `python -m bench federated` reproduces it.\n",
             "Every run starts from one `python -m trainer init --model digits_cnn` and goes through `python -m "
             "launch federated --simulate` (the same global models as one process per client, tested). Clients: "
             f"`{' '.join(CLIENT_FLAGS)}`, 1 local epoch, round r at lr x GAMMA^(r-1) (`--lr-decay GAMMA`, "
             "GAMMA chosen per setting so that the last round trains at about a quarter of the first's lr). "
             "The centralized reference trains the same model from the same init on all 1438 training samples "
             "with the same flags (constant lr) for as many epochs as there are rounds. Accuracy is on the full "
             "test split (359 samples); a target is met by the last round, not the best.\n"]
    for s in SETTINGS:
        r = results[s.key]
        c = r["central"]["accuracy"]
        lines.append(f"### {s.title}\n")
        lines.append(f"`--lr-decay {s.decay}`.\n")
        lines.append(f"Centralized ({s.rounds} epochs): {c:.4f}.\n")
        lines.append("| algorithm | last round | last / centralized | best (round) | first round at target | "
                     "wall time |")
        lines.append("|---|---|---|---|---|---|")
        for run in r["runs"] + r["variants"]:
            acc = run["accuracy"]
            first = next((i + 1 for i, a in enumerate(acc) if s.target and a >= s.target * c), None)
            lines.append(f"| {run['label']} | {acc[-1]:.4f} | **{acc[-1] / c:.3f}** | {max(acc):.4f} "
                         f"({acc.index(max(acc)) + 1}) | {first or '-'} | {run['seconds']:.0f} s |")
        lines.append("")
    lines.append("![rounds to accuracy](federated.png)\n")
    lines.append("### `--simulate` against one process per client (10 clients x 1 round, iid)\n")
    lines.append(f"Best of {len(spd['times']['simulate'])} interleaved runs of the whole `launch federated` "
                 f"command: processes {spd['best']['processes']:.1f} s, `--simulate` {spd['best']['simulate']:.1f} s: "
                 f"**{spd['ratio']:.1f}x**. Largest difference between the two global models: "
                 f"{spd['max_abs_diff']:.1e}.\n")
    lines.append("| target | value | met |")
    lines.append("|---|---|---|")
    for s in SETTINGS:
        if not s.target:
            continue
        r = results[s.key]
        c = r["central"]["accuracy"]
        sc = next(run for run in r["runs"] if run["label"] == "SCAFFOLD")
        best = max(r["runs"], key=lambda run: run["accuracy"][-1])
        ratio = sc["accuracy"][-1] / c
        lines.append(f"| {s.clients} clients, {s.split}: SCAFFOLD's last round >= {s.target} of centralized | "
                     f"{ratio:.3f} | {'yes' if ratio >= s.target else 'no'} |")
        if best is not sc:
            lines.append(f"| (best algorithm here: {best['label']}) | {best['accuracy'][-1] / c:.3f} | "
                         f"{'yes' if best['accuracy'][-1] / c >= s.target else 'no'} |")
    lines.append(f"| `--simulate` at least {SPEEDUP_TARGET:.0f}x faster, 10 clients x 1 round | "
                 f"{spd['ratio']:.1f}x | {'yes' if spd['ratio'] >= SPEEDUP_TARGET else 'no'} |")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench federated")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions of the speed measurement")
    p.add_argument("--only", help="comma-separated settings to run (pathological, dirichlet, many); "
                   "writes no report")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-federated-") as tmp:
        work = Path(tmp)
        init = work / "init"
        _run(_py("trainer", "init", "--model", "digits_cnn", "--out", init), None)
        results = {}
        for s in SETTINGS:
            if a.only and s.key not in a.only.split(","):
                continue
            central = centralized(work, init, s)
            _log(f"[{s.key}] centralized: {central['accuracy']:.4f}")
            runs = [federated(work, init, s, label, flags) for label, flags in ALGORITHMS]
            variants = [federated(work, init, s, label, flags, client, schedule)
                        for label, flags, client, schedule in VARIANTS] if s.target else []
            results[s.key] = {"central": central, "runs": runs, "variants": variants}
        if a.only:
            return 0
        spd = speed(work, init, a.reps)
    docs = REPO / "docs"
    plot(docs / "federated.png", results)
    write_section(docs / "benchmarks.md", "federated", report(results, spd, (time.perf_counter() - t0) / 60))
    _log(f"wrote {docs / 'benchmarks.md'} and {docs / 'federated.png'}")
    return 0
