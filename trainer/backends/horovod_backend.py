"""Horovod: one process per replica, gradients allreduced by Horovod's tape."""
from __future__ import annotations

import os
import sys

import numpy as np
import tensorflow as tf

from ..errors import UsageError
from .base import Backend


class HorovodBackend(Backend):
    name = "horovod"
    replica_noun = "rank"

    def __init__(self, fp16_allreduce: bool = False, pin_cores: bool = True, startup_timeout: float = 600.0):
        # Horovod's background thread wakes every cycle to negotiate; at its
        # 1 ms default that steals a noticeable share of a core from compute
        # when ranks fill every core (measured: docs/benchmarks.md). 5 ms
        # costs at most a few ms of latency on steps of ~100+ ms.
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "5")
        # Even 5 ms cycles cost a rank ~12 ms of its core per step when it
        # has nothing to reduce: each one is an exchange with the other
        # ranks. The project's Horovod build (patches/horovod-0.28.1.patch,
        # part 3) waits for the next tensor instead, up to this long; other
        # builds ignore the variable.
        os.environ.setdefault("HOROVOD_IDLE_CYCLE_TIME", "50")
        import horovod.tensorflow as hvd
        with _startup_watch(startup_timeout, _meet_in_store(startup_timeout)):
            hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.num_replicas = self.size
        self.local_rank = hvd.local_rank()
        self.local_size = hvd.local_size()
        self.compression = hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none
        self.controller = "mpi" if hvd.mpi_enabled() else "gloo"
        if pin_cores:
            pin_to_cores(self.local_rank, self.local_size)
        # Horovod's documented GPU setup: one GPU per local rank, grown on demand.
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[self.local_rank % len(gpus)]
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")

    def reduce_gradients(self, grads):
        # What hvd.DistributedGradientTape does inside: one allreduce per
        # gradient, so Horovod can start on the top layers' gradients while
        # the lower ones are still being computed, fusing whatever is ready.
        # It is called directly because with --accum-steps the gradient is a
        # sum over several tapes. Sum, not Average: each rank's loss is
        # already divided by the global sample count, which keeps an uneven
        # last batch exact.
        return [self.hvd.allreduce(g, op=self.hvd.Sum, compression=self.compression) for g in grads]

    def load_shared(self, load):
        # Hosts need not share a file system: the chief reads, the others
        # receive. A failure on the chief is shipped too, or the others would
        # wait in the broadcast forever.
        result, error = None, None
        if self.is_chief:
            try:
                result = load()
            except UsageError as e:
                error = str(e)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise UsageError(error)
        return result

    def broadcast_variables(self, variables) -> None:
        # Values, not variables: hvd.broadcast_variables predates Keras 3
        # and does not take its variables. One named op per variable, in
        # the same order on every rank, is what Horovod matches ranks by.
        from ..varnames import keys
        variables = list(variables)
        for name, v in zip(keys(variables), variables):
            v.assign(self.hvd.broadcast(tf.convert_to_tensor(v), root_rank=0,
                                        name="bcast." + name.replace("/", ".").replace("#", ".")))

    def broadcast_object(self, obj):
        return self.hvd.broadcast_object(obj, root_rank=0)

    def average_variables(self, variables) -> None:
        from ..varnames import keys
        variables = list(variables)
        for name, v in zip(keys(variables), variables):
            v.assign(self.hvd.allreduce(tf.convert_to_tensor(v), op=self.hvd.Average,
                                        name="avg." + name.replace("/", ".").replace("#", ".")))

    def allreduce_sum(self, values):
        t = tf.constant(np.asarray(values, dtype=np.float64))
        return self.hvd.allreduce(t, op=self.hvd.Sum, name="dpt_allreduce_sum").numpy()

    def barrier(self) -> None:
        self.allreduce_sum(np.zeros(1))

    def describe(self) -> str:
        return f"horovod/{self.controller} ({self.size} ranks)"


def pin_to_cores(local_rank: int, local_size: int) -> None:
    """Give each local rank its own slice of the cores this process may use.

    Unpinned, the OS migrates compute threads of different ranks onto the
    same core now and then, and every rank then waits for that straggler.
    Slices come from the allowed set, so a Slurm cgroup or taskset is kept.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if local_size <= 1 or len(cpus) < local_size:
        return
    per = len(cpus) // local_size
    os.sched_setaffinity(0, cpus[local_rank * per:(local_rank + 1) * per])


def _launch_rank_size(env=os.environ) -> tuple[str, str]:
    rank = next((env[v] for v in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID") if v in env), "0")
    size = next((env[v] for v in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS") if v in env), "?")
    return rank, size


def _meet_in_store(timeout: float) -> bool:
    """Under horovodrun --gloo, wait in horovodrun's key-value store until
    every rank started (startup.py says why); True if they met there. On a
    timeout, the error line (from the lowest rank that started) and exit 1."""
    from .startup import RendezvousStore, StartupTimeout, wait_for_ranks
    env = os.environ
    store = RendezvousStore.from_env(env)
    if store is None or "HOROVOD_RANK" not in env or not env.get("HOROVOD_SIZE", "").isdigit():
        return False
    rank = int(env["HOROVOD_RANK"])
    try:
        wait_for_ranks(store, rank, int(env["HOROVOD_SIZE"]), timeout, env.get("HOROVOD_HOSTNAME", "?"),
                       int(env.get("HOROVOD_LOCAL_RANK", 0)), int(env.get("HOROVOD_LOCAL_SIZE", 1)))
    except StartupTimeout as e:
        if e.speak:
            print(f"error: rank {rank}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except OSError:  # the store is not reachable: hvd.init will fail and say so, under the deadline below
        return False
    return True


def _startup_watch(timeout: float, met: bool):
    """hvd.init waits for every rank (MPI_Init, Gloo's rendezvous). When the
    ranks met in horovodrun's store, all are up and what is left is their
    connecting; otherwise the world is known only from the launcher's
    variables, and which rank is missing only to the launcher."""
    from .startup import Deadline
    rank, size = _launch_rank_size()
    if met:
        return Deadline(timeout, f"rank {rank}: all {size} ranks started; waiting for Horovod to connect them "
                                 f"(up to --startup-timeout {timeout:g} s)",
                        f"rank {rank}: all {size} ranks started but Horovod did not connect them within "
                        f"--startup-timeout {timeout:g} s; check that the hosts can reach each other (the "
                        "network interface Horovod picked, firewalls), then run again", speak=rank == "0")
    return Deadline(timeout, f"rank {rank}: waiting for the other ranks of {size} to join Horovod "
                             f"(up to --startup-timeout {timeout:g} s)",
                    f"rank {rank}: Horovod did not start within --startup-timeout {timeout:g} s: not all {size} "
                    "ranks joined hvd.init; check that every rank was started and can reach the others, then run "
                    "again", speak=rank == "0")
