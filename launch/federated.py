"""`launch federated`: rounds of local training and aggregation on one machine.

Each round the sampled clients (all of them, or `--clients-per-round K`
drawn with a seeded generator) train from the current global on their own
shares, then the server step makes the next global: `merge fedavg` (with
`merge server-step` under --server-opt) or, for SCAFFOLD, `merge scaffold`.

Two engines run a round. `Processes` runs exactly the CLIs a user runs by
hand on separate machines (README), as subprocesses, so nothing differs:
`python -m trainer --init GLOBAL --client K ...`, itself a horovodrun job
when --np > 1. `--simulate` (`Simulated`) trains every client in this
process through trainer.simulate and aggregates in memory with the merge's
own rules (merge.aggregate, merge.server, merge.scaffold), writing only the
globals.
"""
from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.errors import UsageError

ALGORITHMS = ("fedavg", "fedprox", "scaffold")

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
    algorithm: str = "fedavg"
    prox_mu: float | None = None      # fedprox's mu (default 0.01)
    clients_per_round: int | None = None
    simulate: bool = False
    lr_decay: float = 1.0             # client --lr x lr_decay^(round - 1)

    def validate(self) -> None:
        for name in ("clients", "rounds", "local_epochs", "np"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.algorithm not in ALGORITHMS:
            raise UsageError(f"--algorithm {self.algorithm}: choose one of {', '.join(ALGORITHMS)}")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.clients:
            raise UsageError(f"--clients-per-round {self.clients_per_round}: must be between 1 and --clients "
                             f"{self.clients}")
        if self.prox_mu is not None and self.algorithm != "fedprox":
            raise UsageError("--prox-mu is FedProx's mu; add --algorithm fedprox")
        if self.prox_mu is not None and not 0 <= self.prox_mu < float("inf"):
            raise UsageError(f"--prox-mu {self.prox_mu}: must be a finite number >= 0")
        for flag in ("--prox-mu", "--scaffold", "--client", "--clients", "--init", "--out", "--split", "--epochs"):
            if any(a == flag or a.startswith(flag + "=") for a in self.trainer_args):
                raise UsageError(f"{flag} after --: launch federated sets it for every client; use "
                                 f"{'--algorithm fedprox --prox-mu' if flag == '--prox-mu' else 'its launch option'}"
                                 " instead")
        if self.algorithm == "scaffold" and self.aggregator != "mean":
            raise UsageError("--algorithm scaffold averages with its own server step (merge scaffold): "
                             "drop --aggregator")
        if not 0 < self.lr_decay <= 1:
            raise UsageError(f"--lr-decay {self.lr_decay}: must be in (0, 1] (1: the same --lr every round)")
        if not self.server_lr > 0:
            raise UsageError(f"--server-lr {self.server_lr}: must be > 0")
        if self.simulate and self.np > 1:
            raise UsageError("--simulate runs every client in this process, one replica each; drop --np")
        if self.simulate and self.aggregator.startswith("krum"):
            raise UsageError("--aggregator krum is not simulated; drop --simulate")
        if self.simulate:
            from trainer.simulate import check
            check(self.client_options(self.init or "init"))
        if self.out.exists() and any(self.out.iterdir()):
            raise UsageError(f"--out {self.out} is not empty; choose a new directory")
        if self.np > 1 and not shutil.which("horovodrun"):
            raise UsageError("--np > 1 runs each client under horovodrun, which is not on PATH; ./run setup")
        self._check_shares()

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.clients

    def sample(self, r: int) -> list[int]:
        """The clients of round `r`: all, or K drawn without replacement from
        a generator seeded by (--seed, r), the same on every rerun."""
        if self.per_round == self.clients:
            return list(range(self.clients))
        rng = np.random.default_rng([self.seed, r])
        return sorted(int(k) for k in rng.choice(self.clients, self.per_round, replace=False))

    def client_seed(self, r: int, k: int) -> int:
        return self.seed + r * 1000 + k

    def client_lr(self, r: int) -> float:
        """Round r's client learning rate: the trainer's --lr (given after --, or
        its default) decayed by --lr-decay per round."""
        from trainer.cli import train_parser
        base = train_parser().parse_args(["--client", "0", "--clients", "1", *self.trainer_args]).lr
        return base * self.lr_decay ** (r - 1)

    def client_args(self, init, r: int = 1) -> list[str]:
        """Trainer flags every client of round r shares (--client, --seed, --out and
        SCAFFOLD's previous run are per client)."""
        algorithm = {"fedprox": ["--prox-mu", 0.01 if self.prox_mu is None else self.prox_mu]}.get(self.algorithm, [])
        return [str(a) for a in ("--init", init, "--clients", self.clients, "--split", self.split,
                                 "--split-seed", self.seed, "--epochs", self.local_epochs, "--data", self.data,
                                 "--quiet", *(["--data-dir", self.data_dir] if self.data_dir else []),
                                 *algorithm, *self.trainer_args,
                                 *(["--lr", repr(self.client_lr(r))] if self.lr_decay != 1 else []))]

    def client_options(self, init):
        """The trainer Options of round 1's clients, from the trainer's own
        parser given the process path's command line: the same flags mean
        the same training."""
        from trainer.cli import train_parser
        from trainer.job import Options
        args = ["--client", "0", *self.client_args(init), *(["--scaffold"] if self.algorithm == "scaffold" else [])]
        parsed = vars(train_parser().parse_args(args))
        parsed["prune"] = parsed["prune"] or parsed["structured"]
        return Options(**parsed)

    def _check_shares(self) -> None:
        """Every client must get data; fail before any training starts. The
        data set is loaded once: a hundred clients of CIFAR-10 would read it a
        hundred times."""
        from dataclasses import replace

        from trainer.job import Options, client_share, load_data
        base = Options(data=self.data, data_dir=self.data_dir, seed=self.seed, split=self.split,
                       split_seed=self.seed)
        data = load_data(base, self.model)
        for k in range(self.clients):
            try:
                client_share(data, replace(base, client=k, clients=self.clients))
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


class Processes:
    """A round as the CLIs by hand: one trainer process (or horovodrun job) per client, then merge."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.last: dict[int, Path] = {}  # SCAFFOLD: each client's latest run holds its c_i

    def round(self, r: int, sampled: list[int], current) -> tuple[Path, list[float], dict]:
        from merge.evaluate import evaluate
        plan = self.plan
        round_dir = plan.out / f"round-{r:03d}"
        clients = [round_dir / f"client-{k}" for k in sampled]
        for k, client_dir in zip(sampled, clients):
            cmd = _python("trainer", "--client", k, "--seed", plan.client_seed(r, k), "--out", client_dir,
                          *plan.client_args(current, r))
            if plan.algorithm == "scaffold":
                cmd += ["--scaffold", *([str(self.last[k])] if k in self.last else [])]
            if plan.np > 1:
                cmd = [shutil.which("horovodrun"), "-np", str(plan.np), "--gloo", *cmd]
            _check(cmd, f"round {r} client {k}")
            self.last[k] = client_dir
        merged = round_dir / "global"
        average = round_dir / "average" if plan.server_opt else merged
        if plan.algorithm == "scaffold":
            _check(_python("merge", "scaffold", *clients, "--global", current, "-o", average, "--clients",
                           plan.clients, "--quiet"), f"round {r} scaffold")
        else:
            _check(_python("merge", "fedavg", *clients, "-o", average, "--quiet", "--aggregator", plan.aggregator),
                   f"round {r} fedavg")
        if plan.server_opt:  # FedAvgM / FedAdam / FedYogi: the average is a pseudo-gradient
            _check(_python("merge", "server-step", current, average, "-o", merged, "--optimizer",
                           plan.server_opt, "--server-lr", plan.server_lr, "--state",
                           plan.out / "server_state.h5"), f"round {r} server step")
        scores = evaluate([*map(str, clients), str(merged)], plan.data, plan.data_dir)
        return merged, [s["accuracy"] for s in scores[:-1]], scores[-1]


class Simulated:
    """A round in this process (trainer.simulate), aggregated in memory."""

    def __init__(self, plan: Plan, init):
        from trainer.files import controls
        from trainer.simulate import Simulation
        self.plan = plan
        self.sim = Simulation(plan.client_options(init))
        self.weights = self.sim.weights()
        self.controls: dict[int, dict] = {}
        self.server = None
        if plan.algorithm == "scaffold" and controls.path_of(init).is_file():
            self.server = controls.read(init, "server", self.sim.scaffold.shapes, "--init")[0]["control"]
        self.slots: list[dict] = [{} for _ in self.weights]  # --server-opt state per tensor
        self.round_of_init = self.sim.init_round

    def round(self, r: int, sampled: list[int], current) -> tuple[Path, list[float], dict]:
        from merge.aggregate import first_of, parse_aggregator
        from merge.scaffold import server_control
        from merge.server import RULES, step_tensor
        plan = self.plan
        self.sim.set_lr(plan.client_lr(r))
        results = [self.sim.client(k, plan.client_seed(r, k), self.weights, self.server, self.controls.get(k))
                   for k in sampled]
        total = float(sum(res.samples for res in results))
        shares = [res.samples / total for res in results]  # as merge fedavg weighs by samples seen
        rule = parse_aggregator(plan.aggregator, len(results))
        average = []
        for i, w in enumerate(self.weights):
            reads = ((res.weights[i].copy(), share, None) for res, share in zip(results, shares))
            average.append((rule.combine(reads) if np.issubdtype(w.dtype, np.floating) else first_of(reads))[0])
        if plan.server_opt:
            opt = RULES[plan.server_opt](plan.server_lr, 0.9, 0.99, 1e-3)
            for i, (prev, avg) in enumerate(zip(self.weights, average)):
                if np.issubdtype(prev.dtype, np.floating):
                    slots = self.slots[i] or {s: np.zeros(prev.shape) for s in opt.slots}
                    average[i] = step_tensor(opt, prev, avg, slots)
                    self.slots[i] = slots
        if plan.algorithm == "scaffold":
            self.server = server_control(self.server, [res.delta for res in results], plan.clients)
            self.controls.update((k, res.control) for k, res in zip(sampled, results))
        self.weights = average
        merged = plan.out / f"round-{r:03d}" / "global"
        merged.parent.mkdir(parents=True, exist_ok=True)
        record = {"method": plan.algorithm, "round": self.round_of_init + r, "samples_seen": int(total),
                  "inputs": [{"client": k, "samples_seen": res.samples} for k, res in zip(sampled, results)],
                  "simulated": True}
        self.sim.write_global(merged, average, record, self.server, plan.clients)
        return merged, [res.accuracy for res in results], self.sim.evaluate(average)


def run(plan: Plan, log=print) -> list[dict]:
    plan.validate()
    plan.out.mkdir(parents=True, exist_ok=True)
    current = plan.init
    if current is None:
        current = plan.out / "init"
        _check(_python("trainer", "init", "--model", plan.model, "--data", plan.data, "--seed", plan.seed,
                       "--out", current, *(["--data-dir", plan.data_dir] if plan.data_dir else [])),
               "trainer init")
    engine = Simulated(plan, current) if plan.simulate else Processes(plan)
    rows = []
    for r in range(1, plan.rounds + 1):
        sampled = plan.sample(r)
        merged, accuracies, scores = engine.round(r, sampled, current)
        row = {"round": r, "global_accuracy": scores["accuracy"], "global_loss": scores["loss"]}
        if plan.per_round == plan.clients:
            row.update({f"client{k}_accuracy": a for k, a in zip(sampled, accuracies)})
        else:
            row.update(clients_mean_accuracy=float(np.mean(accuracies)), sampled=" ".join(map(str, sampled)))
        rows.append(row)
        if not plan.quiet:
            clients_text = " ".join(f"{a:.4f}" for a in accuracies)
            log(f"round {r}/{plan.rounds}: clients {clients_text}  global {row['global_accuracy']:.4f}")
        current = merged
    _write_table(plan.out / "rounds.csv", rows)
    _plot(plan.out / "rounds.png", rows, plan)
    return rows


def format_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{k:>16}" for k in keys)]
    for row in rows:
        lines.append("  ".join(f"{row[k]:>16}" if isinstance(row[k], (int, str)) else f"{row[k]:>16.4f}"
                               for k in keys))
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
    if plan.per_round == plan.clients:
        for k in range(plan.clients):
            ax.plot(rounds, [r[f"client{k}_accuracy"] for r in rows], "--", alpha=0.6, label=f"client {k}")
    else:
        ax.plot(rounds, [r["clients_mean_accuracy"] for r in rows], "--", alpha=0.6,
                label=f"mean of the {plan.per_round} sampled clients")
    ax.plot(rounds, [r["global_accuracy"] for r in rows], "o-", lw=2, label=f"global ({plan.algorithm})")
    ax.set(xlabel="round", ylabel=f"test accuracy ({plan.data})", ylim=(0, 1),
           title=f"{plan.clients} clients, --split {plan.split}, {plan.local_epochs} local epoch(s)")
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
