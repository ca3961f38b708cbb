"""Progress for long work: a tqdm bar on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns; in a Slurm log, a file tee'd
from a pipe, or CI output those become one endless line of `\\r` runs. So the
bar is drawn only when its stream is a terminal. Anywhere else the same
progress is written as a plain line each time another `every` percent is
done (and at the end), which reads well in a log.
"""
from __future__ import annotations

import sys
import time


def progress(total: float, desc: str, unit: str = "it", *, enabled: bool = True, file=None,
             every: int = 10, unit_scale: bool = False, leave: bool = True):
    """A bar-like object (update, set_postfix, close; a context manager)."""
    file = sys.stderr if file is None else file
    if not enabled or not total or total <= 0:
        return NullProgress()
    if _is_tty(file):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=file, leave=leave,
                    mininterval=0.5, dynamic_ncols=True)
    return PlainProgress(total, desc, unit, file, every, unit_scale)


def _is_tty(file) -> bool:
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class NullProgress:
    """Progress that shows nothing (disabled, or not the chief)."""

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PlainProgress(NullProgress):
    """One line per `every` percent: `desc: 40% (12/30 step, 3.1 s)`."""

    def __init__(self, total, desc, unit, file, every, unit_scale):
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.every, self.unit_scale = max(1, min(100, int(every))), unit_scale
        self.n = 0
        self.shown = 0  # the last percent step written
        self.postfix = ""
        self.start = time.monotonic()

    def update(self, n=1):
        self.n += n
        step = int(min(self.n, self.total) * 100 / self.total) // self.every * self.every
        if step > self.shown:
            self.shown = step
            self._write(step)

    def set_postfix(self, **kw):
        self.postfix = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items())

    def close(self):
        if self.shown < 100 and self.n > 0:  # a loop that ended early says where
            self._write(int(min(self.n, self.total) * 100 / self.total))
            self.shown = 100

    def _amount(self, x) -> str:
        if not self.unit_scale:
            return f"{x:g}"
        for prefix in ("", "k", "M", "G", "T"):
            if abs(x) < 1000:
                return f"{x:.3g}{prefix}"
            x /= 1000
        return f"{x:.3g}P"

    def _write(self, percent: int):
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {percent}% ({self._amount(self.n)}/{self._amount(self.total)} {self.unit}, "
              f"{time.monotonic() - self.start:.1f} s{tail})", file=self.file, flush=True)
