"""What the chief shows and logs: a progress bar, TensorBoard, history and curves.

Every other rank gets a Reporter that does nothing, so the loop never asks
which rank it is on.
"""
from __future__ import annotations

import csv
import json as json_module
import sys
from pathlib import Path

from .progress import NullProgress, progress


class Reporter:
    def epoch_bar(self, epoch: int, epochs: int, steps: int):
        return NullProgress()

    def epoch_end(self, epoch: int, metrics: dict) -> None:
        pass

    def line(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class ChiefReporter(Reporter):
    """`json`: stdout carries only the final summary (one JSON document), so
    every line, epoch lines included, goes to stderr."""

    def __init__(self, run_dir: Path, quiet: bool = False, json: bool = False, title: str | None = None):
        import tensorflow as tf
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        self.json = json
        self.stream = sys.stderr if json else sys.stdout
        self.title = title or self.run_dir.name
        self.writer = tf.summary.create_file_writer(str(self.run_dir / "tb"))
        self.history: list[dict] = []

    def epoch_bar(self, epoch, epochs, steps):
        return progress(steps, f"epoch {epoch + 1}/{epochs}", "step", enabled=not self.quiet)

    def epoch_end(self, epoch, metrics):
        import tensorflow as tf
        self.history.append({"epoch": epoch + 1, **metrics})
        with self.writer.as_default():
            for k, v in metrics.items():
                tf.summary.scalar(k, v, step=epoch + 1)
        self.writer.flush()
        self.line(f"epoch {epoch + 1}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        self._write_history()

    def line(self, text):
        print(text, file=self.stream, flush=True)

    def summary(self, doc: dict) -> None:
        if self.json:
            print(json_module.dumps(doc, indent=2, sort_keys=True), flush=True)

    def _write_history(self):
        keys = sorted({k for row in self.history for k in row}, key=lambda k: (k != "epoch", k))
        tmp = self.run_dir / ".history.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        tmp.replace(self.run_dir / "history.csv")

    def close(self):
        self.writer.close()
        if self.history:
            plot_curves(self.history, self.run_dir / "curves.png", title=self.title)


# Up to this many epochs each one is drawn as a marker: a line alone hides
# where the measurements are, and a single epoch would be no line at all.
MARKERS_UP_TO = 30


def curves_figure(history: list[dict], title: str | None = None):
    """The loss and accuracy panels of `history` (one dict per epoch)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    marker = "o" if len(epochs) <= MARKERS_UP_TO else None
    fig = Figure(figsize=(9, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        values = []
        for split in ("train", "test"):
            name = f"{split}_{key}"
            if any(name in h for h in history):
                ys = [h.get(name) for h in history]
                values += [y for y in ys if y is not None]
                ax.plot(epochs, ys, marker=marker, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        # Epochs are whole: no 1.5 ticks, and one epoch is a point in a
        # unit-wide window rather than at the centre of a 0.96-1.04 axis.
        first, last = min(epochs), max(epochs)
        if last - first < 12:  # MaxNLocator falls back to fractions below two integers
            ax.set_xticks(range(first, last + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(first - 0.5, last + 0.5)
        if values:
            ax.set_ylim(*_y_limits(key, values))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _y_limits(key: str, values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if key == "accuracy":  # a fraction: show at least 0.1 of it, never beyond [0, 1]
        pad = max(0.05, (hi - lo) * 0.1)
        return max(0.0, lo - pad), min(1.0, hi + pad) + 0.01
    return 0.0, (hi * 1.1 if hi > 0 else 1.0)  # a loss: from zero, so its size reads right


def plot_curves(history: list[dict], path: Path, title: str | None = None) -> None:
    from .checkpoint import atomic_write
    fig = curves_figure(history, title)
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
