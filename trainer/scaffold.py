"""SCAFFOLD's client side (Karimireddy et al., ICML 2020).

Every local step follows g_i(y) - c_i + c instead of g_i(y): the client's
own gradient, corrected by how its gradients differ from everyone's (the
server control c minus the client control c_i). That correction is what
stops clients on non-IID shares drifting towards their own optimum.

After the round the client's new control is the mean of the raw gradients
g_i(y_k) it took along the way. Under plain SGD with a constant learning
rate this is exactly the paper's option II, c_i - c + (x - y) / (K lr):
the corrections cancel and what remains is the mean raw gradient. Taking it
directly keeps it right under momentum, Adam and a warmup schedule too,
where (x - y) / (K lr) is not a gradient at all.

Gradients reach the hook after the allreduce (Horovod) or as the one
replica's (single process), so the sums and controls are the same on every
rank. tf.distribute hands the hook per-replica gradients, summed later
inside apply_gradients; there the sum would need a cross-replica step, so
SCAFFOLD is refused on those backends (job.validate).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from .errors import UsageError
from .files import controls
from .loop import variable_hook
from .varnames import key_map, safe


class Scaffold:
    def __init__(self, model, backend):
        names = key_map(model.weights)
        self.variables = list(model.trainable_variables)
        self.names = [names[id(v)] for v in self.variables]
        self.shapes = {k: tuple(v.shape) for k, v in zip(self.names, self.variables)}
        self._hook = variable_hook(self.variables, self._correct)

        def zeros(suffix):
            return [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False, name=safe(k) + suffix)
                    for k, v in zip(self.names, self.variables)]
        with backend.scope():
            self.server, self.client, self.grad_sum = zeros("_c"), zeros("_ci"), zeros("_gsum")
            self.steps = tf.Variable(0.0, trainable=False, name="scaffold_steps")
        self.variables_to_sync = [*self.server, *self.client, *self.grad_sum, self.steps]
        # In the checkpoint: a resumed client keeps its corrections and the
        # gradients summed so far.
        self.checkpoint_entries = {"scaffold_server": dict(zip(self.names, self.server)),
                                   "scaffold_client": dict(zip(self.names, self.client)),
                                   "scaffold_sum": {**dict(zip(self.names, self.grad_sum)), "steps": self.steps}}

    def named(self) -> dict:
        """The variables the replica check compares, under their own names."""
        return {f"scaffold {part} {k}": v for part, vs in (("c", self.server), ("c_i", self.client),
                                                           ("sum", self.grad_sum))
                for k, v in zip(self.names, vs)}

    def start(self, server: dict | None, client: dict | None) -> None:
        """A round's start: c and c_i ({key: array}; None is zeros), nothing summed."""
        for store, values in ((self.server, server), (self.client, client)):
            for k, v in zip(self.names, store):
                v.assign(np.zeros(v.shape, np.float32) if values is None else values[k])
        for g in self.grad_sum:
            g.assign(tf.zeros_like(g))
        self.steps.assign(0.0)

    def load(self, server_path, client_path, lineage: str | None, round_: int | None, what: str) -> None:
        """`start` from files: the global's scaffold.h5 (None: zeros, a fresh
        init) and this client's previous run (None: its first round)."""
        server = client = None
        if server_path is not None:
            groups, attrs = controls.read(server_path, "server", self.shapes, f"{what} (server control)")
            _same_lineage(attrs, lineage, server_path, what)
            server = groups["control"]
        if client_path is not None:
            groups, attrs = controls.read(client_path, "client", self.shapes, "--scaffold")
            _same_lineage(attrs, lineage, client_path, "--scaffold")
            if round_ is not None and attrs["round"] is not None and attrs["round"] >= round_:
                raise UsageError(f"--scaffold {client_path}: that client run trained in round "
                                 f"{attrs['round'] + 1}, not before round {round_ + 1}; pass the client's "
                                 "previous run")
            client = groups["control"]
        self.start(server, client)

    def grad_hook(self, grads, variables):
        """Sum the raw gradients, return them corrected by c - c_i."""
        out = self._hook(grads, variables)
        self.steps.assign_add(1.0)
        return out

    def _correct(self, j, g, v):
        g = tf.convert_to_tensor(g)
        self.grad_sum[j].assign_add(tf.cast(g, tf.float32))
        return g + tf.cast(self.server[j] - self.client[j], g.dtype)

    def result(self) -> tuple[dict, dict]:
        """({key: new c_i}, {key: c_i+ - c_i}); with no step taken, c_i is kept."""
        steps = float(self.steps.numpy())
        new, delta = {}, {}
        for k, s, ci in zip(self.names, self.grad_sum, self.client):
            old = ci.numpy()
            new[k] = s.numpy() / steps if steps else old
            delta[k] = new[k] - old
        return new, delta

    def write(self, run_dir, lineage: str | None, round_: int | None) -> None:
        new, delta = self.result()
        controls.write(run_dir, "client", {"control": new, "delta": delta}, lineage, round_,
                       steps=int(self.steps.numpy()))


def _same_lineage(attrs: dict, lineage: str | None, path, what: str) -> None:
    if lineage and attrs["lineage"] and attrs["lineage"] != lineage:
        raise UsageError(f"{what} {path}: control variate of another initialization "
                         f"({attrs['lineage'][:19]}... vs {lineage[:19]}...); it belongs to another federation")

