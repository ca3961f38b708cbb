"""Horovod: one process per replica, gradients allreduced by Horovod's tape."""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..errors import UsageError
from .base import Backend


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, fp16_allreduce: bool = False):
        import horovod.tensorflow as hvd
        hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.num_replicas = self.size
        self.local_rank = hvd.local_rank()
        self.local_size = hvd.local_size()
        self.compression = hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none
        self.controller = "mpi" if hvd.mpi_enabled() else "gloo"

    def gradients(self, tape, loss, variables):
        # Sum, not Average: each rank's loss is already divided by the global
        # sample count, which also keeps an uneven last batch exact.
        tape = self.hvd.DistributedGradientTape(tape, compression=self.compression, op=self.hvd.Sum)
        return tape.gradient(loss, variables)

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
        self.hvd.broadcast_variables(list(variables), root_rank=0)

    def broadcast_object(self, obj):
        return self.hvd.broadcast_object(obj, root_rank=0)

    def allreduce_sum(self, values):
        t = tf.constant(np.asarray(values, dtype=np.float64))
        return self.hvd.allreduce(t, op=self.hvd.Sum, name="dpt_allreduce_sum").numpy()

    def barrier(self) -> None:
        self.allreduce_sum(np.zeros(1))

    def describe(self) -> str:
        return f"horovod/{self.controller} ({self.size} ranks)"
