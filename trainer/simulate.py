"""Federated clients simulated in one process (`launch federated --simulate`).

A process per client costs a Python start, a TensorFlow import, a model
build and a trace of the step, seconds each, against a fraction of a second
of training on a small share. Here one model, one optimizer and one
compiled step serve every client: before a client trains, the round's
global weights are assigned, the optimizer's slots and step counter zeroed
and its FedProx anchor or SCAFFOLD controls set; after it, its weights are
copied out.

Each client trains exactly as `python -m trainer --init GLOBAL --client K
--seed S` would (the same Options, job._build, loop.train, sharding and
hooks), so the rounds give the process path's global model up to float
round-off (tests/test_federated_algorithms.py). What differs: no run
directory per client, and models with dropout draw other random masks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import UsageError
from .job import Options


@dataclass
class ClientResult:
    weights: list            # numpy arrays, in model.weights order
    samples: int             # samples trained on: the client's FedAvg weight
    accuracy: float
    control: dict | None     # SCAFFOLD: the new c_i
    delta: dict | None       # SCAFFOLD: c_i+ - c_i


def check(o: Options) -> None:
    """UsageError for client options a simulated client cannot honour."""
    from .job import validate
    for flag, on in (("--prune/--structured", o.prune or o.structured), ("--freeze", o.freeze),
                     ("--resume", o.resume), ("--max-steps", o.max_steps),
                     ("--backend " + o.backend, o.backend not in ("auto", "single"))):
        if on:
            raise UsageError(f"{flag} is not supported with --simulate; run the clients as processes "
                             "(drop --simulate)")
    validate(o)


class Simulation:
    def __init__(self, o: Options):
        """`o`: the client options every client shares (--init is the first
        global; --client/--seed are set per client)."""
        from .job import _build, _plan, _restore, configure_threads, load_data, step_hooks
        check(o)
        configure_threads(o.threads)
        from .backends.base import Backend
        from .loop import make_replica_step
        self.o, self.backend = o, Backend()
        plan = _plan(replace(o, out="<simulated clients>"))
        self.lineage, self.init_round = plan["lineage"], plan["init_round"] or 0
        self.full = load_data(replace(o, client=None, clients=None), plan["model"]["name"])
        model_cfg = {**plan["model"], "input_shape": list(self.full.input_shape), "num_classes": self.full.num_classes}
        self.model_cfg = model_cfg
        self.model, self.optimizer, self.masks, self.prox, self.scaffold, _ = _build(
            o, self.backend, self.full, model_cfg)
        _restore(replace(o, scaffold=None), plan, self.model, None)  # the first global's weights, lineage checked
        self.hooks = hooks = step_hooks(self.masks, self.prox, self.scaffold)
        self.lr = o.lr
        self.step = self.backend.make_step(make_replica_step(self.model, self.optimizer, self.backend,
                                                             o.accum_steps, hooks["grad_hooks"],
                                                             hooks["after_update"]))

    def set_lr(self, lr: float) -> None:
        """Clients train at `lr` from now on (a per-round schedule): a new
        optimizer, as each client process would build with its --lr, and
        one new trace of the step."""
        if lr == self.lr:
            return
        from .loop import make_replica_step
        from .optim import make_optimizer
        self.optimizer = make_optimizer(self.o.optimizer, lr, 1, 0)  # one replica: no scaling, no warmup
        self.optimizer.build(self.model.trainable_variables)
        self.step = self.backend.make_step(make_replica_step(self.model, self.optimizer, self.backend,
                                                             self.o.accum_steps, self.hooks["grad_hooks"],
                                                             self.hooks["after_update"]))
        self.lr = lr

    def weights(self) -> list:
        return [np.array(v.numpy()) for v in self.model.weights]

    def set_weights(self, weights) -> None:
        for v, w in zip(self.model.weights, weights):
            v.assign(w)

    def client(self, k: int, seed: int, global_weights, server=None, control=None) -> ClientResult:
        """Client `k` of the round from `global_weights`; `server` and
        `control` are SCAFFOLD's c and this client's c_i (None: zeros)."""
        import tensorflow as tf

        from .job import client_share
        from .loop import LoopConfig, TrainState, evaluate, train
        from .report import Reporter
        o = replace(self.o, client=k, seed=seed)
        data = client_share(self.full, o)
        self.set_weights(global_weights)
        for v in self.optimizer.variables:  # a fresh optimizer, as a new process builds
            v.assign(tf.zeros(v.shape, v.dtype))
        if self.prox:
            self.prox.start()
        if self.scaffold:
            self.scaffold.start(server, control)
        state = TrainState()
        cfg = LoopConfig(epochs=o.epochs, batch_size=o.batch_size, seed=seed, accum_steps=o.accum_steps,
                         evaluate_every_epoch=False)
        train(self.model, self.optimizer, self.backend, data, cfg, state, Reporter(), lambda st: None,
              before_step=self.hooks["before_step"], after_step=self.hooks["after_step"], step=self.step)
        accuracy = evaluate(self.model, data.x_test, data.y_test, self.backend)["accuracy"]
        new = delta = None
        if self.scaffold:
            new, delta = self.scaffold.result()
        return ClientResult(self.weights(), state.samples_seen, accuracy, new, delta)

    def evaluate(self, weights) -> dict:
        from .loop import evaluate
        self.set_weights(weights)
        return evaluate(self.model, self.full.x_test, self.full.y_test, self.backend)

    def write_global(self, out, weights, record: dict, server_control: dict | None = None, clients: int = 0) -> None:
        """A global directory in the layout `merge fedavg` writes (config.json,
        model.weights.h5, manifest.json; scaffold.h5 for SCAFFOLD), so a
        process round can --init from it; staged under a temporary name."""
        import os
        import shutil
        import zipfile
        from pathlib import Path

        from . import checkpoint as ck
        from .files import controls
        out = Path(out)
        tmp = ck.shared_tempdir(out.parent, out.name)
        try:
            self.set_weights(weights)
            manifest = {"kind": "merge", "model": self.model_cfg, "lineage": self.lineage, "format": ck.FORMAT,
                        "versions": ck.package_versions(), "step": 0, **record}
            # Keras's own save gives the config and the weights file; a merge
            # directory holds the same two members unzipped.
            ck.export_keras(self.model, tmp / "model.keras", record=manifest)
            with zipfile.ZipFile(tmp / "model.keras") as z:
                z.extract("config.json", tmp)
                z.extract("model.weights.h5", tmp)
            (tmp / "model.keras").unlink()
            ck.atomic_write_json(tmp / ck.MANIFEST, manifest)
            if server_control is not None:
                controls.write(tmp, "server", {"control": server_control}, self.lineage, record.get("round"),
                               clients=clients)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
