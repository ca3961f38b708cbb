"""An unexpected failure is one line first; its traceback goes to a file the line names.

Ninety lines of traceback from every rank bury the one that says what went
wrong, and a Slurm log keeps only what reached stderr. So every entry point
prints `error: [rank R: ]Type: message (traceback in FILE)` and writes the
traceback to FILE: RUN_DIR/logs/rank-R.log once the trainer knows its run
directory, the federated run's logs/ for launch, else a file under the
temporary directory.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from .errors import one_line

_where = {"dir": None}


def set_log_dir(path) -> None:
    """Where tracebacks of this process go from now on (created when needed)."""
    _where["dir"] = Path(path)


def log_path(prog: str, rank: int | None = None, directory: Path | None = None) -> Path:
    name = f"rank-{rank}.log" if rank is not None else f"{prog}.log"
    if directory is not None:
        return directory / name
    return Path(tempfile.gettempdir()) / "dptoolkit-logs" / f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{name}"


def report(e: BaseException, prog: str, rank: int | None = None) -> str:
    """Write `e`'s traceback to the log file; return the one line to print."""
    text = "".join(traceback.format_exception(e))
    where = None
    # The run directory's logs/ first; the temporary directory if that cannot be written.
    places = [log_path(prog, rank, _where["dir"])] + ([log_path(prog, rank)] if _where["dir"] is not None else [])
    for path in places:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n{text}")
            where = path
            break
        except OSError:
            continue
    who = f"rank {rank}: " if rank is not None else ""
    tail = f" (traceback in {where})" if where else ""
    return f"error: {who}{one_line(e, 300)}{tail}"

