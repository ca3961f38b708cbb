"""Constants shared by the fuzz cases, the worker and tests/test_fuzz.py."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED = 20240611
SENTINEL = "FUZZ_SENTINEL"   # a would-be command creates this file in the case directory
PROTO = "@@FUZZ@@ "

FAMILIES = {  # family: number of cases
    "keras_bytes": 70, "keras_zip": 80, "keras_config": 90, "weights_h5": 70,
    "legacy_h5": 70, "tfckpt": 70, "manifest": 90, "bombs": 17,
}
TRAINER_EVERY = 6  # one case in this many also runs `trainer --init X`
