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
        """`protected`: {weight name: bool array} of entries never to prune (frozen)."""
        cfg.validate()
        self.cfg = cfg
        self.protected = protected or {}
        self.model = model
        chosen = select(model, cfg)
        # By default pruning ends at 3/4 of training, leaving the rest to
        # recover accuracy at the final sparsity.
        self.end = cfg.end if cfg.end != -1 else max(cfg.begin + 1, int(0.75 * total_steps))
        self.targets = {v.name: t for v, t in chosen}
        if cfg.structured:
            from .structured import check_sliceable
            self.layer_targets = {v.name.split("/")[0]: t for v, t in chosen}
            check_sliceable(model, layers=list(self.layer_targets))
            by_layer = {l.name: l for l in model.layers}
            variables = [w for name in self.layer_targets for w in (by_layer[name].kernel, by_layer[name].bias)
                         if w is not None]
            chosen = [(v, self.layer_targets[v.name.split("/")[0]]) for v in variables]
        self.schedules = [Schedule(cfg.schedule, target, cfg.begin, self.end, cfg.every) for _, target in chosen]
        self.maskset = MaskSet([v for v, _ in chosen], backend, keep_values=False, name="pruning")
        self.updates: list[dict] = []

    def before_step(self, step: int) -> None:
        plan = [s.at(step) for s in self.schedules]
        if not any(should for should, _ in plan):
            return
        if self.cfg.structured:
            arrays = self._unit_masks(plan)
        else:
            current = [m.numpy() for m in self.maskset.masks]
            arrays = [magnitude_mask(v.numpy(), sparsity, self.protected.get(v.name)) if should else old
                      for v, (should, sparsity), old in zip(self.maskset.targets, plan, current)]
        self.maskset.set(arrays)
        update = {"step": step, "sparsity": {v.name: float(1.0 - a.mean()) for v, a in zip(self.maskset.targets, arrays)}}
        if self.maskset.backend.num_replicas > 1:  # one replica: nothing to compare with
            update["checksums"] = self.maskset.verify()
        self.updates.append(update)

    def _unit_masks(self, plan) -> list[np.ndarray]:
        from .structured import select_units, unit_masks
        fractions = {v.name.split("/")[0]: sparsity for v, (_, sparsity) in zip(self.maskset.targets, plan)}
        masks = unit_masks(self.model, select_units(self.model, fractions))
        return [masks[v.name] for v in self.maskset.targets]

    def kept_units(self) -> dict:
        """{layer: kept unit indices} read off the current kernel masks."""
        keep = {}
        for v, m in zip(self.maskset.targets, self.maskset.masks):
            if v.name.endswith("kernel:0"):
                m = m.numpy()
                keep[v.name.split("/")[0]] = np.flatnonzero(m.reshape(-1, m.shape[-1]).any(axis=0))
        return keep

    def violations(self) -> int:
        """Masked-out entries that are not exactly zero, on this process."""
        count = 0
        for v, m in zip(self.maskset.targets, self.maskset.masks):
            for copy in self.maskset.backend.local_replica_values(v):
                count += int(np.count_nonzero(copy[m.numpy() == 0]))
        return count

    def summary(self) -> dict:
        return {"config": {**self.cfg.to_dict(), "end": self.end}, "targets": self.targets,
                "sparsity": self.maskset.sparsity(), "updates": self.updates[-20:]}
