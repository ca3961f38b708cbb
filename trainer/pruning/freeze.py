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
from .masks import MaskSet

_SPEC = re.compile(r"^(?P<layer>[^/\[\]]+)(?:/(?P<weight>[^/\[\]]+))?(?:\[(?P<index>\d+)\])?$")


def parse_freeze(spec: str, variables) -> list[tuple]:
    """(variable, 0/1 mask with 0 where frozen) for every weight the spec names."""
    chosen: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _SPEC.match(part)
        if not m:
            raise UsageError(f"--freeze {part!r}: expected LAYER, LAYER/WEIGHT or LAYER/WEIGHT[i]")
        hits = [v for v in variables if _layer(v) == m["layer"]
                and (m["weight"] is None or _weight(v) == m["weight"])]
        if not hits:
            names = ", ".join(v.name for v in variables)
            raise UsageError(f"--freeze {part!r} names no trainable weight; the model has: {names}")
        for v in hits:
            mask = chosen.get(v.ref(), (v, np.ones(v.shape, np.float32)))[1]
            if m["index"] is None:
                mask[...] = 0.0
            else:
                i = int(m["index"])
                if i >= v.shape[-1]:
                    raise UsageError(f"--freeze {part!r}: index {i} out of range, {v.name} has {v.shape[-1]}")
                mask[..., i] = 0.0
            chosen[v.ref()] = (v, mask)
    if not chosen:
        raise UsageError("--freeze is empty; name at least one LAYER, LAYER/WEIGHT or LAYER/WEIGHT[i]")
    return list(chosen.values())


class Freezer:
    def __init__(self, spec: str, model, backend):
        self.spec = spec
        self.chosen = parse_freeze(spec, model.trainable_variables)
        self.maskset = MaskSet([v for v, _ in self.chosen], backend, keep_values=True, name="frozen")

    def start(self) -> None:
        """Snapshot the starting values (after init or broadcast); not on resume,
        where the checkpoint brings masks and values back."""
        for val, (v, _) in zip(self.maskset.values, self.chosen):
            val.assign(v)
        self.maskset.set([mask for _, mask in self.chosen])
        self.maskset.verify()


def _layer(v) -> str:
    return v.name.split("/")[0]


def _weight(v) -> str:
    return v.name.split("/")[-1].split(":")[0]
