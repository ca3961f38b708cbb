"""`launch federated`: rounds of local training and aggregation on one machine.

Each round the sampled clients (all of them, or `--clients-per-round K`
drawn with a seeded generator) train from the current global on their own
shares, then the server step makes the next global: `merge fedavg` (with
`merge server-step` under --server-opt) or, for SCAFFOLD, `merge scaffold`.
The engines that run a round are in launch/engines.py, the record of the
rounds (round.json, rounds.csv, rounds.png) in launch/rounds.py.

The plan (every flag that decides what is trained) is written to
OUT/plan.json before anything runs. `--resume` checks the flags given
against it, clears what an interrupted round left, and continues from the
last complete round; --rounds may grow, to train on.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.errors import UsageError

from .rounds import complete_records, round_dir, write_record, write_tables

ALGORITHMS = ("fedavg", "fedprox", "scaffold")
PLAN = "plan.json"
# Plan fields recorded in plan.json and the flag that sets each: a resumed
# run must give the same. --rounds may differ (more rounds: train on).
RECORDED = {"clients": "--clients", "local_epochs": "--local-epochs", "split": "--split", "model": "--model",
            "data": "--data", "data_dir": "--data-dir", "seed": "--seed", "np": "--np", "init": "--init",
            "aggregator": "--aggregator", "server_opt": "--server-opt", "server_lr": "--server-lr",
            "algorithm": "--algorithm", "prox_mu": "--prox-mu", "clients_per_round": "--clients-per-round",
            "simulate": "--simulate", "lr_decay": "--lr-decay", "trainer_args": "the trainer flags after --"}
# Trainer flags launch sets for every client, and what to use instead.
LAUNCH_SETS = {"client": "--clients", "clients": "--clients", "init": "--init", "out": "-o/--out",
               "split": "--split", "split_seed": "--seed", "epochs": "--local-epochs", "seed": "--seed",
               "model": "--model", "data": "--data", "data_dir": "--data-dir", "resume": "--resume",
               "prox_mu": "--algorithm fedprox --prox-mu", "scaffold": "--algorithm scaffold",
               "quiet": "--quiet", "json": "--json"}


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
    resume: bool = False

    def validate(self) -> None:
        self.out = Path(self.out)
        # A round averages two clients at least (merge fedavg takes two inputs)
        for name, least in (("clients", 2), ("rounds", 1), ("local_epochs", 1), ("np", 1)):
            if getattr(self, name) < least:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least {least}")
        if self.algorithm not in ALGORITHMS:
            raise UsageError(f"--algorithm {self.algorithm}: choose one of {', '.join(ALGORITHMS)}")
        if self.clients_per_round is not None and not 2 <= self.clients_per_round <= self.clients:
            raise UsageError(f"--clients-per-round {self.clients_per_round}: must be between 2 and --clients "
                             f"{self.clients}")
        if self.prox_mu is not None and self.algorithm != "fedprox":
            raise UsageError("--prox-mu is FedProx's mu; add --algorithm fedprox")
        if self.prox_mu is not None and not 0 <= self.prox_mu < float("inf"):
            raise UsageError(f"--prox-mu {self.prox_mu}: must be a finite number >= 0")
        self._check_trainer_args()
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
        if not self.resume and self.out.exists() and any(self.out.iterdir()):
            raise UsageError(f"--out {self.out} is not empty; pass --resume to continue its rounds, or choose "
                             "a new directory")
        if self.np > 1 and not shutil.which("horovodrun"):
            raise UsageError("--np > 1 runs each client under horovodrun, which is not on PATH; ./run setup")
        self._check_shares()

    def _check_trainer_args(self) -> None:
        """The trainer flags after -- parsed by the trainer's own parser (so
        an abbreviation such as --epoch is caught too); those launch sets
        for every client are refused, naming the launch option to use."""
        from trainer.cli import train_parser
        p = train_parser()
        unset = object()
        p.set_defaults(**{a.dest: unset for a in p._actions if a.dest != "help"})
        try:
            given = vars(p.parse_args(self.trainer_args))
        except UsageError as e:
            raise UsageError(f"trainer flags after --: {e}".replace("(see --help)", "(see python -m trainer "
                                                                     "--help)")) from None
        flags = {a.dest: max(a.option_strings, key=len) for a in p._actions if a.option_strings}
        for dest, instead in LAUNCH_SETS.items():
            if given.get(dest, unset) is not unset:
                raise UsageError(f"{flags[dest]} after --: launch federated sets it for every client; use "
                                 f"{instead} before -- instead")

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.clients

    def model_name(self) -> str:
        """The model the rounds train: --init's, when it records one."""
        if self.init:
            from trainer.init import read_init
            recorded = read_init(self.init).get("model")
            if isinstance(recorded, dict) and isinstance(recorded.get("name"), str):
                return recorded["name"]
        return self.model

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
                                 *(["--data-dir", self.data_dir] if self.data_dir else []),
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

    def recorded(self) -> dict:
        plan = {name: getattr(self, name) for name in RECORDED}
        plan["init"] = str(Path(self.init).resolve()) if self.init else None
        return {"rounds": self.rounds, **plan}


def prepare(plan: Plan) -> list[dict]:
    """A new run: OUT/plan.json. A resumed one: the records of its complete
    rounds, the plan checked against OUT/plan.json, the leftovers of an
    interrupted round removed."""
    from trainer.checkpoint import atomic_write_json
    path = plan.out / PLAN
    if not plan.resume:
        plan.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, plan.recorded())
        return []
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--resume: {path} does not exist, so --out {plan.out} holds no launch federated run "
                         "to continue; drop --resume to start one") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume: {path} is unreadable ({e.__class__.__name__}); choose a new --out") from None
    mine = plan.recorded()
    for name, flag in RECORDED.items():
        if recorded.get(name) != mine[name]:
            theirs = recorded.get(name)
            if name == "simulate":
                fix = f"{'add' if theirs else 'drop'} --simulate"
            elif name == "trainer_args":
                fix = f"pass -- {' '.join(theirs or [])}" if theirs else "pass none"
            else:
                fix = f"pass {flag} {theirs}" if theirs is not None else f"drop {flag}"
            raise UsageError(f"--resume: {flag} differs from the run in {plan.out} ({mine[name]} here, "
                             f"{theirs} in {PLAN}); {fix}, or choose a new --out")
    records = complete_records(plan.out)
    if plan.rounds < len(records):
        raise UsageError(f"--rounds {plan.rounds}: {plan.out} already has {len(records)} complete rounds; "
                         f"pass --rounds {len(records)} or more")
    for d in plan.out.glob("round-*"):
        if d.name[6:].isdigit() and int(d.name[6:]) > len(records):  # an interrupted round: redone
            shutil.rmtree(d)
    for tmp in plan.out.glob(".*.tmp"):  # a table or plan being written when the run was killed
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    atomic_write_json(path, mine)
    return records


def run(plan: Plan, log=print) -> list[dict]:
    """The rounds of `plan` (the rest of them, with --resume); the records
    of every complete round. `log` gets the progress lines."""
    from .engines import Processes, Simulated, python, run_logged
    plan.validate()
    records = prepare(plan)
    current = plan.init
    if current is None:
        current = plan.out / "init"
        if not (current / "model.keras").is_file():  # written last: an init killed midway is redone
            shutil.rmtree(current, ignore_errors=True)
            run_logged(python("trainer", "init", "--model", plan.model, "--data", plan.data, "--seed", plan.seed,
                              "--out", current, *(["--data-dir", plan.data_dir] if plan.data_dir else [])),
                       plan.out / "init.log", "trainer init")

    def report(r, i, n, client):
        if not plan.quiet:
            log(f"round {r}/{plan.rounds} client {i}/{n} (client-{client['client']}): accuracy "
                f"{client['accuracy']:.4f}, {client['seconds']:.0f} s")

    engine = Simulated(plan, current, report) if plan.simulate else Processes(plan, report)
    if records:
        current = round_dir(plan.out, len(records)) / "global"
        engine.restore(records, current)
        if not plan.quiet:
            log(f"resuming {plan.out} after round {len(records)} of {plan.rounds}")
    write_tables(plan, records)
    for r in range(len(records) + 1, plan.rounds + 1):
        merged, clients, scores = engine.round(r, plan.sample(r), current)
        record = {"round": r, "clients": clients, "global_accuracy": scores["accuracy"],
                  "global_loss": scores["loss"], "global": str(merged.relative_to(plan.out))}
        write_record(plan.out, record)
        records.append(record)
        write_tables(plan, records)
        if not plan.quiet:
            clients_text = " ".join(f"{c['accuracy']:.4f}" for c in clients)
            log(f"round {r}/{plan.rounds}: clients {clients_text}  global {record['global_accuracy']:.4f}")
        current = merged
    return records
