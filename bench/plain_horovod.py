"""The baseline: a minimal Horovod + Keras training loop, written from
Horovod's documented TensorFlow 2 API (hvd.init, gradients averaged by
Horovod, variables broadcast after the first batch, lr scaled by size), on
the same model and per-rank batch as our trainer. Prints one JSON line on
rank 0.

On Keras 3, Horovod's DistributedGradientTape and broadcast_variables do not
take Keras variables (they call tf.Variable methods Keras 3 variables lack),
so this does what they do inside, as a Horovod user on Keras 3 must: one
hvd.allreduce (Average) per gradient, and the first batch broadcasts values
(v.assign(hvd.broadcast(v, 0))).

    horovodrun -np 2 python bench/plain_horovod.py --batch-size 64 --steps 60
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    hvd.init()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    from trainer.models import build_model  # the same architecture as ours
    model = build_model("cifar10_cnn", (32, 32, 3), 10)
    rng = np.random.default_rng(hvd.rank())
    n = args.batch_size * 16
    x = rng.random((n, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, n)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(args.batch_size)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = keras.optimizers.Adam(0.001 * hvd.size())
    opt.build(model.trainable_variables)

    @tf.function
    def training_step(images, labels, first_batch):
        with tf.GradientTape() as tape:
            loss_value = loss(labels, model(images, training=True))
        grads = [hvd.allreduce(g, op=hvd.Average)
                 for g in tape.gradient(loss_value, model.trainable_variables)]
        opt.apply_gradients(zip(grads, model.trainable_variables))
        if first_batch:
            for i, v in enumerate(model.variables + opt.variables):
                v.assign(hvd.broadcast(tf.convert_to_tensor(v), root_rank=0, name=f"bcast{i}"))
        return loss_value

    it = iter(dataset)
    for i in range(args.warmup):
        training_step(*next(it), i == 0).numpy()
    start = time.perf_counter()
    for _ in range(args.steps):
        value = training_step(*next(it), False)
    value.numpy()
    elapsed = time.perf_counter() - start
    if hvd.rank() == 0:
        print(json.dumps({"samples_per_sec": args.steps * args.batch_size * hvd.size() / elapsed}))


if __name__ == "__main__":
    main()
