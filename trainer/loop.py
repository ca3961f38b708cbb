"""The training loop: one compiled step per global batch, metrics per epoch.

It talks to the backend only through the Backend interface, and to the
outside world only through a Reporter and a `save` callback.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import keras
import tensorflow as tf

from . import interrupts, sharding
from .backends.base import Backend
from .models import is_stateful, reset_stateful


@dataclass
class TrainState:
    epoch: int = 0          # epochs completed
    offset: int = 0         # samples of the current epoch already trained on
    step: int = 0           # global steps taken
    samples_seen: int = 0   # samples trained on, over all replicas and epochs

    def to_dict(self) -> dict:
        return asdict(self)


def per_sample_loss(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def make_replica_step(model, optimizer, backend: Backend, accum_steps: int = 1,
                      grad_hooks: Sequence[Callable] = (), after_update: Sequence[Callable] = ()):
    """The step each replica runs on its slice of the global batch.

    The replica's loss is its per-sample losses summed and divided by the
    GLOBAL sample count, so gradients summed over replicas are exactly the
    gradient of the global-batch mean even when slices differ in size.
    With `accum_steps` K the slice is cut into K micro-batches whose
    gradients are summed locally before one allreduce: K times fewer
    synchronizations at the memory cost of one micro-batch.
    `grad_hooks` transform gradients after the allreduce and `after_update`
    run after the optimizer (pruning masks and frozen weights live there).
    """
    variables = model.trainable_variables
    num_replicas = float(backend.num_replicas)

    def micro_step(x, y, global_count):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per = per_sample_loss(y, logits)
            loss = tf.reduce_sum(per) / global_count
            if model.losses:  # regularizers: counted once over all replicas and micro-batches
                loss += tf.add_n(model.losses) / (num_replicas * accum_steps)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float32))
        return tape.gradient(loss, variables), tf.reduce_sum(per), correct

    def replica_step(x, y, global_count):
        n = tf.shape(x)[0]
        grads, loss_sum, correct = None, 0.0, 0.0
        for i in range(accum_steps):
            lo, hi = n * i // accum_steps, n * (i + 1) // accum_steps
            g, l, c = micro_step(x[lo:hi], y[lo:hi], global_count)
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            loss_sum, correct = loss_sum + l, correct + c
        grads = backend.reduce_gradients(grads)
        for hook in grad_hooks:
            grads = hook(grads, variables)
        optimizer.apply_gradients(zip(grads, variables))
        for hook in after_update:
            hook()
        return [loss_sum, correct, tf.cast(n, tf.float32)]

    return replica_step


def variable_hook(own, fn):
    """A gradient hook that replaces the gradient of each variable in `own`
    with fn(j, gradient, variable), j its index in `own`; the others pass."""
    index = {id(v): j for j, v in enumerate(own)}

    def hook(grads, variables):
        out = list(grads)
        for i, v in enumerate(variables):
            j = index.get(id(v))
            if j is not None and out[i] is not None:
                out[i] = fn(j, out[i], v)
        return out
    return hook


def evaluate(model, x: np.ndarray, y: np.ndarray, backend: Backend, batch_size: int = 512) -> dict:
    """Loss and accuracy over the whole set, each process scoring its share."""
    share = np.array_split(np.arange(len(x)), backend.size)[backend.rank]
    forward = _forward(model)
    totals = np.zeros(3)
    for i in range(0, len(share), batch_size):
        idx = share[i:i + batch_size]
        loss_sum, correct = forward(x[idx], y[idx])
        totals += (float(loss_sum), float(correct), len(idx))
    loss_sum, correct, count = backend.allreduce_sum(totals)
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}


_FORWARD = weakref.WeakKeyDictionary()  # model -> its compiled evaluation step


def _forward(model):
    if model not in _FORWARD:
        @tf.function(reduce_retracing=True)
        def forward(x, y):
            logits = model(x, training=False)
            hit = tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y)
            return tf.reduce_sum(per_sample_loss(y, logits)), tf.reduce_sum(tf.cast(hit, tf.float32))
        _FORWARD[model] = forward
    return _FORWARD[model]


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int            # per replica
    seed: int
    accum_steps: int = 1       # micro-batches of batch_size per replica per optimizer step
    max_steps: int = 0         # stop (and checkpoint) after this many global steps; 0 = no limit
    save_every_steps: int = 0  # extra checkpoints inside an epoch; 0 = only at epoch ends
    evaluate_every_epoch: bool = True


def train(model, optimizer, backend: Backend, data, cfg: LoopConfig, state: TrainState,
          reporter, save: Callable[[TrainState], None], grad_hooks=(), after_update=(),
          before_step: Sequence[Callable[[int], None]] = (), after_step: Sequence[Callable[[int], None]] = (),
          step=None) -> dict:
    """Run epochs from `state` on; return throughput figures.

    `grad_hooks` and `after_update` run inside the compiled step;
    `before_step` and `after_step` run in Python between steps, on every
    process, with the global step number (mask updates, checks). `step`, a
    step made earlier by `backend.make_step` for this model and optimizer,
    is reused instead (simulated clients: one trace for all of them).
    """
    step = step or backend.make_step(make_replica_step(model, optimizer, backend, cfg.accum_steps, grad_hooks, after_update))
    stateful = is_stateful(model)
    replicas, local = backend.num_replicas, backend.local_replicas
    global_batch = cfg.batch_size * cfg.accum_steps * replicas
    n = len(data.x_train)
    train_time, timed_samples, first = 0.0, 0, True

    while state.epoch < cfg.epochs and not _done(cfg, state):
        batches = sharding.epoch_batches(n, global_batch, replicas, cfg.seed, state.epoch, start=state.offset)
        bar = reporter.epoch_bar(state.epoch, cfg.epochs, len(batches))
        sums = None
        for batch in batches:
            parts = sharding.replica_slices(batch, replicas)
            xs = [data.x_train[parts[r]] for r in local]
            ys = [data.y_train[parts[r]] for r in local]
            t0 = time.perf_counter()  # hooks count: mask updates are part of the cost
            for hook in before_step:
                hook(state.step)
            out = step(xs, ys, float(len(batch)))
            sums = out if sums is None else [a + b for a, b in zip(sums, out)]
            if stateful:  # each batch holds whole, independent sequences
                reset_stateful(model)
            state.step += 1
            state.offset += len(batch)
            state.samples_seen += len(batch)
            bar.update(1)
            if state.step % 20 == 0:
                loss_sum, correct, count = (float(v) for v in sums)
                bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.3f}")
            if first:  # the first step traces and compiles: keep it out of throughput
                first = False
            else:
                train_time += time.perf_counter() - t0
                timed_samples += len(batch)
            for hook in after_step:  # checks, not training: outside the timing
                hook(state.step)
            if cfg.save_every_steps and state.step % cfg.save_every_steps == 0:
                with interrupts.deferred():  # a checkpoint is written whole, then the signal stops the run
                    save(state)
            if _done(cfg, state):
                break
        bar.close()
        epoch_done = state.offset >= n
        metrics = {}
        if sums is not None:
            loss_sum, correct, count = backend.allreduce_sum([float(v) for v in sums])
            metrics = {"train_loss": loss_sum / count, "train_accuracy": correct / count}
        if epoch_done:
            state.epoch += 1
            state.offset = 0
            if cfg.evaluate_every_epoch and data.x_test is not None and len(data.x_test):
                test = evaluate(model, data.x_test, data.y_test, backend)
                metrics.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
            if timed_samples:
                metrics["samples_per_sec"] = timed_samples / train_time if train_time else 0.0
            reporter.epoch_end(state.epoch - 1, metrics)
        with interrupts.deferred():
            save(state)
    return {"samples_per_sec": timed_samples / train_time if train_time else 0.0,
            "train_time": train_time}


def _done(cfg: LoopConfig, state: TrainState) -> bool:
    return bool(cfg.max_steps) and state.step >= cfg.max_steps
