"""`launch federated`: rounds of local training and FedAvg on one machine.

Each round every client trains from the current global checkpoint on its own
share of the data (`python -m trainer --init GLOBAL --client K ...`, itself a
horovodrun job when --np > 1: data-parallel inside a client, FedAvg across
clients), then `python -m merge fedavg` writes the next global checkpoint.
Both are the CLIs a user runs by hand on separate machines (README), here
run as subprocesses so that nothing differs.
"""
from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UsageError


@dataclass
class Plan:
    out: Path
    clients: int
    rounds: int
    local_epochs: int
    split: str = "iid"
    model: str = "digits_cnn"
    data: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    np: int = 1
    init: str | None = None
    aggregator: str = "mean"
    server_opt: str | None = None
    server_lr: float = 1.0
    trainer_args: list[str] = field(default_factory=list)
    quiet: bool = False

    def validate(self) -> None:
        for name in ("clients", "rounds", "local_epochs", "np"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.out.exists() and any(self.out.iterdir()):
            raise UsageError(f"--out {self.out} is not empty; choose a new directory")
        if self.np > 1 and not shutil.which("horovodrun"):
            raise UsageError("--np > 1 runs each client under horovodrun, which is not on PATH; ./run setup")
        self._check_shares()

    def _check_shares(self) -> None:
        """Every client must get data; fail before any training starts."""
        from trainer.job import Options, load_data
        for k in range(self.clients):
            try:
                load_data(Options(data=self.data, data_dir=self.data_dir, seed=self.seed, client=k,
                                  clients=self.clients, split=self.split, split_seed=self.seed), self.model)
            except UsageError as e:
                raise UsageError(f"--split {self.split} with {self.clients} clients: {e}; use fewer clients "
                                 "or another split") from None


def _python(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _check(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{what} failed with exit {proc.returncode}: {tail}")


def run(plan: Plan, log=print) -> list[dict]:
    from merge.evaluate import evaluate
    plan.validate()
    plan.out.mkdir(parents=True, exist_ok=True)
    current = plan.init
    if current is None:
        current = plan.out / "init"
        _check(_python("trainer", "init", "--model", plan.model, "--data", plan.data, "--seed", plan.seed,
                       "--out", current, *(["--data-dir", plan.data_dir] if plan.data_dir else [])),
               "trainer init")
    rows = []
    for r in range(1, plan.rounds + 1):
        round_dir = plan.out / f"round-{r:03d}"
        clients = [round_dir / f"client-{k}" for k in range(plan.clients)]
        for k, client_dir in enumerate(clients):
            cmd = _python("trainer", "--init", current, "--client", k, "--clients", plan.clients,
                          "--split", plan.split, "--split-seed", plan.seed, "--seed", plan.seed + r * 1000 + k,
                          "--epochs", plan.local_epochs, "--data", plan.data, "--out", client_dir, "--quiet",
                          *(["--data-dir", plan.data_dir] if plan.data_dir else []), *plan.trainer_args)
            if plan.np > 1:
                cmd = [shutil.which("horovodrun"), "-np", str(plan.np), "--gloo", *cmd]
            _check(cmd, f"round {r} client {k}")
        merged = round_dir / "global"
        average = round_dir / "average" if plan.server_opt else merged
        _check(_python("merge", "fedavg", *clients, "-o", average, "--quiet", "--aggregator", plan.aggregator),
               f"round {r} fedavg")
        if plan.server_opt:  # FedAvgM / FedAdam / FedYogi: the average is a pseudo-gradient
            _check(_python("merge", "server-step", current, average, "-o", merged, "--optimizer", plan.server_opt,
                           "--server-lr", plan.server_lr, "--state", plan.out / "server_state.h5"),
                   f"round {r} server step")
        scores = evaluate([*map(str, clients), str(merged)], plan.data, plan.data_dir)
        row = {"round": r, "global_accuracy": scores[-1]["accuracy"], "global_loss": scores[-1]["loss"],
               **{f"client{k}_accuracy": s["accuracy"] for k, s in enumerate(scores[:-1])}}
        rows.append(row)
        if not plan.quiet:
            clients_text = " ".join(f"{s['accuracy']:.4f}" for s in scores[:-1])
            log(f"round {r}/{plan.rounds}: clients {clients_text}  global {row['global_accuracy']:.4f}")
        current = merged
    _write_table(plan.out / "rounds.csv", rows)
    _plot(plan.out / "rounds.png", rows, plan)
    return rows


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{k:>16}" for k in keys)]
    for row in rows:
        lines.append("  ".join(f"{row[k]:>16}" if isinstance(row[k], int) else f"{row[k]:>16.4f}" for k in keys))
    return "\n".join(lines)


def _write_table(path: Path, rows: list[dict]) -> None:
    from trainer.checkpoint import atomic_write_bytes
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def _plot(path: Path, rows: list[dict], plan: Plan) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.checkpoint import atomic_write
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in rows]
    for k in range(plan.clients):
        ax.plot(rounds, [r[f"client{k}_accuracy"] for r in rows], "--", alpha=0.6, label=f"client {k}")
    ax.plot(rounds, [r["global_accuracy"] for r in rows], "o-", lw=2, label="global (FedAvg)")
    ax.set(xlabel="round", ylabel=f"test accuracy ({plan.data})", ylim=(0, 1),
           title=f"{plan.clients} clients, --split {plan.split}, {plan.local_epochs} local epoch(s)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
