"""Magnitude pruning on a schedule, masks identical on every replica."""
from __future__ import annotations

import numpy as np

from .config import PruneConfig, select
from .masks import MaskSet, magnitude_mask
from .schedule import Schedule


class Pruner:
    def __init__(self, model, cfg: PruneConfig, backend, total_steps: int):
        cfg.validate()
        self.cfg = cfg
        chosen = select(model.trainable_variables, cfg)
        # By default pruning ends at 3/4 of training, leaving the rest to
        # recover accuracy at the final sparsity.
        self.end = cfg.end if cfg.end != -1 else max(cfg.begin + 1, int(0.75 * total_steps))
        self.schedules = [Schedule(cfg.schedule, target, cfg.begin, self.end, cfg.every) for _, target in chosen]
        self.targets = {v.name: t for v, t in chosen}
        self.maskset = MaskSet([v for v, _ in chosen], backend, keep_values=False, name="pruning")
        self.updates: list[dict] = []

    def before_step(self, step: int) -> None:
        plan = [s.at(step) for s in self.schedules]
        if not any(should for should, _ in plan):
            return
        current = [m.numpy() for m in self.maskset.masks]
        arrays = [magnitude_mask(v.numpy(), sparsity) if should else old
                  for v, (should, sparsity), old in zip(self.maskset.targets, plan, current)]
        self.maskset.set(arrays)
        checksums = self.maskset.verify()
        self.updates.append({"step": step, "sparsity": self.maskset.sparsity(), "checksums": checksums})

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
