"""Outputs are as readable as the user's umask says: colleagues on a shared
file system read a run, a merge and a federated run (issue 14, point 5).

Temporary files and directories (mkstemp, mkdtemp) are private whatever the
umask; every output is staged in one and renamed, so each must be given the
permissions open() and mkdir() would have given it."""
from __future__ import annotations

import stat
import sys

import pytest

from conftest import ok, run


def _under_umask(mask: int, *args, cwd, timeout=600):
    # The umask is set in the child's shell: the test process's own is shared
    # with every other test of this xdist worker.
    return run(["sh", "-c", f'umask {mask:03o}; exec "$@"', "sh", sys.executable, *args], cwd=cwd, timeout=timeout)


def _wrong_modes(root, mask: int) -> list[str]:
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    wrong = []
    for p in sorted(root.rglob("*")):
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = want_dir if p.is_dir() else want_file
        if mode != want:
            wrong.append(f"{p.relative_to(root)} {mode:o} (want {want:o})")
    return wrong


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_file_of_a_pruned_run_follows_the_umask(tmp_path, mask):
    ok(_under_umask(mask, "-m", "trainer", "init", "--out", "init", cwd=tmp_path))
    ok(_under_umask(mask, "-m", "trainer", "--structured", "--target-sparsity", "0.5", "--epochs", "1",
                    "--quiet", "--init", "init", "--out", "run", cwd=tmp_path))
    ok(_under_umask(mask, "-m", "trainer", "slice", "run/model.keras", "--fraction", "0.25", "-o",
                    "small.keras", cwd=tmp_path))
    kinds = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"manifest.json", "model.keras", "model.sparse.npz", "sparsity.png", "saved_model", "checkpoints",
            "curves.png", "history.csv"} <= kinds  # the outputs that were once private are all there
    assert _wrong_modes(tmp_path, mask) == []


def test_every_file_of_merges_and_a_federated_run_follows_the_umask(tmp_path):
    mask = 0o022
    for k in (0, 1):
        ok(_under_umask(mask, "-m", "trainer", "--model", "mlp", "--epochs", "1", "--quiet", "--client", k,
                        "--clients", "2", "--out", f"c{k}", cwd=tmp_path))
    ok(_under_umask(mask, "-m", "merge", "fedavg", "c0", "c1", "-o", "avg", "--quiet", cwd=tmp_path))
    ok(_under_umask(mask, "-m", "merge", "fedavg", "c0", "c1", "-o", "avg.keras", "--quiet", cwd=tmp_path))
    ok(_under_umask(mask, "-m", "merge", "server-step", "c0", "avg", "-o", "next", "--optimizer", "fedadam",
                    "--state", "server.h5", cwd=tmp_path))
    ok(_under_umask(mask, "-m", "merge", "ensemble", "c0", "c1", "-o", "ens.keras", cwd=tmp_path))
    ok(_under_umask(mask, "-m", "merge", "evaluate", "avg.keras", "ens.keras", "--data", "digits", "--plot",
                    "eval.png", cwd=tmp_path))
    ok(_under_umask(mask, "-m", "launch", "federated", "--simulate", "--model", "mlp", "--clients", "2",
                    "--rounds", "2", "--algorithm", "scaffold", "--quiet", "--out", "fed", cwd=tmp_path))
    made = {p.name for p in tmp_path.iterdir()}
    assert {"avg", "avg.keras", "next", "server.h5", "ens.keras", "eval.png", "fed"} <= made
    assert (tmp_path / "fed" / "rounds.png").is_file() and (tmp_path / "fed" / "round-002" / "global").is_dir()
    assert _wrong_modes(tmp_path, mask) == []
