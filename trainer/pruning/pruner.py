"""Pruning on a schedule, masks identical on every replica.

Magnitude pruning zeroes single weights; structured pruning (--structured)
zeroes whole units (Dense outputs, Conv2D filters: kernel slice and bias)
by norm, so that the model can later be sliced smaller.
"""
from __future__ import annotations

import numpy as np

from .config import PruneConfig, select
from .masks import MaskSet, magnitude_mask
from .schedule import Schedule


class Pruner:
    def __init__(self, model, cfg: PruneConfig, backend, total_steps: int, protected: dict | None = None):
        """`protected`: {weight key: bool array} of entries never to prune (frozen)."""
        cfg.validate()
        self.cfg = cfg
        self.protected = protected or {}
        self.model = model
        chosen = select(model, cfg)
        # By default pruning ends at 3/4 of training, leaving the rest to
        # recover accuracy at the final sparsity.
        self.end = cfg.end if cfg.end != -1 else max(cfg.begin + 1, int(0.75 * total_steps))
        self.targets = {k: t for k, _, t in chosen}
        if cfg.structured:
            from ..varnames import key_map
            from .structured import check_sliceable
            self.layer_targets = {k.split("/")[0]: t for k, _, t in chosen}
            check_sliceable(model, layers=list(self.layer_targets))
            names = key_map(model.weights)
            by_layer = {l.name: l for l in model.layers}
            variables = [w for name in self.layer_targets
                         for w in (by_layer[name].kernel, getattr(by_layer[name], "bias", None)) if w is not None]
            chosen = [(names[id(v)], v, self.layer_targets[names[id(v)].split("/")[0]]) for v in variables]
        self.schedules = [Schedule(cfg.schedule, target, cfg.begin, self.end, cfg.every) for _, _, target in chosen]
        self.maskset = MaskSet({k: v for k, v, _ in chosen}, backend, keep_values=False, name="pruning")
        self.updates: list[dict] = []

    def before_step(self, step: int) -> None:
        plan = [s.at(step) for s in self.schedules]
        if not any(should for should, _ in plan):
            return
        if self.cfg.structured:
            arrays = self._unit_masks(plan)
        else:
            current = [m.numpy() for m in self.maskset.masks]
            arrays = [magnitude_mask(np.asarray(v.numpy()), sparsity, self.protected.get(k)) if should else old
                      for k, v, (should, sparsity), old
                      in zip(self.maskset.names, self.maskset.targets, plan, current)]
        self.maskset.set(arrays)
        update = {"step": step, "sparsity": {k: float(1.0 - a.mean()) for k, a in zip(self.maskset.names, arrays)}}
        if self.maskset.backend.num_replicas > 1:  # one replica: nothing to compare with
            update["checksums"] = self.maskset.verify()
        self.updates.append(update)

    def _unit_masks(self, plan) -> list[np.ndarray]:
        from .structured import select_units, unit_masks
        fractions = {k.split("/")[0]: sparsity for k, (_, sparsity) in zip(self.maskset.names, plan)}
        masks = unit_masks(self.model, select_units(self.model, fractions))
        return [masks[k] for k in self.maskset.names]

    def kept_units(self) -> dict:
        """{layer: kept unit indices} read off the current kernel masks."""
        keep = {}
        for k, m in zip(self.maskset.names, self.maskset.masks):
            if k.endswith("/kernel"):
                m = m.numpy()
                keep[k.split("/")[0]] = np.flatnonzero(m.reshape(-1, m.shape[-1]).any(axis=0))
        return keep

    def violations(self) -> np.ndarray:
        """Masked-out entries that are not exactly zero: a (replica, weight)
        table with this process's rows filled (zeros elsewhere), to be summed."""
        backend = self.maskset.backend
        table = np.zeros((backend.num_replicas, len(self.maskset.names)))
        for j, (v, m) in enumerate(zip(self.maskset.targets, self.maskset.masks)):
            pruned = m.numpy() == 0
            for replica, copy in zip(backend.local_replicas, backend.local_replica_values(v)):
                table[replica, j] = np.count_nonzero(copy[pruned])
        return table

    def summary(self) -> dict:
        return {"config": {**self.cfg.to_dict(), "end": self.end}, "targets": self.targets,
                "sparsity": self.maskset.sparsity(), "updates": self.updates[-20:]}
