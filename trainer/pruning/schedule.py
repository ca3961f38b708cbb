"""When masks change and to what sparsity.

The two schedules of TensorFlow Model Optimization, written out here rather
than imported: TFMOT supports only Keras 2 and cannot be imported beside
Keras 3 (and on TF 2.15, importing it made later functional from_config
calls loop forever). Its schedules are the reference of
tests/test_prune_schedule.py (recorded in its own environment) and TFMOT
itself, in its own environment, the reference of bench/pruning.py.
"""
from __future__ import annotations


class Schedule:
    """polynomial: Zhu & Gupta (2017), s(t) = s_f (1 - (1 - (t - t0) / (t1 - t0))^3)
    rising from 0 at `begin` to `target` at `end`; constant: `target` from
    `begin` on. Masks update on steps `begin + k * every` inside
    [begin, end] (end < 0: no end), and on `end` itself, which TFMOT skips
    when the span is not a multiple of `every`, leaving the target unmet.
    """

    def __init__(self, kind: str, target: float, begin: int, end: int, every: int):
        self.kind, self.target, self.begin, self.end, self.every = kind, target, begin, end, every

    def at(self, step: int) -> tuple[bool, float]:
        in_range = step >= self.begin and (self.end < 0 or step <= self.end)
        should = in_range and ((step - self.begin) % self.every == 0 or step == self.end)
        if self.kind == "constant":
            return should, self.target
        progress = min(1.0, max(0.0, (step - self.begin) / (self.end - self.begin)))
        return should, self.target * (1.0 - (1.0 - progress) ** 3)
