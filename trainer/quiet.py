"""Keep TensorFlow's start-up banners off the terminal; everything else passes.

TensorFlow 2.21 writes its native log lines while `import tensorflow` runs,
before its C++ logging is initialized, so TF_CPP_MIN_LOG_LEVEL does not
reach them: "All log messages before absl::InitializeLog()", "oneDNN custom
operations are on" (twice), the CPU-instruction notice, and on CUDA builds
"Unable to register cuDNN/cuFFT/cuBLAS factory". On every rank of every run
they bury the one line that matters. `install()` makes the first import of
tensorflow run with file descriptor 2 pointed at a temporary file, then
writes back every line that is not one of those banners. Only that import
is captured: a later error reaches stderr at once. Turning oneDNN off
(TF_ENABLE_ONEDNN_OPTS=0) would also silence it, but costs 10-20% of
throughput here. DPT_NATIVE_LOGS=1 shows everything, as TensorFlow prints it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

BANNERS = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\..*"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized.*"
    rb"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\."
    rb"|[IWE]\d{4} [\d:.]+ +\d+ cuda_(dnn|fft|blas)\.cc:\d+\] Unable to register cu(DNN|FFT|BLAS) factory.*"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ \w+\.cc:\d+\] computation placer already registered.*"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ cuda_executor\.cc:\d+\] .*(CUDA|cuInit).*"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ gpu_device\.cc:\d+\] .*Cannot dlopen some GPU libraries.*"
    rb"|Skipping registering GPU devices\.\.\.)\s*$"
)


def strip_banners(data: bytes) -> bytes:
    return b"".join(line for line in data.splitlines(keepends=True) if not BANNERS.match(line))


class _QuietTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `tensorflow` once: imports it with stderr captured, then hands
    the import system the module it already made."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # the real import below must not come back here
        self.module = _captured_import(name)
        real = self.module.__spec__
        spec = importlib.util.spec_from_loader(name, self, origin=real.origin, is_package=True)
        spec.submodule_search_locations = real.submodule_search_locations
        return spec

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


def _captured_import(name):
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
            kept = strip_banners(log.read())
            if kept:
                os.write(2, kept)


def install() -> None:
    """Call first in a `__main__`, before anything imports tensorflow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("DPT_NATIVE_LOGS") == "1" or "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())
