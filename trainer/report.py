"""What the chief shows and logs: a progress bar, TensorBoard, history and curves.

Every other rank gets a Reporter that does nothing, so the loop never asks
which rank it is on.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from .progress import progress


class Reporter:
    def epoch_bar(self, epoch: int, epochs: int, steps: int):
        return _NullBar()

    def epoch_end(self, epoch: int, metrics: dict) -> None:
        pass

    def line(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


class ChiefReporter(Reporter):
    def __init__(self, run_dir: Path, quiet: bool = False):
        import tensorflow as tf
        self.run_dir = Path(run_dir)
        self.quiet = quiet
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
        print(text, flush=True)

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
            plot_curves(self.history, self.run_dir / "curves.png")


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        for split in ("train", "test"):
            name = f"{split}_{key}"
            if any(name in h for h in history):
                ax.plot(epochs, [h.get(name) for h in history], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
