"""Federated averaging and ensembles on digits, through the real CLIs.

Part 1, FedAvg: `python -m trainer init` writes one shared start; each round
two clients train `--local-epochs` epochs on their own non-IID share
(`--split classes:5`: client 0 holds classes 0-4, client 1 classes 5-9; and
`--split dirichlet:0.3`), starting from the previous round's global model
(`--init`), and `python -m merge fedavg` averages them into the next global
model. Every round is reported (no early stop). The centralized baseline is
one run on all training data from the same start for rounds x local epochs
epochs: the same number of samples as both clients together.

Part 2, independently initialized models: two runs on all data with
different seeds and no --init. `merge fedavg` refuses to average them
(exit 2); with --force the naive average is scored beside
`merge ensemble` of the two.

Every model is scored by `python -m merge evaluate --data digits` on the
full digits test split (all ten classes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .scaling import REPO, _cpu_name, _env, _run, write_section

TARGET_RATIO = 0.97
TARGET_ROUNDS = 10


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cmd(*args) -> list[str]:
    return [str(a) for a in args]


def trainer(*args) -> list[str]:
    return _cmd(sys.executable, "-m", "trainer", *args)


def merge(*args) -> list[str]:
    return _cmd(sys.executable, "-m", "merge", *args)


def _parallel(cmds: list[list[str]]) -> None:
    """Run the commands at the same time (two clients are two machines); fail on any error."""
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    failed = []
    for c, p in zip(cmds, procs):
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            failed.append(f"{' '.join(c)} failed (exit {p.returncode}):\n{err[-2000:]}")
    if failed:
        raise RuntimeError("\n".join(failed))


def evaluate(paths) -> list[dict]:
    """`python -m merge evaluate PATHS --data digits`, its table parsed (numbers read from the right)."""
    paths = [str(p) for p in paths]
    out = _run(merge("evaluate", *paths, "--data", "digits"), None)
    lines = out.strip().splitlines()
    body = lines[lines.index(next(l for l in lines if set(l.replace(" ", "")) == {"-"})) + 1:]
    if len(body) != len(paths):
        raise RuntimeError(f"merge evaluate printed {len(body)} rows for {len(paths)} models:\n{out}")
    rows = []
    for path, line in zip(paths, body):
        tok = line.split()
        if not line.startswith(path):
            raise RuntimeError(f"merge evaluate row {line!r} does not name {path}")
        rows.append({"path": path, "kind": tok[-4], "loss": float(tok[-3]), "accuracy": float(tok[-2])})
    return rows


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _history_acc(run: Path) -> list[float]:
    """Per-epoch test accuracy from a run's history.csv."""
    lines = (run / "history.csv").read_text().strip().splitlines()
    head = lines[0].split(",")
    col = head.index("test_accuracy")
    return [float(l.split(",")[col]) for l in lines[1:]]


def _class_counts(split: str, seed: int) -> list[list[int]]:
    """How many training samples of each class each client holds (for the write-up only)."""
    import numpy as np
    from trainer.data import load_dataset
    from trainer.splits import client_indices
    d = load_dataset("digits")
    return [np.bincount(d.y_train[client_indices(d.y_train, k, 2, split, seed, num_classes=d.num_classes)],
                        minlength=d.num_classes).tolist() for k in range(2)]


def federated(work: Path, init: Path, split: str, a) -> dict:
    tag = split.replace(":", "-")
    rounds, cur, diffs = [], init, []
    for r in range(1, a.rounds + 1):
        rd = work / tag / f"r{r}"
        clients = [rd / f"c{k}" for k in range(2)]
        t0 = time.time()
        _parallel([trainer("--init", cur, "--client", k, "--clients", 2, "--split", split,
                           "--epochs", a.local_epochs, "--seed", a.seed, "--threads", 1,
                           "--out", clients[k], "--quiet") for k in range(2)])
        glob = rd / "global"
        _run(merge("fedavg", *clients, "-o", glob, "--quiet"), None)
        gm = _manifest(glob)
        if gm["lineage"] != _manifest(init)["lineage"]:
            _log(f"[{split}] UNEXPECTED: round {r} global lineage {gm['lineage']} is not the init's")
        own = [_manifest(c)["final"]["test_accuracy"] for c in clients]
        rounds.append({"round": r, "dirs": [*map(str, clients), str(glob)], "trainer_accuracy": own,
                       "weights": [i["weight"] for i in gm["inputs"]], "lineage": gm["lineage"]})
        _log(f"[{split}] round {r}/{a.rounds}: clients {own[0]:.4f} {own[1]:.4f} (trainer's own test), "
             f"merged ({time.time() - t0:.0f} s)")
        cur = glob
    # One `merge evaluate` for the whole split: 3 models per round, one process.
    rows = iter(evaluate([d for r in rounds for d in r["dirs"]]))
    for r in rounds:
        c0, c1, g = next(rows), next(rows), next(rows)
        r.update(clients=[c0["accuracy"], c1["accuracy"]], fedavg=g["accuracy"], fedavg_loss=g["loss"])
        # the trainer scored the same client model on the same test split
        diffs += [abs(c["accuracy"] - t) for c, t in zip((c0, c1), r["trainer_accuracy"])]
        _log(f"[{split}] round {r['round']}: clients {c0['accuracy']:.4f} {c1['accuracy']:.4f}, "
             f"fedavg {g['accuracy']:.4f}")
    sizes = [_manifest(work / tag / "r1" / f"c{k}")["data"]["train_samples"] for k in range(2)]
    return {"split": split, "rounds": rounds, "sizes": sizes, "counts": _class_counts(split, a.seed),
            "max_eval_vs_manifest": max(diffs)}


def independent_pair(work: Path, a) -> dict:
    pair = work / "pair"
    runs = [pair / f"seed{s}" for s in a.pair_seeds]
    # The user's story: two machines, each with its own data and its own
    # random initialization. --split-seed keeps the two halves disjoint while
    # --seed gives each its own initial weights.
    _parallel([trainer("--epochs", a.pair_epochs, "--seed", s, "--client", k, "--clients", 2, "--split", "iid",
                       "--split-seed", 0, "--threads", 1, "--out", run, "--quiet")
               for k, (s, run) in enumerate(zip(a.pair_seeds, runs))])
    lineages = [_manifest(r)["lineage"] for r in runs]
    _log(f"[pair] trained {runs[0].name} and {runs[1].name}, lineages {lineages[0][:19]}... {lineages[1][:19]}...")
    naive, ens = pair / "naive", pair / "ensemble.keras"
    refused = subprocess.run(merge("fedavg", *runs, "-o", naive, "--quiet"), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=900)
    left_output = naive.exists()
    refused.stderr = refused.stderr.replace(f"{pair}/", "")  # seed1, not /tmp/.../pair/seed1
    _log(f"[pair] merge fedavg without --force: exit {refused.returncode}: {refused.stderr.strip()[:200]}")
    if refused.returncode != 2 or left_output:
        _log("[pair] UNEXPECTED: fedavg of different initializations did not refuse with exit 2 "
             "(or left an output behind)")
    forced = subprocess.run(merge("fedavg", *runs, "-o", naive, "--force", "--quiet"), cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=900)
    if forced.returncode != 0:
        raise RuntimeError(f"merge fedavg --force failed (exit {forced.returncode}):\n{forced.stderr[-2000:]}")
    _run(merge("ensemble", runs[0] / "model.keras", runs[1] / "model.keras", "-o", ens), None)
    rows = evaluate([*runs, naive, ens])
    _log("[pair] " + ", ".join(f"{Path(r['path']).name} {r['accuracy']:.4f}" for r in rows))
    return {"rows": rows, "lineages": lineages, "refused": {"code": refused.returncode,
            "stderr": refused.stderr.strip(), "left_output": left_output},
            "forced_warnings": [l for l in forced.stderr.splitlines() if l.startswith("warning")]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench fedavg")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=2, help="epochs each client trains per round")
    p.add_argument("--splits", default="classes:5,dirichlet:0.3")
    p.add_argument("--seed", type=int, default=0, help="trainer --seed of the clients, also the split's seed")
    p.add_argument("--pair-epochs", type=int, default=8, help="epochs of each independent model (trainer default)")
    p.add_argument("--pair-seeds", default="1,2")
    p.add_argument("--keep", help="work in this directory (kept) instead of a temporary one")
    p.add_argument("--write", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--plot", default=str(REPO / "docs" / "fedavg.png"))
    a = p.parse_args(argv)
    a.pair_seeds = [int(s) for s in a.pair_seeds.split(",")]
    if len(a.pair_seeds) != 2 or a.pair_seeds[0] == a.pair_seeds[1]:
        p.error("--pair-seeds: two different seeds, e.g. 1,2")
    if a.keep:
        work = Path(a.keep).resolve()
        if work.exists() and any(work.iterdir()):
            p.error(f"--keep {a.keep}: not empty")
        work.mkdir(parents=True, exist_ok=True)
        return _bench(work, a, argv)
    with tempfile.TemporaryDirectory(prefix="bench-fedavg-") as tmp:
        return _bench(Path(tmp), a, argv)


def _bench(work: Path, a, argv) -> int:
    started = time.time()
    _log(f"work directory {work}")
    init = work / "init"
    _run(trainer("init", "--model", "digits_cnn", "--out", init), None)
    budget = a.rounds * a.local_epochs
    central = work / "central"
    _log(f"centralized: {budget} epochs on all training data from the shared init")
    _run(trainer("--init", init, "--epochs", budget, "--seed", a.seed, "--out", central, "--quiet"), None)
    central_acc = evaluate([central])[0]["accuracy"]
    central_curve = _history_acc(central)
    _log(f"centralized accuracy {central_acc:.4f}")
    fed = []
    for split in a.splits.split(","):
        fed.append(federated(work, init, split.strip(), a))
    pair = independent_pair(work, a)
    seconds = time.time() - started
    res = {"central": central_acc, "central_curve": central_curve, "fed": fed, "pair": pair}
    report = render(res, a, argv, seconds)
    print(report)
    if a.plot:
        plot(res, a, Path(a.plot))
        _log(f"wrote {a.plot}")
    if a.write:
        write_section(Path(a.write), "fedavg", report)
        _log(f"wrote section fedavg of {a.write}")
    (work / "results.json").write_text(json.dumps(res, indent=1))
    _log(f"done in {seconds / 60:.1f} min")
    return 0


def _target(f: dict, central: float, rounds: int) -> tuple[float, int, int | None]:
    ratios = [r["fedavg"] / central for r in f["rounds"][:rounds]]
    best = max(range(len(ratios)), key=ratios.__getitem__)
    first = next((i + 1 for i, x in enumerate(ratios) if x >= TARGET_RATIO), None)
    return ratios[best], best + 1, first


def render(res: dict, a, argv, seconds: float) -> str:
    central, curve, E = res["central"], res["central_curve"], a.local_epochs
    shown = list(argv or [])
    for i, x in enumerate(shown):  # where the work went does not change the figures
        if x == "--keep":
            del shown[i:i + 2]
            break
        if x.startswith("--keep="):
            del shown[i]
            break
    cmd = "python -m bench fedavg" + "".join(f" {shlex.quote(x)}" for x in shown)
    lines = [
        "## Federated averaging and ensembles (digits_cnn, digits)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} cores ({_cpu_name()}), "
        f"Python {platform.python_version()} ({seconds / 60:.1f} min in all). `{cmd}` reproduces it; "
        "every step is a subprocess running the CLIs a user runs.",
        "",
        f"Two clients, {a.rounds} rounds, {E} local epoch{'s' * (E != 1)} per round, trainer defaults otherwise "
        "(Adam, lr 1e-3, batch 32; each round starts a fresh optimizer, as any `--init` run does). "
        f"Round r: `python -m trainer --init GLOBAL_r-1 --client K --clients 2 --split SPLIT --epochs {E} "
        f"--seed {a.seed} --threads 1 --out r/cK --quiet` for both clients at once, then "
        "`python -m merge fedavg r/c0 r/c1 -o r/global` (weighted by samples seen), GLOBAL_0 being "
        "`python -m trainer init --model digits_cnn`. Centralized baseline: one run on all "
        f"{sum(res['fed'][0]['sizes'])} training samples from the same init for {a.rounds} x {E} = "
        f"{a.rounds * E} epochs, the same samples as both clients together. Accuracy is "
        "`python -m merge evaluate ... --data digits` on the full test split (359 samples, all ten classes), "
        "so a client that saw five classes scores at most about 0.5; one test sample is 0.0028 of accuracy. "
        f"All clients and rounds use `--seed {a.seed}`: the trainer's seed is also the split's seed, so clients "
        "with different seeds would draw overlapping shares, and a new seed per round would redraw the "
        "Dirichlet shares.",
        "",
    ]
    for f in res["fed"]:
        ratio, at, first = _target(f, central, TARGET_ROUNDS)
        counts = "; ".join(f"client {k}: {f['sizes'][k]} samples, per class {f['counts'][k]}" for k in range(2))
        lines += [
            f"### `--split {f['split']}`",
            "",
            counts,
            "",
            "| round | client 0 | client 1 | FedAvg | FedAvg / centralized | centralized after the same samples |",
            "|---|---|---|---|---|---|",
        ]
        for r in f["rounds"]:
            same = curve[r["round"] * E - 1] if r["round"] * E <= len(curve) else float("nan")
            lines.append(f"| {r['round']} | {r['clients'][0]:.4f} | {r['clients'][1]:.4f} | **{r['fedavg']:.4f}** | "
                         f"{r['fedavg'] / central:.3f} | {same:.4f} |")
        lines += [
            "",
            f"Centralized ({a.rounds * E} epochs): {central:.4f}. Best FedAvg/centralized within "
            f"{min(TARGET_ROUNDS, a.rounds)} rounds: {ratio:.3f} (round {at}); "
            + (f"first at or above {TARGET_RATIO} in round {first}." if first else f"never at or above {TARGET_RATIO}.")
            + f" Last round: {f['rounds'][-1]['fedavg'] / central:.3f}. (Client accuracies from `merge evaluate` "
            f"agree with each trainer run's own final test accuracy within {f['max_eval_vs_manifest']:.1e}.)",
            "",
        ]
    pr = res["pair"]
    rows = pr["rows"]
    members, naive, ens = rows[:2], rows[2], rows[3]
    best = max(m["accuracy"] for m in members)
    worst = min(m["accuracy"] for m in members)
    ref = pr["refused"]
    lines += [
        "### Two independently initialized models",
        "",
        "Two machines, each with its own half of the training data and its own random initialization: "
        f"`python -m trainer --epochs {a.pair_epochs} --seed S --client K --clients 2 --split iid --split-seed 0 "
        f"--out seedS` for (S, K) = ({a.pair_seeds[0]}, 0) and ({a.pair_seeds[1]}, 1), no `--init` (disjoint "
        f"halves; different initial weights, lineages "
        f"`{pr['lineages'][0][:19]}...` and `{pr['lineages'][1][:19]}...`). "
        f"`python -m merge fedavg seed{a.pair_seeds[0]} seed{a.pair_seeds[1]} -o naive` refuses with exit {ref['code']}"
        + (", leaving no output" if not ref["left_output"] else ", BUT LEAVES AN OUTPUT BEHIND") + ":",
        "",
        *(f"> {l}" for l in (ref["stderr"] or "(no message)").splitlines()),
        "",
        "With `--force` it writes the naive average. The ensemble is `python -m merge ensemble "
        f"seed{a.pair_seeds[0]}/model.keras seed{a.pair_seeds[1]}/model.keras -o ensemble.keras` (mean of probabilities).",
        "",
        "| model | test accuracy | test loss |",
        "|---|---|---|",
        f"| member A (seed {a.pair_seeds[0]}) | {members[0]['accuracy']:.4f} | {members[0]['loss']:.4f} |",
        f"| member B (seed {a.pair_seeds[1]}) | {members[1]['accuracy']:.4f} | {members[1]['loss']:.4f} |",
        f"| naive weight average (`fedavg --force`) | {naive['accuracy']:.4f} | {naive['loss']:.4f} |",
        f"| ensemble (`merge ensemble`) | **{ens['accuracy']:.4f}** | {ens['loss']:.4f} |",
        "",
        "| target | value | met |",
        "|---|---|---|",
    ]
    for f in res["fed"]:
        ratio, at, first = _target(f, central, TARGET_ROUNDS)
        lines.append(f"| `{f['split']}`: FedAvg reaches >= {TARGET_RATIO} of centralized within "
                     f"{TARGET_ROUNDS} rounds | {ratio:.3f} (best, round {at}) | {'yes' if first else 'no'} |")
    beats = ens["accuracy"] > best
    lines += [
        f"| ensemble beats its best member | {ens['accuracy']:.4f} vs {best:.4f} | "
        f"{'yes' if beats else 'no (tie)' if ens['accuracy'] == best else 'no'} |",
        f"| naive average of different initializations is clearly worse than either member (expected) | "
        f"{naive['accuracy']:.4f} vs worst member {worst:.4f} | "
        f"{'yes' if naive['accuracy'] < worst - 0.05 else 'no'}"
        f"{'' if naive['accuracy'] >= worst - 0.05 else ', collapsed to chance' if naive['accuracy'] < 0.2 else ', though not collapsed to chance (0.10)'} |",
        f"| `merge fedavg` refuses different initializations without `--force` | exit {ref['code']} | "
        f"{'yes' if ref['code'] == 2 and not ref['left_output'] else 'no'} |",
    ]
    return "\n".join(lines) + "\n"


def plot(res: dict, a, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fed, central, curve, E = res["fed"], res["central"], res["central_curve"], a.local_epochs
    fig, axes = plt.subplots(1, len(fed) + 1, figsize=(5 * (len(fed) + 1), 4.2))
    for ax, f in zip(axes, fed):
        x = [r["round"] for r in f["rounds"]]
        for k, color in enumerate(("tab:orange", "tab:green")):
            ax.plot(x, [r["clients"][k] for r in f["rounds"]], "--o", ms=3, color=color, label=f"client {k}")
        ax.plot(x, [r["fedavg"] for r in f["rounds"]], "-o", ms=4, lw=2, color="tab:blue", label="FedAvg")
        ax.plot(x, [curve[r * E - 1] for r in x if r * E <= len(curve)], ":", color="gray",
                label="centralized, same samples so far")
        ax.axhline(central, color="black", lw=1, label=f"centralized, {a.rounds * E} epochs")
        ax.axhline(TARGET_RATIO * central, color="black", lw=0.8, ls="-.", label=f"{TARGET_RATIO} x centralized")
        ax.set_title(f"--split {f['split']}, {E} local epoch{'s' * (E != 1)}/round")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (all 10 classes)")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[-1]
    rows = res["pair"]["rows"]
    labels = [f"A (seed {a.pair_seeds[0]})", f"B (seed {a.pair_seeds[1]})", "naive average", "ensemble"]
    acc = [r["accuracy"] for r in rows]
    bars = ax.bar(labels, acc, color=["tab:gray", "tab:gray", "tab:red", "tab:blue"])
    for b, v in zip(bars, acc):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.4f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_title("two independently initialized models")
    ax.set_ylabel("test accuracy")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
