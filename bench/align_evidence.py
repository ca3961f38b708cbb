"""Evidence for `merge align`: two digits models from different random
initializations, for `mlp` and `digits_cnn`: each member, the naive weight
average, the aligned average (and recalibrated, where there is batch norm),
the ensemble, and the loss barrier along the line before and after alignment.

    python -m bench align [--epochs 6] [--keep DIR]

Writes the "align" section of docs/benchmarks.md and docs/barrier.png.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .fedavg_evidence import evaluate, merge, trainer
from .scaling import REPO, _cpu_name, _run, write_section

MODELS = ("mlp", "digits_cnn")


def pair(work: Path, model: str, a) -> dict:
    runs = [work / model / f"seed{s}" for s in a.seeds]
    for s, run in zip(a.seeds, runs):
        _run(trainer("--model", model, "--epochs", a.epochs, "--seed", s, "--out", run, "--quiet"), None)
    exports = [r / "model.keras" for r in runs]
    out = {name: work / model / f"{name}.keras" for name in ("naive", "aligned", "recalibrated", "ensemble")}
    # Independent runs record different lineages: the naive average is what --force is for.
    _run(merge("fedavg", *exports, "-o", out["naive"], "--uniform", "--force", "--quiet"), None)
    _run(merge("fedavg", *exports, "-o", out["aligned"], "--uniform", "--align", "--quiet"), None)
    _run(merge("fedavg", *exports, "-o", out["recalibrated"], "--uniform", "--align", "--recalibrate-bn",
               "--data", "digits", "--quiet"), None)
    _run(merge("ensemble", *exports, "-o", out["ensemble"]), None)
    rows = evaluate([*exports, *out.values()])
    text = _run(merge("barrier", *exports, "--data", "digits"), None)
    curves = {"naive": [], "aligned": []}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0].replace(".", "").isdigit():
            curves["naive"].append(float(parts[1]))
            curves["aligned"].append(float(parts[3]))
    barrier = dict(p.split() for p in text.splitlines()[-1].split(": ")[1].split(", "))
    names = ["member A", "member B", "naive average", "aligned average", "aligned + recalibrated", "ensemble"]
    return {"acc": {n: r["accuracy"] for n, r in zip(names, rows)}, "loss": {n: r["loss"] for n, r in zip(names, rows)},
            "curves": curves, "barrier": {k: float(v) for k, v in barrier.items()}}


def render(res: dict, a, seconds: float) -> str:
    lines = ["## Aligning independently initialized models (digits)", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {_cpu_name()} ({seconds / 60:.1f} min). `python -m bench align` "
             f"reproduces it. Per model, two `python -m trainer --model M --epochs {a.epochs} --seed S` runs "
             f"(S = {a.seeds[0]}, {a.seeds[1]}: different initial weights, all training data); averages with "
             "`merge fedavg --uniform` (naive), `--align`, `--align --recalibrate-bn --data digits`; "
             "`merge ensemble` (mean of probabilities); barrier by `merge barrier` (11 points, test loss). "
             "Neither model has batch normalization, so recalibration leaves the aligned average unchanged.", "",
             "| model | member A | member B | naive average | aligned average | aligned + recalibrated | ensemble "
             "| barrier before | barrier after |", "|---|---|---|---|---|---|---|---|---|"]
    for model, r in res.items():
        acc = r["acc"]
        lines.append(f"| {model} | " + " | ".join(f"{acc[n]:.4f}" for n in acc) +
                     f" | {r['barrier']['naive']:.3f} | {r['barrier']['aligned']:.3f} |")
    lines += ["", "| target | model | value | met |", "|---|---|---|---|"]
    for model, r in res.items():
        acc = r["acc"]
        mean = (acc["member A"] + acc["member B"]) / 2
        best = max(acc["member A"], acc["member B"])
        ratio = acc["aligned + recalibrated"] / mean
        lines.append(f"| aligned + recalibrated average >= 0.9 x mean member accuracy | {model} | {ratio:.3f} | "
                     f"{'yes' if ratio >= 0.9 else 'no'} |")
        lines.append(f"| naive average collapses (below 0.9 x mean member) | {model} | "
                     f"{acc['naive average'] / mean:.3f} | {'yes' if acc['naive average'] < 0.9 * mean else 'no'} |")
        lines.append(f"| ensemble beats its best member | {model} | {acc['ensemble']:.4f} vs {best:.4f} | "
                     f"{'yes' if acc['ensemble'] > best else 'no'} |")
    lines += ["", "![loss along the line from A to B](barrier.png)"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res), figsize=(5 * len(res), 3.5))
    for ax, (model, r) in zip(axes, res.items()):
        xs = [i / (len(r["curves"]["naive"]) - 1) for i in range(len(r["curves"]["naive"]))]
        ax.plot(xs, r["curves"]["naive"], "o-", label=f"naive (barrier {r['barrier']['naive']:.2f})")
        ax.plot(xs, r["curves"]["aligned"], "o-", label=f"aligned (barrier {r['barrier']['aligned']:.2f})")
        ax.set(title=model, xlabel="alpha (0 = A, 1 = B)", ylabel="test loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench align")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--keep")
    p.add_argument("--write", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "barrier.png"))
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        work = Path(a.keep or tmp)
        res = {m: pair(work, m, a) for m in MODELS}
        (work / "results.json").write_text(json.dumps(res, indent=1))
    report = render(res, a, time.time() - started)
    print(report)
    plot(res, Path(a.plot))
    write_section(Path(a.write), "align", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
