"""Score models (members, averages, ensembles) side by side on one test split."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from trainer.checkpoint import atomic_write
from trainer.errors import UsageError

from .models import load_model, output_kind, source_kind
from .records import load_default

__all__ = ["evaluate", "format_table", "plot", "figure"]


def _fits(model_shape, data_shape) -> bool:
    # None in the model (e.g. variable-length sequences) accepts any size.
    return len(model_shape) == len(data_shape) and all(
        m is None or m == d for m, d in zip(model_shape, data_shape))


def _check_fit(model, path, data) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UsageError(f"{path}: has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         "only single-input, single-output classifiers are scored")
    shape = tuple(model.input_shape[1:])
    if not _fits(shape, data.input_shape):
        raise UsageError(f"{path}: takes inputs of shape {shape} but {data.name} samples have "
                         f"shape {data.input_shape}; evaluate it on the data it was trained for")
    out = tuple(model.output_shape)
    if len(out) != 2 or out[1] != data.num_classes:
        classes = out[1] if len(out) == 2 else f"outputs of shape {out[1:]}"
        raise UsageError(f"{path}: predicts {classes} classes but {data.name} has "
                         f"{data.num_classes}; evaluate it on the data it was trained for")


def evaluate(paths: list[str], data: str, data_dir=None, batch_size: int = 256, recorded: bool = False) -> list[dict]:
    """One row per path: path, kind, loss, accuracy, params, on the test split
    of ``data`` (``recorded``: a name the inputs recorded, not the user's --data)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise UsageError("nothing to evaluate; give at least one model")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
    kinds = [source_kind(p) for p in paths]  # a typo fails before the data loads
    ds = load_default(data, data_dir, recorded)
    if len(ds.x_test) == 0:
        raise UsageError(f"--data {data}: the test split is empty; nothing to score")
    rows = []
    for path, kind in zip(paths, kinds):
        model = load_model(path)
        _check_fit(model, path, ds)
        # A fixed batch dimension (stateful RNNs) must be used as is.
        fixed = model.input_shape[0]
        n = len(ds.x_test) if fixed is None else len(ds.x_test) // fixed * fixed
        if n == 0:
            raise UsageError(f"{path}: needs batches of exactly {fixed} but the test split has "
                             f"{len(ds.x_test)} samples")
        scores = _predict(model, ds.x_test[:n], fixed or batch_size)
        y = ds.y_test[:n]
        loss = keras.losses.sparse_categorical_crossentropy(
            y, scores, from_logits=output_kind(model) == "logits")
        rows.append({
            "path": path,
            "kind": kind,
            "loss": float(np.mean(keras.ops.convert_to_numpy(loss))),
            "accuracy": float(np.mean(np.argmax(scores, axis=-1) == y)),
            "params": int(model.count_params()),
        })
    return rows


def _predict(model, x, batch_size):
    # Eager calls, not model.predict: predict traces a new tf.function per model,
    # and a few models in a row make TensorFlow warn about retracing.
    return np.concatenate([keras.ops.convert_to_numpy(model(x[i:i + batch_size], training=False))
                           for i in range(0, len(x), batch_size)])


def format_table(rows: list[dict]) -> str:
    """An aligned text table: path and kind left-aligned, numbers right-aligned."""
    header = ("model", "kind", "loss", "accuracy", "params")
    body = [(r["path"], r["kind"], f"{r['loss']:.4f}", f"{r['accuracy']:.4f}", f"{r['params']:,}")
            for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def plot(rows: list[dict], png_path, data: str | None = None) -> None:
    """figure(rows, data) written atomically as PNG."""
    import matplotlib.pyplot as plt
    fig = figure(rows, data)

    def write(f):
        fig.savefig(f, format="png", dpi=100)

    try:
        atomic_write(Path(png_path), write)
    finally:
        plt.close(fig)


def figure(rows: list[dict], data: str | None = None):
    """Horizontal bars of test accuracy, one per row, coloured by kind (run,
    merge, .keras, ...), titled with the data set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["path"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    colour = {k: f"C{i}" for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(7, 1.6 + 0.45 * len(rows)))
    # First row on top, as in the table.
    ypos = list(range(len(rows)))[::-1]
    for kind in kinds:
        mine = [i for i, r in enumerate(rows) if r["kind"] == kind]
        ax.barh([ypos[i] for i in mine], [acc[i] for i in mine], color=colour[kind], label=kind)
    ax.set_yticks(ypos, labels)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("test accuracy" + (f" on {data}" if data else ""))
    ax.set_title(f"merge evaluate: {len(rows)} model{'s' if len(rows) != 1 else ''}"
                 + (f" on the test split of {data}" if data else ""), fontsize=10)
    for y, a in zip(ypos, acc):
        ax.text(a + 0.01, y, f"{a:.4f}", va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(title="kind", fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
