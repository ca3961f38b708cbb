"""Server-side optimizers for federated rounds (Reddi et al., 2021,
"Adaptive Federated Optimization"): the round's FedAvg result is read as a
pseudo-gradient delta = average - previous global, and an optimizer on the
server moves the global model along it. One small class per rule behind
`ServerRule.update`; state (momentum, second moments) lives in an HDF5 file
that survives from round to round.

FedAvg itself is FedAvgM with momentum 0 and server lr 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from trainer.checkpoint import package_versions
from trainer.errors import UsageError

from .inputs import Inputs
from .output import WeightsWriter, check_output


class ServerRule:
    slots: tuple[str, ...] = ()

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau

    def update(self, prev: np.ndarray, delta: np.ndarray, state: dict) -> np.ndarray:
        raise NotImplementedError


class FedAvgM(ServerRule):
    slots = ("m",)

    def update(self, prev, delta, state):
        state["m"] = self.beta1 * state["m"] + delta
        return prev + self.lr * state["m"]


class FedAdam(ServerRule):
    slots = ("m", "v")

    def update(self, prev, delta, state):
        state["m"] = self.beta1 * state["m"] + (1 - self.beta1) * delta
        state["v"] = self.beta2 * state["v"] + (1 - self.beta2) * delta ** 2
        return prev + self.lr * state["m"] / (np.sqrt(state["v"]) + self.tau)


class FedYogi(FedAdam):
    def update(self, prev, delta, state):
        d2 = delta ** 2
        state["m"] = self.beta1 * state["m"] + (1 - self.beta1) * delta
        # Yogi's additive second moment: v moves towards delta^2 by at most (1 - beta2) delta^2.
        state["v"] = state["v"] - (1 - self.beta2) * d2 * np.sign(state["v"] - d2)
        return prev + self.lr * state["m"] / (np.sqrt(state["v"]) + self.tau)


RULES = {"fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi}


def step_tensor(opt: ServerRule, previous: np.ndarray, average: np.ndarray, slots: dict) -> np.ndarray:
    """One tensor's new global value; `slots` ({slot: float64 array}) updated in place."""
    x64 = np.asarray(previous, np.float64)
    delta = np.asarray(average, np.float64) - x64
    return opt.update(x64, delta, slots).astype(np.asarray(previous).dtype)


def server_step(prev: str, average: str, out: str, rule: str, state: str, lr: float = 1.0,
                beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, overwrite: bool = False) -> dict:
    """New global = rule(previous global, this round's FedAvg). `state` is
    created on the first round and updated in place (temporary + rename)."""
    if rule not in RULES:
        raise UsageError(f"--optimizer {rule}: choose one of {', '.join(RULES)}")
    if not (lr > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
        raise UsageError("--server-lr and --tau must be > 0, --beta1 and --beta2 in [0, 1)")
    check_output(out, [prev, average], overwrite)
    opt = RULES[rule](lr, beta1, beta2, tau)
    state_path = Path(state)
    with Inputs([prev, average]) as inputs:
        keys = inputs.check_tensors()
        a, b = inputs.sources
        old = h5py.File(state_path, "r") if state_path.exists() else None
        tmp_state = state_path.with_name(f".{state_path.name}.tmp")
        writer = WeightsWriter(out, inputs.config)
        try:
            with h5py.File(tmp_state, "w") as new_state:
                for key in keys:
                    shape, dtype = a.info(key)
                    x = np.asarray(a.read(key))
                    if not np.issubdtype(dtype, np.floating):
                        writer.create(inputs.output_key(key), shape, dtype)[()] = x
                        continue
                    slots = {s: (old[f"{s}/{key}"][()] if old is not None and f"{s}/{key}" in old
                                 else np.zeros(shape)) for s in opt.slots}
                    writer.create(inputs.output_key(key), shape, dtype)[()] = step_tensor(opt, x, b.read(key), slots)
                    for s, v in slots.items():
                        new_state.create_dataset(f"{s}/{key}", data=v)
            manifest = {**_manifest_of(b), "kind": "merge", "method": f"server:{rule}",
                        "server": {"rule": rule, "lr": lr, "beta1": beta1, "beta2": beta2, "tau": tau,
                                   "previous": a.path, "average": b.path},
                        "versions": package_versions(), "paired_by_place": inputs.renamed or None}
            _carry_controls(average, writer.tmp, manifest, b.manifest)
            writer.commit(manifest, overwrite)
            manifest["pairing"] = inputs.pairing_note()
        except BaseException:
            writer.abort()
            tmp_state.unlink(missing_ok=True)
            raise
        finally:
            if old is not None:
                old.close()
        tmp_state.replace(state_path)
    return manifest


def _carry_controls(average: str, staged: Path, manifest: dict, recorded: dict) -> None:
    """A SCAFFOLD average (merge scaffold) keeps its server control: the
    server optimizer moves the weights, not c. Copied as bytes; whoever
    reads it (trainer --scaffold, merge scaffold) checks it."""
    import shutil

    from trainer.files import controls
    src = controls.path_of(average)
    if Path(average).is_dir() and src.is_file():
        shutil.copyfile(src, staged / controls.FILE)
        manifest["scaffold"] = recorded.get("scaffold")


def _manifest_of(source) -> dict:
    keep = ("model", "lineage", "round", "samples_seen", "inputs", "mask_policy", "aggregator")
    return {k: source.manifest.get(k) for k in keep}
