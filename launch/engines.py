"""The two engines behind `launch federated`'s rounds.

`Processes` runs exactly the CLIs a user runs by hand on separate machines
(README), as subprocesses, so nothing differs: `python -m trainer --init
GLOBAL --client K ...`, itself a horovodrun job when --np > 1, then `merge
fedavg` / `server-step` / `scaffold`. Each one's stdout and stderr go to a
log in the round's directory, named by the error line if it fails.
`Simulated` (--simulate) trains every client in this process through
trainer.simulate and aggregates in memory with the merge's own rules
(merge.aggregate, merge.server, merge.scaffold), writing the globals and
what a resumed run needs (server state, SCAFFOLD's client controls).

Both take `restore(records, current)` after a resume: what the rounds so
far leave behind (server state, SCAFFOLD controls, the global weights) is
read back from the round directories, so the next round is the one an
uninterrupted run would have trained.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .rounds import round_dir

SERVER_STATE = "server_state.h5"
CLIENT_CONTROLS = "client_controls.h5"  # --simulate SCAFFOLD: the c_i of the round's clients


def python(module: str, *args) -> list[str]:
    # --verbose reaches them through DPT_NATIVE_LOGS (trainer/quiet.py); said again for whoever reads the log
    verbose = ["--verbose"] if os.environ.get("DPT_NATIVE_LOGS") == "1" and module in ("trainer", "merge") else []
    return [sys.executable, "-m", module, *map(str, args), *verbose]


def run_logged(cmd: list[str], log: Path, what: str) -> None:
    """Run `cmd` with its stdout and stderr appended to `log`; RuntimeError
    with the reason it gave (its `error:` line, else its last line) and the
    log's path if it fails."""
    with open(log, "ab") as f:
        from trainer import interrupts  # our SIGTERM/SIGINT reach the client's process group
        code = interrupts.call(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        raise RuntimeError(f"{what} failed ({how}): {_reason(log)}; its log: {log}")


def _reason(log: Path) -> str:
    with open(log, "rb") as f:
        f.seek(max(0, os.path.getsize(log) - 65536))
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    return lines[-1][:300] if lines else "(no output)"


def _write_h5(path: Path, groups: dict[str, dict[str, np.ndarray]], attrs: dict) -> None:
    """{group: {key: array}} to `path`, whole or not at all."""
    import h5py

    from trainer.checkpoint import shared_mode
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(attrs)
            for group, arrays in groups.items():
                for key, value in arrays.items():
                    f.create_dataset(f"{group}/{key}", data=value)
        os.chmod(tmp, shared_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Processes:
    """A round as the CLIs by hand: one trainer process (or horovodrun job) per client, then merge."""

    def __init__(self, plan, report):
        self.plan, self.report = plan, report
        self.last: dict[int, Path] = {}  # SCAFFOLD: each client's latest run holds its c_i

    def restore(self, records: list[dict], current) -> None:
        for record in records:
            for c in record["clients"]:
                self.last[c["client"]] = round_dir(self.plan.out, record["round"]) / f"client-{c['client']}"

    def round(self, r: int, sampled: list[int], current) -> tuple[Path, list[dict], dict]:
        from merge.evaluate import evaluate
        from trainer.checkpoint import read_manifest
        plan = self.plan
        d = round_dir(plan.out, r)
        d.mkdir(parents=True, exist_ok=True)
        clients, runs = [], []
        for i, k in enumerate(sampled, 1):
            client_dir = d / f"client-{k}"
            cmd = python("trainer", "--client", k, "--seed", plan.client_seed(r, k), "--out", client_dir,
                         *plan.client_args(current, r))
            if plan.algorithm == "scaffold":
                cmd += ["--scaffold", *([str(self.last[k])] if k in self.last else [])]
            if plan.np > 1:
                cmd = [shutil.which("horovodrun"), "-np", str(plan.np), "--gloo", *cmd]
            start = time.monotonic()
            run_logged(cmd, d / f"client-{k}.log", f"round {r} client {k}")
            self.last[k] = client_dir
            # The client's own final test (the whole test set, as merge evaluate scores it)
            accuracy = float(read_manifest(client_dir)["final"]["test_accuracy"])
            clients.append({"client": k, "accuracy": accuracy, "seconds": round(time.monotonic() - start, 1)})
            runs.append(client_dir)
            self.report(r, i, len(sampled), clients[-1])
        merged = d / "global"
        average = d / "average" if plan.server_opt else merged
        log = d / "merge.log"
        if plan.algorithm == "scaffold":
            run_logged(python("merge", "scaffold", *runs, "--global", current, "-o", average, "--clients",
                              plan.clients, "--quiet"), log, f"round {r} merge scaffold")
        else:
            run_logged(python("merge", "fedavg", *runs, "-o", average, "--quiet", "--aggregator", plan.aggregator),
                       log, f"round {r} merge fedavg")
        if plan.server_opt:  # FedAvgM / FedAdam / FedYogi: the average is a pseudo-gradient
            # Each round keeps its own state: a round redone after a crash
            # starts from the state of the round before, not a half-updated one.
            previous = round_dir(plan.out, r - 1) / SERVER_STATE
            if previous.is_file():
                shutil.copyfile(previous, d / SERVER_STATE)
            # merge server-step keys its state by the previous global's naming: an init
            # or run directory names variables ("dense1/kernel"), a merge directory
            # Keras's weights ("dense1/0"), so round 2 would find none of round 1's
            # moments. The run's own model.keras has the merge directories' naming.
            prev = Path(current) / "model.keras" if (Path(current) / "model.keras").is_file() else current
            run_logged(python("merge", "server-step", prev, average, "-o", merged, "--optimizer",
                              plan.server_opt, "--server-lr", plan.server_lr, "--state", d / SERVER_STATE),
                       log, f"round {r} merge server-step")
        (scores,) = evaluate([str(merged)], plan.data, plan.data_dir)
        return merged, clients, scores


class Simulated:
    """A round in this process (trainer.simulate), aggregated in memory."""

    def __init__(self, plan, init, report):
        from trainer.files import controls
        from trainer.files.naming import VariableLayout
        from trainer.simulate import Simulation
        from trainer.varnames import keys
        self.plan, self.report = plan, report
        self.sim = Simulation(plan.client_options(init))
        # The server state is keyed as merge server-step keys it (the weights
        # file's "dense1/0"), so a simulated run can go on by hand.
        layout = VariableLayout(model=self.sim.model)
        self.keys = [layout.key_of.get(k, k) for k in keys(self.sim.model.weights)]
        self.weights = self.sim.weights()
        self.controls: dict[int, dict] = {}
        self.server = None
        if plan.algorithm == "scaffold" and controls.path_of(init).is_file():
            self.server = controls.read(init, "server", self.sim.scaffold.shapes, "--init")[0]["control"]
        self.slots: list[dict] = [{} for _ in self.weights]  # --server-opt state per tensor
        self.round_of_init = self.sim.init_round

    def restore(self, records: list[dict], current) -> None:
        import h5py

        from trainer.files import controls
        from trainer.init import load_initial_weights
        load_initial_weights(self.sim.model, current)
        self.weights = self.sim.weights()
        if self.plan.algorithm == "scaffold":
            self.server = controls.read(current, "server", self.sim.scaffold.shapes, "--resume")[0]["control"]
            for record in records:
                with h5py.File(round_dir(self.plan.out, record["round"]) / CLIENT_CONTROLS, "r") as f:
                    for c in record["clients"]:
                        g = f[f"client-{c['client']}"]
                        self.controls[c["client"]] = {k: g[k][()] for k in self.sim.scaffold.shapes}
        if self.plan.server_opt:
            with h5py.File(round_dir(self.plan.out, len(records)) / SERVER_STATE, "r") as f:
                for i, key in enumerate(self.keys):
                    if all(f"{s}/{key}" in f for s in f):
                        self.slots[i] = {s: f[f"{s}/{key}"][()] for s in f}

    def round(self, r: int, sampled: list[int], current) -> tuple[Path, list[dict], dict]:
        from merge.aggregate import first_of, parse_aggregator
        from merge.scaffold import server_control
        from merge.server import RULES, hyperparameters, step_tensor
        plan = self.plan
        d = round_dir(plan.out, r)
        d.mkdir(parents=True, exist_ok=True)
        self.sim.set_lr(plan.client_lr(r))
        results, clients = [], []
        for i, k in enumerate(sampled, 1):
            start = time.monotonic()
            results.append(self.sim.client(k, plan.client_seed(r, k), self.weights, self.server,
                                           self.controls.get(k)))
            clients.append({"client": k, "accuracy": float(results[-1].accuracy),
                            "seconds": round(time.monotonic() - start, 1)})
            self.report(r, i, len(sampled), clients[-1])
        total = float(sum(res.samples for res in results))
        shares = [res.samples / total for res in results]  # as merge fedavg weighs by samples seen
        rule = parse_aggregator(plan.aggregator, len(results))
        average = []
        for i, w in enumerate(self.weights):
            reads = ((res.weights[i].copy(), share, None) for res, share in zip(results, shares))
            average.append((rule.combine(reads) if np.issubdtype(w.dtype, np.floating) else first_of(reads))[0])
        if plan.server_opt:
            beta1, beta2, tau = 0.9, 0.99, 1e-3  # merge server-step's defaults
            opt = RULES[plan.server_opt](plan.server_lr, beta1, beta2, tau)
            for i, (prev, avg) in enumerate(zip(self.weights, average)):
                if np.issubdtype(prev.dtype, np.floating):
                    slots = self.slots[i] or {s: np.zeros(prev.shape) for s in opt.slots}
                    average[i] = step_tensor(opt, prev, avg, slots)
                    self.slots[i] = slots
            _write_h5(d / SERVER_STATE, {s: {key: slots[s] for key, slots in zip(self.keys, self.slots) if slots}
                                         for s in opt.slots},
                      {"rule": plan.server_opt, **hyperparameters(plan.server_opt, plan.server_lr, beta1, beta2, tau)})
        if plan.algorithm == "scaffold":
            self.server = server_control(self.server, [res.delta for res in results], plan.clients)
            self.controls.update((k, res.control) for k, res in zip(sampled, results))
            _write_h5(d / CLIENT_CONTROLS, {f"client-{k}": res.control for k, res in zip(sampled, results)},
                      {"round": r})
        self.weights = average
        merged = d / "global"
        record = {"method": plan.algorithm, "round": self.round_of_init + r, "samples_seen": int(total),
                  "inputs": [{"client": k, "samples_seen": res.samples} for k, res in zip(sampled, results)],
                  "simulated": True}
        self.sim.write_global(merged, average, record, self.server, plan.clients)
        return merged, clients, self.sim.evaluate(average)
