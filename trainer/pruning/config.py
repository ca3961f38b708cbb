"""What to prune and when: flags and the per-layer config file, validated."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

SCHEDULES = ("polynomial", "constant")
# Conv and dense kernels; biases and normalization weights stay dense.
DEFAULT_LAYERS = r"(conv|dense|local|logits).*/kernel"


@dataclass
class PruneConfig:
    target: float = 0.8
    schedule: str = "polynomial"
    begin: int = 0
    end: int = -1            # -1: the end of training (resolved once steps are known)
    every: int = 10
    layers: str = DEFAULT_LAYERS
    per_layer: dict = field(default_factory=dict)   # regex over weight names -> target
    structured: bool = False

    def validate(self) -> None:
        _check_sparsity("--target-sparsity", self.target)
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--prune-schedule {self.schedule!r}: choose {' or '.join(SCHEDULES)}")
        if self.begin < 0:
            raise UsageError(f"--prune-begin must be >= 0, got {self.begin}")
        if self.end != -1 and self.end <= self.begin:
            raise UsageError(f"--prune-end {self.end} is not after --prune-begin {self.begin}; "
                             "the schedule must end after it begins")
        if self.every < 1:
            raise UsageError(f"--prune-every must be at least 1, got {self.every}")
        for pattern, value in {"--prune-layers": self.layers, **{f"per-layer key {k!r}": k for k in self.per_layer}}.items():
            try:
                re.compile(value)
            except re.error as e:
                raise UsageError(f"{pattern}: not a regular expression ({e})") from None
        for key, value in self.per_layer.items():
            _check_sparsity(f"per-layer sparsity for {key!r}", value)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _check_sparsity(name: str, value) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise UsageError(f"{name} must be in [0, 1), got {value!r}")


def read_per_layer(path: str) -> dict:
    """A JSON object mapping weight-name regexes to target sparsities,
    e.g. {"conv1/kernel": 0.5, "dense.*/kernel": 0.95}."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--prune-config {path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--prune-config {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--prune-config {path}: expected a JSON object {{\"weight regex\": sparsity}}")
    return data


def select(variables, cfg: PruneConfig) -> list[tuple]:
    """(variable, target sparsity) for every weight to prune.

    A weight matches --prune-layers or a per-layer key; per-layer keys win,
    the first matching key in file order.
    """
    chosen = []
    for v in variables:
        target = next((float(t) for k, t in cfg.per_layer.items() if re.search(k, v.name)), None)
        if target is None and re.search(cfg.layers, v.name):
            target = cfg.target
        if target is not None:
            chosen.append((v, target))
    if not chosen:
        names = ", ".join(v.name for v in variables)
        raise UsageError(f"--prune-layers {cfg.layers!r} matches no weight; the model has: {names}")
    return chosen
