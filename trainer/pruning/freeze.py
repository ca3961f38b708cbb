"""--freeze: keep chosen weights fixed through the same mask mechanism.

SPEC is a comma-separated list of
    LAYER              every trainable weight of the layer
    LAYER/WEIGHT       one weight, e.g. conv1/kernel
    LAYER/WEIGHT[i]    one slice along the last axis: one conv filter's
                       kernel or one dense unit's incoming weights
"""
from __future__ import annotations

import re

import numpy as np

from ..errors import UsageError
from ..varnames import key_map
from .masks import MaskSet

_SPEC = re.compile(r"^(?P<layer>[^/\[\]]+)(?:/(?P<weight>[^/\[\]]+))?(?:\[(?P<index>\d+)\])?$")


def parse_freeze(spec: str, named: dict) -> list[tuple]:
    """(key, variable, 0/1 mask with 0 where frozen) for every weight the spec
    names; `named` is {key: trainable variable} (keys as in trainer.varnames)."""
    chosen: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _SPEC.match(part)
        if not m:
            raise UsageError(f"--freeze {part!r}: expected LAYER, LAYER/WEIGHT or LAYER/WEIGHT[i]")
        hits = [(k, v) for k, v in named.items() if _layer(k) == m["layer"]
                and (m["weight"] is None or _weight(k) == m["weight"])]
        if not hits:
            names = ", ".join(named)
            raise UsageError(f"--freeze {part!r} names no trainable weight; the model has: {names}")
        for k, v in hits:
            mask = chosen.get(k, (k, v, np.ones(v.shape, np.float32)))[2]
            if m["index"] is None:
                mask[...] = 0.0
            else:
                i = int(m["index"])
                if i >= v.shape[-1]:
                    raise UsageError(f"--freeze {part!r}: index {i} out of range, {k} has {v.shape[-1]}")
                mask[..., i] = 0.0
            chosen[k] = (k, v, mask)
    if not chosen:
        raise UsageError("--freeze is empty; name at least one LAYER, LAYER/WEIGHT or LAYER/WEIGHT[i]")
    return list(chosen.values())


class Freezer:
    def __init__(self, spec: str, model, backend):
        self.spec = spec
        names = key_map(model.weights)
        self.chosen = parse_freeze(spec, {names[id(v)]: v for v in model.trainable_variables})
        self.maskset = MaskSet({k: v for k, v, _ in self.chosen}, backend, keep_values=True, name="frozen")

    def start(self) -> None:
        """Snapshot the starting values (after init or broadcast); not on resume,
        where the checkpoint brings masks and values back."""
        for val, (_, v, _) in zip(self.maskset.values, self.chosen):
            val.assign(v)
        self.maskset.set([mask for _, _, mask in self.chosen])
        self.maskset.verify()


def _layer(key: str) -> str:
    return key.split("/")[0]


def _weight(key: str) -> str:
    return key.split("/")[-1].split("#")[0]
