"""TensorFlow's native log lines stay off the terminal unless asked for.

TensorFlow 2.21 writes native log lines (`I0000 00:00:... port.cc:153]
oneDNN custom operations are on` on CPUs where it turns oneDNN on by itself,
the CPU-instruction notice, on CUDA builds `E... Unable to register
cuDNN/cuFFT/cuBLAS factory`) while `import tensorflow` runs, before its C++
logging is initialized, so TF_CPP_MIN_LOG_LEVEL does not reach them; later
lines (grappler, collective ops, the coordination service) do obey it. On
every rank of every run they bury the one line that matters. `install()`,
called first by every `__main__`, picks one of three modes, which child
processes inherit through the environment:

- quiet (the default): TF_CPP_MIN_LOG_LEVEL=3 for everything after the
  import, and the import runs with file descriptor 2 pointed at a temporary
  file whose lines are written back without the native ones;
- the user's level: a TF_CPP_MIN_LOG_LEVEL the user set is kept, and the
  import's native lines below that level are dropped, so the variable means
  for the import what it means for the rest;
- verbose (`--verbose` before any `--`, or DPT_NATIVE_LOGS=1): nothing
  filtered; DPT_NATIVE_LOGS=1 is exported so that ranks and the trainers
  and merges a launcher starts are verbose too.

Turning oneDNN off (TF_ENABLE_ONEDNN_OPTS=0) would also silence its lines,
but costs 10-20% of throughput on the machines where it was on.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

QUIET_LEVEL = "3"
_OURS = "DPT_QUIET_TF_LEVEL"  # marks a TF_CPP_MIN_LOG_LEVEL we set, so children don't take it for the user's

# absl's native format: severity, date, time, thread, file:line]
NATIVE = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ [^\s\]]+:\d+\] ")
SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
_PREAMBLE = re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$")
# Lines that continue the native line before them (cpu_feature_guard, gpu_device).
_CONTINUATION = re.compile(rb"^(To enable the following instructions: .*|Skipping registering GPU devices\.\.\.)\s*$")


def filter_native(data: bytes, level: int) -> bytes:
    """`data` without native lines below `level` (0 INFO .. 3 FATAL) and
    their continuations; absl's preamble stays only if a native line does."""
    kept, keep_last, any_native = [], True, False
    preamble = []
    for line in data.splitlines(keepends=True):
        if m := NATIVE.match(line):
            keep_last = SEVERITY[m.group(1)] >= level
            any_native |= keep_last
        elif _PREAMBLE.match(line):
            preamble = [line]
            continue
        elif not _CONTINUATION.match(line):
            keep_last = True
        if keep_last:
            kept.append(line)
    return b"".join((preamble if any_native else []) + kept)


def verbose_requested(argv=None, env=os.environ) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    head = argv[:argv.index("--")] if "--" in argv else argv
    return "--verbose" in head or env.get("DPT_NATIVE_LOGS") == "1"


def import_level(argv=None, env=os.environ) -> int | None:
    """The lowest severity the import may show (None: all), setting the
    environment the rest of the process and its children will see."""
    if verbose_requested(argv, env):
        env["DPT_NATIVE_LOGS"] = "1"
        return None
    user = env.get("TF_CPP_MIN_LOG_LEVEL")
    if user is not None and env.get(_OURS) != user:
        try:
            return max(0, min(3, int(user)))
        except ValueError:
            return 0  # TensorFlow reads an unparsable level as 0
    env["TF_CPP_MIN_LOG_LEVEL"] = env[_OURS] = QUIET_LEVEL
    return int(QUIET_LEVEL)


class _QuietTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `tensorflow` once: imports it with stderr captured, then hands
    the import system the module it already made."""

    def __init__(self, level: int):
        self.level = level

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # the real import below must not come back here
        self.module = _captured_import(name, self.level)
        real = self.module.__spec__
        spec = importlib.util.spec_from_loader(name, self, origin=real.origin, is_package=True)
        spec.submodule_search_locations = real.submodule_search_locations
        return spec

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


def _captured_import(name, level: int):
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            return importlib.import_module(name)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            kept = filter_native(log.read(), level)
            if kept:
                os.write(2, kept)


def install() -> None:
    """Call first in a `__main__`, before anything imports tensorflow."""
    level = import_level()
    if level is None or "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow(level))
