"""Optimizer and the learning-rate rule for a larger global batch."""
from __future__ import annotations

import keras
import tensorflow as tf

from .errors import UsageError

OPTIMIZERS = ("adam", "sgd", "momentum")


@keras.saving.register_keras_serializable(package="trainer")
class WarmupScaled(keras.optimizers.schedules.LearningRateSchedule):
    """Ramp linearly from `base_lr` to `base_lr * scale` over `warmup_steps`.

    The rule of Goyal et al. (2017) that Horovod recommends. Horovod's own
    LearningRateWarmupCallback only drives `model.fit`; our loop is a custom
    one, so the same rule lives here as a schedule keyed on the optimizer's
    step counter, which the checkpoint restores on --resume.
    """

    def __init__(self, base_lr: float, scale: float, warmup_steps: int):
        self.base_lr = float(base_lr)
        self.scale = float(scale)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        if self.scale == 1.0 or self.warmup_steps <= 0:
            return tf.constant(self.base_lr * self.scale, tf.float32)
        frac = tf.minimum(1.0, tf.cast(step + 1, tf.float32) / self.warmup_steps)
        return self.base_lr * (1.0 + (self.scale - 1.0) * frac)

    def get_config(self):
        return {"base_lr": self.base_lr, "scale": self.scale, "warmup_steps": self.warmup_steps}


def make_optimizer(name: str, lr: float, scale: float, warmup_steps: int):
    if name not in OPTIMIZERS:
        raise UsageError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise UsageError(f"--lr must be positive, got {lr}")
    schedule = WarmupScaled(lr, scale, warmup_steps)
    if name == "adam":
        return keras.optimizers.Adam(schedule)
    return keras.optimizers.SGD(schedule, momentum=0.9 if name == "momentum" else 0.0)
