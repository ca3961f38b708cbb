"""The record of `launch federated`'s rounds: round-NNN/round.json, rounds.csv, rounds.png.

A round's record (round.json) is written last, after its global model and
server state: a round is complete when its record and its global exist.
rounds.csv and rounds.png are rebuilt from the records after every round,
so a failure in round N keeps rounds 1..N-1 on disk, and a resumed run
(--resume) reads them back and goes on writing the same files.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from trainer.checkpoint import MANIFEST, atomic_write, atomic_write_bytes, atomic_write_json

RECORD = "round.json"
ALGORITHMS = {"fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD"}
SERVER_OPTS = {"fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi"}
FEW_POINTS = 25  # up to this many rounds every point gets a marker and a tick


def round_dir(out, r: int) -> Path:
    return Path(out) / f"round-{r:03d}"


def write_record(out, record: dict) -> None:
    atomic_write_json(round_dir(out, record["round"]) / RECORD, record)


def complete_records(out) -> list[dict]:
    """The records of rounds 1..R, each with its global on disk; R is the
    last complete round (a gap ends the run: later rounds started from it)."""
    records = []
    while True:
        d = round_dir(out, len(records) + 1)
        try:
            record = json.loads((d / RECORD).read_text())
        except (OSError, ValueError):
            return records
        if not isinstance(record, dict) or record.get("round") != len(records) + 1 \
                or not (d / "global" / MANIFEST).is_file():
            return records
        records.append(record)


def csv_row(record: dict, every_client: bool) -> dict:
    row = {"round": record["round"], "global_accuracy": record["global_accuracy"],
           "global_loss": record["global_loss"]}
    accuracies = [c["accuracy"] for c in record["clients"]]
    if every_client:
        row.update({f"client{c['client']}_accuracy": c["accuracy"] for c in record["clients"]})
    else:
        row.update(clients_mean_accuracy=sum(accuracies) / len(accuracies),
                   sampled=" ".join(str(c["client"]) for c in record["clients"]))
    return row


def write_tables(plan, records: list[dict]) -> None:
    """rounds.csv and rounds.png of the rounds so far, each replaced whole."""
    if not records:
        return
    rows = [csv_row(r, plan.per_round == plan.clients) for r in records]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(plan.out / "rounds.csv", buf.getvalue().encode())
    fig = figure(plan, rows)
    import matplotlib.pyplot as plt
    try:
        atomic_write(plan.out / "rounds.png", lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def global_label(plan) -> str:
    """What made the global model: algorithm, aggregator, server optimizer."""
    algorithm = ALGORITHMS[plan.algorithm]
    if plan.algorithm == "fedprox":
        algorithm += f" mu {0.01 if plan.prox_mu is None else plan.prox_mu:g}"
    server = (f"server {SERVER_OPTS[plan.server_opt]} lr {plan.server_lr:g}" if plan.server_opt
              else "no server optimizer")
    return f"global: {algorithm}, aggregator {plan.aggregator}, {server}"


def figure(plan, rows: list[dict]):
    """The rounds.png figure of csv rows (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rounds = [r["round"] for r in rows]
    few = len(rounds) <= FEW_POINTS
    client_style = dict(ls="--", alpha=0.6, marker="." if few else None)
    if plan.per_round == plan.clients:
        for k in range(plan.clients):
            ax.plot(rounds, [r[f"client{k}_accuracy"] for r in rows], label=f"client {k}", **client_style)
    else:
        ax.plot(rounds, [r["clients_mean_accuracy"] for r in rows],
                label=f"mean of the {plan.per_round} sampled clients", **client_style)
    ax.plot(rounds, [r["global_accuracy"] for r in rows], lw=2, marker="o" if few else None,
            label=global_label(plan))
    ax.set(xlabel="round", ylabel=f"test accuracy ({plan.data})", ylim=(0, 1), xlim=(0.5, max(rounds) + 0.5))
    ax.set_title(f"{plan.out.name}: {plan.model_name()} on {plan.data}\n{plan.clients} clients"
                 f"{f' ({plan.per_round} per round)' if plan.per_round != plan.clients else ''}, "
                 f"--split {plan.split}, {plan.local_epochs} local epoch{'s' if plan.local_epochs != 1 else ''}",
                 fontsize=10)
    if few:
        ax.set_xticks(rounds)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{k:>16}" for k in keys)]
    for row in rows:
        lines.append("  ".join(f"{row[k]:>16}" if isinstance(row[k], (int, str)) else f"{row[k]:>16.4f}"
                               for k in keys))
    return "\n".join(lines)
