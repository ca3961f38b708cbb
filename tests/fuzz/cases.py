"""Cases: what one `family:index` id writes (make_case dispatches to its
family's generator) and which commands the worker runs on it (Case.spec)."""
from __future__ import annotations

import random
from pathlib import Path

from .archives import keras_bytes, keras_config, keras_zip
from .bombs import bombs
from .files import legacy_h5, manifest, tfckpt, weights_h5
from .settings import FAMILIES, SEED, SENTINEL, TRAINER_EVERY

GENERATORS = {  # family: the function that writes a case's input
    "keras_bytes": keras_bytes, "keras_zip": keras_zip, "keras_config": keras_config,
    "weights_h5": weights_h5, "legacy_h5": legacy_h5, "tfckpt": tfckpt, "manifest": manifest,
    "bombs": bombs,
}
assert GENERATORS.keys() == FAMILIES.keys()


class Case:
    def __init__(self, family, index):
        self.family, self.index = family, index
        self.id = f"{family}:{index}"
        self.rng = random.Random(f"{SEED}:{self.id}")
        self.desc = ""
        self.input = None          # path handed to the commands
        self.kind = None           # keras | weights | legacy | prefix | ckptdir | rundir
        self.good = None           # a valid same-architecture input for fedavg/diff
        self.trainer = index % TRAINER_EVERY == 0
        self.trainer_model = "mlp"  # None: let the input choose (manifest family)
        self.syspath = False       # put the case directory first on sys.path (python -m does so with cwd)
        self.op = family          # the mutation's kind, which names memory failures
        self.only = None          # run only these commands ("inspect", "fedavg", ..., "trainer")

    def spec(self, dir_: Path) -> dict:
        """What the worker runs: commands with their allowed exit codes."""
        x, out = str(self.input), str(dir_ / "out.keras")
        cmds = [("merge", ["inspect", x] + (["--json"] if self.index % 2 else []), (0, 2)),
                ("merge", ["diff", x, self.good], (0, 1, 2)),
                ("merge", ["fedavg", x, self.good, "-o", out, "--quiet"], (0, 2))]
        if self.kind in ("keras", "legacy", "ckptdir", "rundir"):
            cmds.append(("merge", ["evaluate", x, "--data", "digits"], (0, 2)))
        if self.trainer or (self.only and "trainer" in self.only):
            argv = ["--init", x, "--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--backend",
                    "single", "--quiet", "--out", str(dir_ / "trainer-out")]
            if self.trainer_model:
                argv += ["--model", self.trainer_model]
            cmds.append(("trainer", argv, (0, 2)))
        if self.only is not None:
            cmds = [c for c in cmds if (c[0] if c[0] == "trainer" else c[1][0]) in self.only]
        return {"id": self.id, "dir": str(dir_), "desc": self.desc, "syspath": self.syspath,
                "sentinel": str(dir_ / SENTINEL), "op": self.op,
                "cmds": [{"tool": t, "argv": a, "allowed": list(ok)} for t, a, ok in cmds]}


def make_case(family: str, index: int, seeds: dict, dir_: Path) -> Case:
    """Write case `family:index`'s input under `dir_` (created); deterministic."""
    dir_.mkdir(parents=True, exist_ok=True)
    c = Case(family, index)
    GENERATORS[family](c, seeds, dir_)
    return c
