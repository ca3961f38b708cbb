"""How sparse a model is: per-weight rows, a text table, and a bar chart.

A row is ``{"layer", "weight", "params", "zeros", "sparsity"}``: ``layer`` is the
model's (top-level) layer holding the weight, ``weight`` the variable's key
(``"conv1/kernel"``, see ``trainer.varnames``), ``zeros`` the entries that are zero in the weight or,
if a pruning mask is given for it, masked out (mask == 0), counted once, and
``sparsity = zeros / params``.

Listed are the weights in ``masks`` and every weight of rank >= 2 (kernels,
recurrent kernels, embeddings) with any zeros. Vectors and scalars (biases,
normalization weights) are listed only if in ``masks``: a fresh Dense bias is
all zeros, and that is not pruning.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.checkpoint import atomic_write
from trainer.errors import UsageError

__all__ = ["sparsity_rows", "format_table", "plot_sparsity"]

_COLUMNS = ("layer", "weight", "params", "zeros", "sparsity")


def _layer_of(model) -> dict:
    """id(variable) -> name of the top-level layer that holds it."""
    owner = {}
    for layer in model.layers:
        for weight in layer.weights:
            owner.setdefault(id(weight), layer.name)
    return owner


def sparsity_rows(model, masks: dict | None = None) -> list[dict]:
    """One row per weight in ``masks`` or of rank >= 2 with any zeros, in ``model.weights`` order.

    ``masks`` maps a weight's key (``"conv1/kernel"``) to an array of the
    weight's shape whose 0/False entries are pruned.
    """
    from trainer.varnames import keyed
    named = keyed(model.weights)
    weights = list(named.values())
    name_of = {id(w): k for k, w in named.items()}
    mask_of = {}
    for key, mask in dict(masks or {}).items():
        weight = named.get(key)
        if weight is None:
            known = ", ".join(list(named)[:8]) + (", ..." if len(named) > 8 else "")
            raise UsageError(f"mask for {key!r}, which is not a weight of model {model.name!r} (weights: {known})")
        mask = np.asarray(mask)
        if mask.shape != tuple(weight.shape):
            raise UsageError(
                f"mask for {key!r} has shape {mask.shape} but the weight has {tuple(weight.shape)}"
            )
        mask_of[id(weight)] = mask

    owner = _layer_of(model)
    rows = []
    for weight in weights:
        value = np.asarray(weight.numpy())
        zero = value == 0
        mask = mask_of.get(id(weight))
        if mask is not None:
            zero = zero | (mask == 0)
        zeros = int(np.count_nonzero(zero))
        if mask is None and (zeros == 0 or value.ndim < 2):
            continue
        params = int(value.size)
        rows.append({
            "layer": owner.get(id(weight), name_of[id(weight)].split("/")[0]),
            "weight": name_of[id(weight)],
            "params": params,
            "zeros": zeros,
            "sparsity": zeros / params if params else 0.0,
        })
    return rows


def _total(rows) -> tuple[int, int, float]:
    params = sum(r["params"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    return params, zeros, (zeros / params if params else 0.0)


def format_table(rows) -> str:
    """An aligned text table of ``rows`` with a total row (overall sparsity of the listed weights)."""
    params, zeros, sparsity = _total(rows)
    body = [(r["layer"], r["weight"], f"{r['params']:,}", f"{r['zeros']:,}", f"{100 * r['sparsity']:.2f}%")
            for r in rows]
    total = ("total", f"{len(rows)} weights", f"{params:,}", f"{zeros:,}", f"{100 * sparsity:.2f}%")
    widths = [max(len(str(line[i])) for line in [_COLUMNS, *body, total]) for i in range(len(_COLUMNS))]

    def line(cells):
        left = [str(c).ljust(w) for c, w in zip(cells[:2], widths[:2])]
        right = [str(c).rjust(w) for c, w in zip(cells[2:], widths[2:])]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(_COLUMNS), rule, *(line(b) for b in body), rule, line(total)])


def plot_sparsity(rows, path) -> None:
    """A horizontal bar chart (PNG) of the sparsity of each weight, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"{path}: directory {path.parent} does not exist; create it first")
    _, _, overall = _total(rows)
    fig = Figure(figsize=(8, max(2.5, 1.2 + 0.35 * len(rows))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if rows:
        labels = [r["weight"] for r in rows]
        values = [100 * r["sparsity"] for r in rows]
        y = np.arange(len(rows))
        bars = ax.barh(y, values, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=3, fontsize=8)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()  # first weight on top
        ax.set_title(f"sparsity per weight (overall {100 * overall:.1f}%)")
    else:
        ax.set_yticks([])
        ax.text(50, 0.5, "no weight has zeros", ha="center", va="center")
        ax.set_title("sparsity per weight")
    ax.set_xlim(0, 112)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("zeros (% of entries)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
