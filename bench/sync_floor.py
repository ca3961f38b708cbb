"""What synchronous data parallelism must pay on this machine, measured
apart from the trainer so the two costs can be read separately:

  allreduce: under horovodrun, the trainer's own HorovodBackend allreduces
      tensors shaped like cifar10_cnn's gradients, nothing else running.
      Rank 0 prints wall and process-CPU milliseconds per step (the CPU
      time is what the allreduce takes from a core that also computes).
  steps: one process, no Horovod, runs the trainer's compiled step
      (make_replica_step, Adam) and prints every step's milliseconds.
      Two of these pinned to their own cores give the straggler cost: a
      synchronized step lasts as long as the slower rank's.

    horovodrun -np 2 --gloo python bench/sync_floor.py allreduce
    taskset -c 0 python bench/sync_floor.py steps --steps 60
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import quiet  # noqa: E402  (TensorFlow's import-time native lines, as in the trainer)

quiet.install()

MODEL, SHAPE, CLASSES = "cifar10_cnn", (32, 32, 3), 10


def allreduce(steps: int) -> dict:
    from trainer.job import configure_threads
    configure_threads(1)  # as the bench's trainers: one intra-op thread per rank
    from trainer.backends.horovod_backend import HorovodBackend
    backend = HorovodBackend()
    import tensorflow as tf
    from trainer.models import build_model
    model = build_model(MODEL, SHAPE, CLASSES)
    grads = [tf.random.normal(v.shape) for v in model.trainable_variables]
    step = tf.function(backend.reduce_gradients)
    for _ in range(5):
        step(grads)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = step(grads)
    out[0].numpy()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rank": backend.rank, "controller": backend.controller,
            "wall_ms": 1000 * wall / steps, "cpu_ms": 1000 * cpu / steps}


def step_times(steps: int, batch: int) -> dict:
    from trainer.job import configure_threads
    configure_threads(1)
    import numpy as np
    import tensorflow as tf
    from trainer.backends.base import Backend
    from trainer.loop import make_replica_step
    from trainer.models import build_model
    from trainer.optim import make_optimizer
    backend = Backend()
    model = build_model(MODEL, SHAPE, CLASSES)
    step = backend.make_step(make_replica_step(model, make_optimizer("adam", 1e-3, 1.0, 0), backend))
    rng = np.random.default_rng(0)
    x = rng.random((batch,) + SHAPE, dtype=np.float32)
    y = rng.integers(0, CLASSES, batch)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = step([x], [y], float(batch))
        float(out[0])
        if i:  # the first step traces and compiles
            times.append(1000 * (time.perf_counter() - t0))
    return {"step_ms": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/sync_floor.py")
    p.add_argument("mode", choices=["allreduce", "steps"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    result = allreduce(a.steps) if a.mode == "allreduce" else step_times(a.steps, a.batch_size)
    if result.get("rank", 0) == 0:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
