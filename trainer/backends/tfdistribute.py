"""tf.distribute: MirroredStrategy (one process, several devices) and
MultiWorkerMirroredStrategy (one process per worker, TF_CONFIG)."""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from ..errors import UsageError
from ..varnames import tf_variable
from .base import Backend


class StrategyBackend(Backend):
    def __init__(self, strategy: tf.distribute.Strategy, name: str, rank: int, size: int):
        self.strategy = strategy
        self.name = name
        self.rank = rank
        self.size = size
        self.num_replicas = strategy.num_replicas_in_sync
        self._per_process = self.num_replicas // size

    @property
    def local_replicas(self) -> list[int]:
        first = self.rank * self._per_process
        return list(range(first, first + self._per_process))

    def scope(self):
        return self.strategy.scope()

    @property
    def hook_share(self) -> float:
        return 1.0 / self.num_replicas

    # gradients(): the base tape is right; apply_gradients inside strategy.run
    # sums them across replicas.

    def make_step(self, replica_step):
        strategy = self.strategy
        first = self.local_replicas[0]

        @tf.function(reduce_retracing=True)
        def step(x, y, global_count):
            out = strategy.run(replica_step, args=(x, y, global_count))
            # Sum only this process's replicas; the loop reduces across
            # processes once per epoch instead of every step.
            return [tf.add_n(strategy.experimental_local_results(o)) for o in out]

        def run(xs, ys, global_count):
            def pick(chunks):
                return strategy.experimental_distribute_values_from_function(
                    lambda ctx: tf.constant(chunks[ctx.replica_id_in_sync_group - first]))
            return step(pick(xs), pick(ys), tf.constant(global_count, tf.float32))
        return run

    def assign_in_step(self, variable, transform) -> None:
        # A mirrored variable cannot be assigned from replica context without
        # an aggregation. In cross-replica context each device's copy is
        # transformed from itself, read after the optimizer's update of that
        # same copy (computing the value in replica context could read it
        # before the update lands).
        def update(strategy, var):
            strategy.extended.update(var, lambda v: v.assign(transform(v)))
        tf.distribute.get_replica_context().merge_call(update, args=(tf_variable(variable),))

    def allreduce_sum(self, values):
        values = np.asarray(values, dtype=np.float64)
        if self.size == 1:
            return values
        first = self.local_replicas[0]
        zeros = np.zeros_like(values)
        per_replica = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values if ctx.replica_id_in_sync_group == first else zeros))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()

    def average_variables(self, variables) -> None:
        # Keras's BatchNormalization statistics are written per replica and
        # only averaged when read in cross-replica context; each replica's
        # copy (the one it computes with, and the one compared) gets the mean.
        for v in variables:
            copies = self.strategy.experimental_local_results(tf_variable(v))
            local = np.sum([c.numpy().astype(np.float64) for c in copies], axis=0)
            mean = self.allreduce_sum(local) / self.num_replicas
            for c in copies:
                c.assign(mean.astype(c.dtype.as_numpy_dtype))

    def local_replica_values(self, variable):
        return [v.numpy() for v in self.strategy.experimental_local_results(tf_variable(variable))]

    def broadcast_object(self, obj):
        # Every worker computes the same plan from the same inputs; objects
        # that differ would be a bug, so nothing is shipped.
        return obj

    def barrier(self) -> None:
        self.allreduce_sum(np.zeros(1))


def mirrored(devices: int) -> StrategyBackend:
    cpus = tf.config.list_logical_devices("CPU")
    gpus = tf.config.list_logical_devices("GPU")
    pool = gpus or cpus
    if devices and devices > len(pool):
        raise UsageError(f"--devices {devices}: only {len(pool)} devices visible")
    names = [d.name for d in pool[: devices or len(pool)]]
    # NCCL is GPU-only; on CPUs reduce through one device.
    cross = None if gpus else tf.distribute.ReductionToOneDevice()
    strategy = tf.distribute.MirroredStrategy(devices=names, cross_device_ops=cross)
    return StrategyBackend(strategy, "mirrored", rank=0, size=1)


def multiworker(startup_timeout: float = 600.0) -> StrategyBackend:
    raw = os.environ.get("TF_CONFIG")
    if not raw and "SLURM_PROCID" in os.environ and "SLURM_STEP_NODELIST" in os.environ:
        raw = os.environ["TF_CONFIG"] = _tf_config_from_slurm()
    if not raw:
        raise UsageError("--backend multiworker needs TF_CONFIG (cluster.worker list and task index); "
                         "see the README section 'Several hosts with horovodrun'")
    try:
        cfg = json.loads(raw)
        workers = cfg["cluster"]["worker"]
        index = int(cfg["task"]["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"TF_CONFIG is not valid JSON with cluster.worker and task.index ({e})") from None
    if not 0 <= index < len(workers):
        raise UsageError(f"TF_CONFIG task.index {index} is not one of the {len(workers)} workers of cluster.worker")
    from .. import interrupts
    from .startup import wait_for_workers
    # Every worker up before TensorFlow waits for them where nothing can stop it.
    wait_for_workers(workers, index, startup_timeout, say=None if index == 0 else (lambda text: None))
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    interrupts.reinstall()  # the coordination service has just taken SIGTERM for itself
    return StrategyBackend(strategy, "multiworker", rank=index, size=len(workers))


def _tf_config_from_slurm() -> str:
    """TF_CONFIG for this srun task: workers are the step's tasks, host by host.

    Written here because TensorFlow's SlurmClusterResolver divides each node's
    GPUs among its tasks and fails on CPU-only nodes (a zero range step). Ports
    start from a base derived from the job id, so two jobs sharing a node do
    not collide."""
    import subprocess
    nodelist = os.environ["SLURM_STEP_NODELIST"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    per_node = []
    for part in os.environ["SLURM_STEP_TASKS_PER_NODE"].split(","):  # e.g. "2(x3),1"
        count, _, repeat = part.partition("(x")
        per_node += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    base = 20000 + (int(os.environ.get("SLURM_JOB_ID", "0")) * 16) % 30000
    workers = [f"{host}:{base + i}" for host, n in zip(hosts, per_node) for i in range(n)]
    return json.dumps({"cluster": {"worker": workers},
                       "task": {"type": "worker", "index": int(os.environ["SLURM_PROCID"])}})


def configure_logical_devices(devices: int) -> None:
    """Split the CPU into `devices` logical devices; must run before TF starts."""
    if devices and devices > 1 and not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(devices)])
