"""Do the replicas still hold the same values?

Replicas drift apart silently: a variable no collective keeps in sync
(BatchNorm's moving statistics under plain Horovod), ranks that compute
different masks (another --prune-config or code version on their host), a
worker that restored another checkpoint. Every later step keeps the
difference, and the chief's checkpoint would record its own copy as the run.

Each check is one reduction of per-replica digests through the backend
(`replica_fingerprints_each`), so Horovod ranks, tf.distribute devices and
workers are compared by the same code.
"""
from __future__ import annotations

from .errors import ReplicaMismatch
from .varnames import keyed


def require_agreement(backend, named: dict, what: str, when: str, error=ReplicaMismatch) -> dict:
    """{key: digest per replica} of the variables in `named` ({key: variable});
    raises `error` naming the first key (after the prefix `what`) whose
    replicas differ, and which."""
    prints = dict(zip(named, backend.replica_fingerprints_each(list(named.values()))))
    differing = [k for k, per_replica in prints.items() if len(set(per_replica)) != 1]
    if differing:
        per_replica = prints[differing[0]]
        # Against replica 0: its copy is the one a checkpoint or broadcast keeps.
        others = [r for r, d in enumerate(per_replica) if d != per_replica[0]]
        noun = backend.replica_noun
        who = f"{noun} {others[0]} disagrees" if len(others) == 1 else \
            f"{noun}s {', '.join(map(str, others))} disagree"
        more = f" ({len(differing)} of {len(prints)} differ)" if len(differing) > 1 else ""
        raise error(f"{what}{differing[0]} differs across {noun}s {when}: {who} with {noun} 0{more}; "
                    "stopping the run")
    return prints


def batch_statistics(model) -> list:
    """BatchNormalization's moving means and variances, nested models included.

    Each replica updates them from its own batches; no gradient carries
    them, so under Horovod they drift apart. Their update is an exponential
    moving average, linear in the batch statistic, so the mean over replicas
    of each replica's average is exactly the average of the replicas' mean
    statistic: averaging them whenever they are compared or saved gives the
    same values as averaging at every step, for one collective per check.
    """
    import keras

    from .models import walk_layers
    return [v for layer in walk_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]


class WeightCheck:
    """The model's weights compared across replicas: at every checkpoint,
    every `every` steps (0: only at checkpoints) and when asked. Batch
    statistics are averaged first (see `batch_statistics`)."""

    def __init__(self, backend, model, every: int = 0):
        self.backend, self.every = backend, every
        self.named = keyed(model.weights)
        self.statistics = batch_statistics(model)
        self._checked_step = None

    def now(self, when: str, step: int | None = None) -> None:
        if self.backend.num_replicas == 1:  # nothing to compare with
            return
        if step is not None and step == self._checked_step:  # weights unchanged since
            return
        self.backend.average_variables(self.statistics)
        require_agreement(self.backend, self.named, "weight ", when)
        self._checked_step = step

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.now(f"after step {step}", step)

    def at_checkpoint(self, step: int) -> None:
        self.now(f"at the checkpoint of step {step}", step)
