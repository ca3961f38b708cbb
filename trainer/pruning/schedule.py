"""When masks change and to what sparsity: TensorFlow Model Optimization's
schedules, asked in Python between steps."""
from __future__ import annotations

from tensorflow_model_optimization.python.core.sparsity.keras import pruning_schedule as tfmot_schedule


class Schedule:
    """Wraps a TFMOT PolynomialDecay (Zhu & Gupta's gradual cubic schedule) or
    ConstantSparsity for one target.

    TFMOT prunes only on steps where (step - begin) % frequency == 0, so when
    the span is not a multiple of the frequency the final target would never
    be applied; the end step is added as an update step for that reason.
    """

    def __init__(self, kind: str, target: float, begin: int, end: int, every: int):
        self.end = end
        if kind == "polynomial":
            self._tfmot = tfmot_schedule.PolynomialDecay(0.0, target, begin, end, power=3, frequency=every)
        else:
            self._tfmot = tfmot_schedule.ConstantSparsity(target, begin, end, frequency=every)

    def at(self, step: int) -> tuple[bool, float]:
        should, sparsity = self._tfmot(step)
        return bool(should) or step == self.end, float(sparsity)
