"""`merge barrier`: loss and accuracy along the straight line between two
models, before and after aligning B to A. The barrier is how much worse the
path's worst point is than the mean of its two ends."""
from __future__ import annotations

import keras
import numpy as np

from trainer.errors import UsageError

from .align import align, set_weights, weights_of
from .evaluate import _predict
from .models import load_model, output_kind


def _score(model, x, y) -> tuple[float, float]:
    scores = _predict(model, x, 256)
    loss = keras.losses.sparse_categorical_crossentropy(y, scores, from_logits=output_kind(model) == "logits")
    return float(np.mean(keras.ops.convert_to_numpy(loss))), float(np.mean(np.argmax(scores, -1) == y))


def barrier(path_a: str, path_b: str, data: str, data_dir=None, points: int = 11, aligned: bool = True,
            recorded: bool = False) -> dict:
    if points < 3:
        raise UsageError(f"--points {points}: need at least 3")
    from .records import load_default
    ds = load_default(data, data_dir, recorded)
    a, b = load_model(path_a), load_model(path_b)
    wa, wb = weights_of(a), weights_of(b)
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        raise UsageError(f"{path_a} and {path_b} differ in architecture; a path between them needs the same tensors")
    ends = {"naive": wb}
    if aligned:
        ends["aligned"], _ = align(a, b)
    probe = load_model(path_a)
    alphas = np.linspace(0.0, 1.0, points)
    curves = {}
    for label, end in ends.items():
        rows = []
        for t in alphas:
            set_weights(probe, {k: ((1 - t) * wa[k] + t * end[k]).astype(wa[k].dtype) for k in wa})
            loss, acc = _score(probe, ds.x_test, ds.y_test)
            rows.append({"alpha": float(t), "loss": loss, "accuracy": acc})
        curves[label] = rows
    return {"a": str(path_a), "b": str(path_b), "data": data, "points": alphas.tolist(), "curves": curves,
            "barrier": {label: height(rows) for label, rows in curves.items()}}


def height(rows) -> float:
    """Loss barrier: the worst interior loss above the line between the ends."""
    first, last = rows[0]["loss"], rows[-1]["loss"]
    return max(r["loss"] - ((1 - r["alpha"]) * first + r["alpha"] * last) for r in rows)


def format_table(res: dict) -> str:
    labels = list(res["curves"])
    head = "alpha  " + "  ".join(f"{l + ' loss':>14} {l + ' acc':>12}" for l in labels)
    lines = [head]
    for i, t in enumerate(res["points"]):
        lines.append(f"{t:5.2f}  " + "  ".join(f"{res['curves'][l][i]['loss']:14.4f} "
                                               f"{res['curves'][l][i]['accuracy']:12.4f}" for l in labels))
    lines.append("loss barrier: " + ", ".join(f"{l} {res['barrier'][l]:.4f}" for l in labels))
    return "\n".join(lines)


# Few enough points to mark each one: beyond this, markers hide the curve.
MARKERS_UP_TO = 25
LEGEND = {"naive": "B as it is (straight line)", "aligned": "B aligned to A"}


def plot(res: dict, path) -> None:
    """figure(res) written atomically as PNG."""
    import matplotlib.pyplot as plt

    from trainer.checkpoint import atomic_write
    fig = figure(res)

    def write(f):
        fig.savefig(f, format="png", dpi=100)

    try:
        atomic_write(path, write)
    finally:
        plt.close(fig)


def figure(res: dict):
    """Loss and accuracy along the line, one curve per end (B as it is, B
    aligned), titled with the two models and the data set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = "o-" if len(res["points"]) <= MARKERS_UP_TO else "-"
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.9))
    for label, rows in res["curves"].items():
        name = f"{LEGEND.get(label, label)}, barrier {res['barrier'][label]:.3f}"
        left.plot(res["points"], [r["loss"] for r in rows], style, label=name)
        right.plot(res["points"], [r["accuracy"] for r in rows], style, label=name)
    left.set(xlabel="alpha (0 = A, 1 = B)", ylabel="test loss", title="loss along the line")
    right.set(xlabel="alpha (0 = A, 1 = B)", ylabel="test accuracy", title="accuracy along the line", ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"merge barrier: A = {res.get('a', 'A')}, B = {res.get('b', 'B')}"
                 + (f", test split of {res['data']}" if res.get("data") else ""), fontsize=10)
    fig.tight_layout()
    return fig
