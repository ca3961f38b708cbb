"""The seam between the training loop and how replicas talk to each other.

The loop never asks which backend it runs on: it builds its model inside
`scope()`, computes gradients through `gradients()`, runs its step through
`make_step()` and reduces its metrics with `allreduce_sum()`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf


class Backend:
    name = "single"
    rank = 0            # process index; 0 is the chief, the only one that writes
    size = 1            # number of processes
    num_replicas = 1    # replicas across all processes (one batch slice each)
    replica_noun = "replica"  # what an error calls one replica

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def local_replicas(self) -> list[int]:
        """Global ids of the replicas this process feeds."""
        return [self.rank]

    @property
    def hook_share(self) -> float:
        """The part of a term, the same on every replica, that one replica's
        gradient hook adds (FedProx's mu (w - w_start)). Here and under
        Horovod the hooks see gradients already summed over replicas: all of
        it. tf.distribute sums the replicas' gradients after the hooks,
        inside apply_gradients, so there each replica adds 1/num_replicas."""
        return 1.0

    @property
    def lr_scale(self) -> int:
        """Learning-rate multiplier for the larger global batch (Goyal et al.)."""
        return self.num_replicas

    def scope(self):
        return contextlib.nullcontext()

    def reduce_gradients(self, grads):
        """Gradients summed over every replica.

        Each replica's loss is its share of the global-batch mean, so the sum
        over replicas is the gradient of the global mean. Here (one replica,
        or tf.distribute, whose apply_gradients sums them) nothing to do.
        """
        return grads

    def make_step(self, replica_step: Callable) -> Callable:
        """Wrap `replica_step(x, y, global_count)` into a compiled step that
        takes this process's per-replica slices and returns this process's
        summed outputs."""
        step = tf.function(replica_step, reduce_retracing=True)

        def run(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], global_count: float):
            return step(xs[0], ys[0], tf.constant(global_count, tf.float32))
        return run

    def assign_in_step(self, variable, transform) -> None:
        """variable <- transform(variable), inside the compiled step, on every replica."""
        variable.assign(transform(variable))

    def load_shared(self, load: Callable):
        """Run a load whose result every process needs (a manifest, a checkpoint).

        Processes here share one file system, so each loads for itself.
        Horovod overrides this: only the chief reads, and it ships the result,
        or its error, to the others.
        """
        return load()

    def broadcast_variables(self, variables) -> None:
        """Make every process start from the chief's values."""

    def broadcast_object(self, obj):
        return obj

    def average_variables(self, variables) -> None:
        """Set each variable to its mean over processes. One process, or
        tf.distribute (which aggregates a replica's writes itself): nothing to do."""

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum a small array over processes (metrics, counts, checksums)."""
        return np.asarray(values, dtype=np.float64)

    def barrier(self) -> None:
        pass

    def local_replica_values(self, variable) -> list:
        """This process's copy of `variable` for each replica it feeds."""
        return [np.asarray(variable.numpy())]

    def replica_fingerprints(self, variables) -> list[str]:
        """One hash of all `variables` per replica, in replica order, on every process."""
        return self._gathered_digests([variables])[0]

    def replica_fingerprints_each(self, variables) -> list[list[str]]:
        """For each variable, its hash on every replica; one reduction for all."""
        return self._gathered_digests([[v] for v in variables])

    def _gathered_digests(self, groups) -> list[list[str]]:
        # Gathered through allreduce_sum (each process fills its own rows of a
        # zero table) so every backend gets it without an object-gather op.
        from ..checkpoint import fingerprint_arrays
        from ..varnames import keys
        table = np.zeros((self.num_replicas, len(groups), 32))
        for g, group in enumerate(groups):
            local = [list(self.local_replica_values(v)) for v in group]
            names = keys(group)
            for i, replica in enumerate(self.local_replicas):
                digest = fingerprint_arrays((k, vals[i]) for k, vals in zip(names, local))
                table[replica, g] = np.frombuffer(bytes.fromhex(digest[7:]), dtype=np.uint8)
        table = self.allreduce_sum(table)
        return [["sha256:" + bytes(table[r, g].astype(np.uint8).tolist()).hex() for r in range(self.num_replicas)]
                for g in range(len(groups))]

    def replica_hosts(self) -> list[str]:
        """The host each replica ran on, in replica order, on every process:
        the record that a multi-host run really spanned its hosts."""
        import socket
        name = socket.gethostname().encode()[:64]
        table = np.zeros((self.num_replicas, 64))
        for replica in self.local_replicas:
            table[replica, :len(name)] = list(name)
        table = self.allreduce_sum(table)
        return [bytes(row.astype(np.uint8).tolist()).rstrip(b"\0").decode(errors="replace") for row in table]

    def describe(self) -> str:
        return f"{self.name} ({self.num_replicas} replica{'s' if self.num_replicas != 1 else ''})"


SingleBackend = Backend
