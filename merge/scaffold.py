"""`merge scaffold`: SCAFFOLD's server step (Karimireddy et al., ICML 2020).

The new global model is the FedAvg of the sampled clients (merge.fedavg,
streamed and weighted by samples as always). The new server control is

    c <- c + (1/N) * sum over the sampled clients of (c_i+ - c_i)

with N every client of the federation, not only this round's: c stays the
mean of all N client controls when only some of them report (partial
participation). The client deltas come from each client run's scaffold.h5
(trainer --scaffold), c from the previous global's (none: zeros, a fresh
init). The output is a directory, the next round's --init, with its own
scaffold.h5 written beside the weights before anything is renamed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.checkpoint import read_manifest, round_of
from trainer.errors import UsageError
from trainer.files import controls


def server_control(previous: dict | None, deltas: list[dict], clients: int) -> dict:
    """c + sum(deltas) / clients, per key; `previous` None is zeros. Summed in
    float64: the deltas are small differences of similar numbers."""
    keys = deltas[0].keys()
    out = {}
    for k in keys:
        total = np.zeros(np.shape(deltas[0][k]), np.float64)
        for d in deltas:
            total += d[k]
        base = 0.0 if previous is None else np.asarray(previous[k], np.float64)
        out[k] = (base + total / clients).astype(np.float32)
    return out


def scaffold(previous: str, clients: list[str], out: str, total: int | None = None, overwrite: bool = False,
             quiet: bool = False) -> tuple[dict, list[str]]:
    """(summary, warnings) of one server step."""
    from .fedavg import Options, fedavg
    total = len(clients) if total is None else total
    if total < len(clients):
        raise UsageError(f"--clients {total}: fewer than the {len(clients)} client runs given; "
                         "--clients counts every client of the federation")
    if Path(out).suffix == ".keras":
        raise UsageError(f"-o {out}: SCAFFOLD's global is a directory (it holds the server control "
                         f"{controls.FILE} beside the weights); drop .keras")
    prev_dir = Path(previous)
    if not prev_dir.is_dir():
        raise UsageError(f"--global {previous}: expected the directory the clients started from "
                         "(a `trainer init` or the previous `merge scaffold` output)")
    prev = read_manifest(prev_dir)
    prev_round = round_of(prev)
    shapes = _shapes(clients[0])
    previous_c = None
    if controls.path_of(prev_dir).is_file():
        previous_c = controls.read(prev_dir, "server", shapes, "--global")[0]["control"]
    elif prev.get("kind") != "init" and prev_round != 0:
        raise UsageError(f"--global {previous}: holds no {controls.FILE}; it was not written by "
                         "`python -m merge scaffold`")
    deltas = []
    for c in clients:
        groups, attrs = controls.read(c, "client", shapes, "client")
        if attrs["lineage"] and prev.get("lineage") and attrs["lineage"] != prev["lineage"]:
            raise UsageError(f"{c}: its control variate belongs to another initialization than --global {previous}")
        if attrs["round"] != prev_round:
            raise UsageError(f"{c}: trained from the global of round {attrs['round']}, not from --global "
                             f"{previous} (round {prev_round}); pass the runs that started from it")
        deltas.append(groups["delta"])
    new_c = server_control(previous_c, deltas, total)

    def stage(tmp: Path) -> dict:
        controls.write(tmp, "server", {"control": new_c}, prev.get("lineage"),
                       None if prev_round is None else prev_round + 1, clients=total)
        return {"scaffold": {"file": controls.FILE, "clients": total, "sampled": len(clients),
                             "previous": str(previous)}}

    o = Options(inputs=list(clients), out=out, overwrite=overwrite, quiet=quiet, method="scaffold", stage=stage)
    try:
        summary = fedavg(o)
    finally:
        warnings = list(o.warnings)
    return summary, warnings


def _shapes(run) -> dict:
    """{key: shape} of the weights a client's controls cover: the keys its
    scaffold.h5 names, with the shapes of the client's model (the file's own
    shapes are what controls.read then checks)."""
    from trainer.files.sources import open_source
    keys = _control_keys(run)
    src = open_source(run)
    try:
        known = set(src.keys())
        shapes = {k: tuple(src.info(k)[0]) for k in keys if k in known}
    finally:
        src.close()
    if not shapes:
        raise UsageError(f"client {run}: its {controls.FILE} names none of the model's weights")
    return shapes


def _control_keys(run) -> list[str]:
    import h5py

    from trainer.files.hdf5 import open_h5
    path = controls.path_of(run)
    if not path.is_file():
        raise UsageError(f"client {run}: no {controls.FILE}; train it with `python -m trainer --scaffold`")
    with open_h5(path, f"client {path}") as f:
        g = f.get("control")
        return controls.keys_of(g) if isinstance(g, h5py.Group) else []

