"""Reference for the pruning benchmark: TensorFlow Model Optimization's
prune_low_magnitude on the same model, data and batch, trained with
model.fit and its UpdatePruningStep callback, beside the same model trained
densely with model.fit. Prints one JSON line: seconds per step of each.

TFMOT supports only Keras 2, so this runs in an environment of its own
(TF 2.15, tf-keras, TFMOT 0.8.0: bench/tfmot-requirements.txt, which
`./run bench` builds with a Python 3.11), never beside the project's Keras 3:

    $TFMOT_PYTHON bench/tfmot_reference.py --steps 40 --batch-size 64
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import sys  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

# TFMOT wraps tf_keras layers; trainer.models says `import keras`, which in
# this environment is a second, separate Keras 2. One Keras for both: the
# architecture is then exactly the trainer's.
sys.modules["keras"] = tf_keras
tf.keras = tf_keras

from trainer.models import build_model  # noqa: E402


class StepTimer(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t)


def seconds_per_step(model, x, y, batch, steps, callbacks=()):
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = StepTimer()
    model.fit(x, y, batch_size=batch, epochs=1, steps_per_epoch=steps + 1, verbose=0,
              callbacks=[timer, *callbacks], shuffle=False)
    return float(np.mean(timer.times[1:]))  # the first step compiles


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--every", type=int, default=10)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    n = a.batch_size * (a.steps + 1)
    x = rng.random((n, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, n)

    tf.keras.utils.set_random_seed(0)
    dense = seconds_per_step(build_model("cifar10_cnn", (32, 32, 3), 10), x, y, a.batch_size, a.steps)

    tf.keras.utils.set_random_seed(0)
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, a.sparsity, 0, a.steps, frequency=a.every)

    def wrap(layer):  # the custom LRN layer is not prunable: wrap conv and dense only
        if isinstance(layer, (tf.keras.layers.Conv2D, tf.keras.layers.Dense)):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    pruned_model = tf.keras.models.clone_model(build_model("cifar10_cnn", (32, 32, 3), 10), clone_function=wrap)
    pruned = seconds_per_step(pruned_model, x, y, a.batch_size, a.steps,
                              callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    print(json.dumps({"dense_s_per_step": dense, "pruned_s_per_step": pruned}))


if __name__ == "__main__":
    main()
