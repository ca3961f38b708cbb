"""Fuzz inputs for tests/test_fuzz.py: valid seed files, deterministic mutants
of them, and the worker process that runs the CLIs on each mutant in-process.

Each case is `family:index`, fully determined by that id. Modules:
  settings.py   constants: SEED, SENTINEL, PROTO, FAMILIES (case counts), REPO
  seeds.py      build_seeds: the valid inputs every mutant starts from
  mutate.py     byte, zip-structure, JSON and HDF5 mutation helpers
  archives.py   families keras_bytes, keras_zip, keras_config (.keras archives)
  files.py      families weights_h5, legacy_h5, tfckpt, manifest
  bombs.py      family bombs: zip bombs, huge HDF5 datasets, huge configs
  cases.py      Case (the commands a case runs) and make_case (family dispatch)
  worker.py     `python -m fuzz.worker`: runs the CLIs in-process with limits
"""
from .cases import Case, make_case
from .settings import FAMILIES, PROTO, REPO, SEED, SENTINEL, TRAINER_EVERY

__all__ = ["Case", "make_case", "FAMILIES", "PROTO", "REPO", "SEED", "SENTINEL", "TRAINER_EVERY"]
