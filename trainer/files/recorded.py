"""The model a file says it holds (a manifest's or a .keras metadata's `model`
entry), checked before anything acts on it.

A name read from a file resolves in the trainer's registry only. A
`package.module:function` model means "import that module and call that
function", which a file from another machine must never decide: such an
entry is accepted only when the user names the same model on the command
line. Shapes, class counts and options are checked for type and size, so a
bad entry is a one-line error, not a crash or a huge allocation.
"""
from __future__ import annotations

import math
import re

from trainer.errors import UsageError

MAX_DIM = 1 << 20        # no input dimension of a real model is a million wide
MAX_RANK = 4
MAX_INPUT = 1 << 24     # 16M values: a 2048x2048 RGB image is 12.6M
MAX_CLASSES = 1 << 24
_OPTION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SCALARS = (bool, int, float, str, type(None))


def recorded_model(entry, where: str, named: str | None = None) -> dict:
    """`entry` ({name, input_shape, num_classes, options}) checked; `named` is
    the --model the user gave, if any."""
    from trainer.models import MODELS
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: records no model (name, input_shape, num_classes)")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{where}: records no model name")
    name = name.strip()
    if name not in MODELS and name != (named or "").strip():
        raise UsageError(f"{where}: records model {name[:80]!r}, which is not in the trainer's registry; "
                         "a file never chooses a module to import: if you trust it, name it yourself "
                         f"with --model {name[:80]}")
    return {"name": name, "input_shape": _shape(entry.get("input_shape"), where),
            "num_classes": _classes(entry.get("num_classes"), where),
            "options": _options(entry.get("options"), where)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape(shape, where):
    if shape is None:
        return None
    if (not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK
            or not all(_is_int(d) and 1 <= d <= MAX_DIM for d in shape)
            or math.prod(shape) > MAX_INPUT):
        raise UsageError(f"{where}: input_shape {str(shape)[:60]} is not 1 to {MAX_RANK} sizes "
                         f"between 1 and {MAX_DIM}, at most {MAX_INPUT} values in all")
    return list(shape)


def _classes(n, where):
    if n is None:
        return None
    if not _is_int(n) or not 1 <= n <= MAX_CLASSES:
        raise UsageError(f"{where}: num_classes {str(n)[:40]} is not an integer between 1 and {MAX_CLASSES}")
    return n


def _options(options, where):
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(
            isinstance(k, str) and _OPTION.fullmatch(k) and isinstance(v, _SCALARS)
            and not (isinstance(v, str) and len(v) > 200) for k, v in options.items()):
        raise UsageError(f"{where}: model options {str(options)[:80]} are not a flat object of "
                         "names and plain values")
    return dict(options)
