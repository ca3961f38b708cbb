"""FedProx's proximal term (Li et al., 2020) for a federated client.

mu/2 * ||w - w_start||^2 is added to the client's loss, w_start being the
weights the run started from (the global model of the round). Its gradient,
mu * (w - w_start), is added after the allreduce: the weights, and so the
term, are identical on every replica, so adding it once there equals adding
it to every replica's loss before the sum. Under tf.distribute the hook runs
before the sum (inside apply_gradients), so each replica adds its share
(`backend.hook_share`). With mu = 0 the step is plain
FedAvg local training.
"""
from __future__ import annotations

import tensorflow as tf

from .loop import variable_hook


class Proximal:
    def __init__(self, model, backend, mu: float):
        from .varnames import key_map, safe
        self.mu = float(mu)
        self.share = backend.hook_share  # mu counted once over the replicas' sum
        names = key_map(model.weights)
        self.variables = list(model.trainable_variables)
        self.names = [names[id(v)] for v in self.variables]
        self._hook = variable_hook(self.variables, self._pull)
        with backend.scope():
            self.anchor = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=safe(k) + "_start")
                           for k, v in zip(self.names, self.variables)]
        # In the checkpoint, so that a resumed client keeps pulling towards
        # the round's start, not towards wherever it was interrupted.
        self.checkpoint_entries = {"proximal": dict(zip(self.names, self.anchor))}

    def start(self) -> None:
        """Remember the starting weights (after --init and the broadcast)."""
        for a, v in zip(self.anchor, self.variables):
            a.assign(v)

    def grad_hook(self, grads, variables):
        return self._hook(grads, variables)

    def _pull(self, j, g, v):
        return g + (self.mu * self.share) * (tf.convert_to_tensor(v) - self.anchor[j])
