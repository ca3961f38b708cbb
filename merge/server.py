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


def hyperparameters(rule: str, lr: float, beta1: float, beta2: float, tau: float) -> dict:
    """What a rule's state depends on: FedAvgM's momentum is built with lr and
    beta1 only; the adaptive rules' moments with all four."""
    used = {"server_lr": lr, "beta1": beta1}
    if rule != "fedavgm":
        used.update(beta2=beta2, tau=tau)
    return used


def _describe(rule: str, params: dict) -> str:
    return f"{rule} (" + ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in params.items()) + ")"


def check_state(f: h5py.File, path: str, rule: str, params: dict, warnings: list[str]) -> None:
    """Refuse a --state another rule or other hyperparameters wrote: its
    moments would steer this rule's steps. A file from before the record
    (slots only) is accepted when its slots fit the rule, with a warning."""
    recorded = f.attrs.get("rule")
    if recorded is None:
        slots = sorted(k for k in f.keys())
        if slots and slots != sorted(RULES[rule].slots):
            raise UsageError(f"--state {path} holds the slots {', '.join(slots)}, not those of {rule} "
                             f"({', '.join(RULES[rule].slots)}): another server optimizer wrote it; "
                             "give a new --state file to start this one fresh")
        warnings.append(f"--state {path} does not record which optimizer wrote it (an older version); "
                        f"continuing it as {_describe(rule, params)}, which it records from now on")
        return
    recorded = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
    theirs = {k: float(f.attrs[k]) for k in hyperparameters(recorded, 0, 0, 0, 0) if k in f.attrs}
    if recorded != rule or theirs != params:
        raise UsageError(f"--state {path} was written by {_describe(recorded, theirs)}, but this step is "
                         f"{_describe(rule, params)}; pass the same --optimizer and hyperparameters to "
                         "continue it, or give a new --state file to start fresh")


def server_step(prev: str, average: str, out: str, rule: str, state: str, lr: float = 1.0,
                beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, overwrite: bool = False) -> dict:
    """New global = rule(previous global, this round's FedAvg). `state` is
    created on the first round and updated in place (temporary + rename);
    it records the rule and its hyperparameters, and a mismatch is refused."""
    if rule not in RULES:
        raise UsageError(f"--optimizer {rule}: choose one of {', '.join(RULES)}")
    for flag, value, ok in (("--server-lr", lr, lr > 0), ("--tau", tau, tau > 0),
                            ("--beta1", beta1, 0 <= beta1 < 1), ("--beta2", beta2, 0 <= beta2 < 1)):
        if not ok:
            raise UsageError(f"{flag} {value:g}: must be " + ("> 0" if flag in ("--server-lr", "--tau")
                                                               else "in [0, 1)"))
    check_output(out, [prev, average], overwrite)
    opt = RULES[rule](lr, beta1, beta2, tau)
    params = hyperparameters(rule, lr, beta1, beta2, tau)
    warnings: list[str] = []
    state_path = Path(state)
    if state_path.is_dir():
        raise UsageError(f"--state {state}: is a directory; give an HDF5 file name (created if missing)")
    if not state_path.parent.is_dir():
        raise UsageError(f"--state {state}: directory {state_path.parent} does not exist")
    old = None
    if state_path.exists():
        from trainer.files.hdf5 import open_h5
        old = open_h5(state_path, f"--state {state}")
        try:
            check_state(old, state, rule, params, warnings)
        except BaseException:
            old.close()
            raise
    with Inputs([prev, average]) as inputs:
        keys = inputs.check_tensors()
        a, b = inputs.sources
        tmp_state = state_path.with_name(f".{state_path.name}.tmp")
        writer = WeightsWriter(out, inputs.config)
        try:
            with h5py.File(tmp_state, "w") as new_state:
                new_state.attrs["rule"] = rule
                for k, v in params.items():
                    new_state.attrs[k] = v
                found = 0
                for key in keys:
                    shape, dtype = a.info(key)
                    x = np.asarray(a.read(key))
                    out_key = inputs.output_key(key)
                    if not np.issubdtype(dtype, np.floating):
                        writer.create(out_key, shape, dtype)[()] = x
                        continue
                    # Keyed as the output names the tensor, whatever PREVIOUS's own
                    # naming (an init's variable keys, a merge's Keras paths), so the
                    # next round finds it; a state keyed by the input's name still reads.
                    slots = {}
                    for s in opt.slots:
                        stored = _stored(old, s, out_key, key)
                        found += stored is not None
                        slots[s] = np.zeros(shape) if stored is None else stored
                    writer.create(out_key, shape, dtype)[()] = step_tensor(opt, x, b.read(key), slots)
                    for s, v in slots.items():
                        new_state.create_dataset(f"{s}/{out_key}", data=v)
                if old is not None and not found and any(isinstance(old[k], h5py.Group) for k in old):
                    raise UsageError(f"--state {state} holds moments for none of {prev}'s tensors (another "
                                     "model's, or named as an older version named them); give a new --state "
                                     "file to start fresh")
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
    manifest["warnings"] = warnings
    return manifest


def _stored(state, slot: str, *names):
    """A slot's stored value under the first of `names` it has, or None."""
    if state is None:
        return None
    for name in names:
        if f"{slot}/{name}" in state:
            return state[f"{slot}/{name}"][()]
    return None


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
    keep = ("model", "lineage", "round", "samples_seen", "inputs", "mask_policy", "aggregator", "data")
    return {k: source.manifest.get(k) for k in keep}
