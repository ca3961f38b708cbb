"""The schedules against TensorFlow Model Optimization's own, step by step.

TFMOT is imported only here and in bench/, never in the trainer process
(see trainer/pruning/schedule.py for why)."""
import subprocess
import sys

import numpy as np
import pytest

from trainer.pruning.schedule import Schedule

REFERENCE = """
import json, sys
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_schedule as s
kind, target, begin, end, every = sys.argv[1], float(sys.argv[2]), *map(int, sys.argv[3:])
f = s.PolynomialDecay(0.0, target, begin, end, frequency=every) if kind == "polynomial" else \\
    s.ConstantSparsity(target, begin, end, frequency=every)
print(json.dumps([[bool(a), float(b)] for a, b in (f(t) for t in range(end + 20))]))
"""


@pytest.mark.parametrize("kind,target,begin,end,every", [
    ("polynomial", 0.9, 0, 100, 10), ("polynomial", 0.8, 15, 107, 7), ("constant", 0.5, 5, 60, 5)])
def test_matches_tfmot(kind, target, begin, end, every):
    out = subprocess.run([sys.executable, "-c", REFERENCE, kind, str(target), str(begin), str(end), str(every)],
                         capture_output=True, text=True, check=True, env={"TF_CPP_MIN_LOG_LEVEL": "3",
                                                                           "PATH": "/usr/bin:/bin"}).stdout
    import json
    ref = json.loads(out)
    ours = Schedule(kind, target, begin, end, every)
    for step, (should, sparsity) in enumerate(ref):
        mine_should, mine_sparsity = ours.at(step)
        # Ours also updates on the end step when TFMOT's frequency skips it.
        assert mine_should == (should or step == end), step
        assert mine_sparsity == pytest.approx(sparsity, abs=1e-6), step
    assert ours.at(end) == (True, pytest.approx(target))
    assert np.isclose(ours.at(end + 5)[1], target) and not ours.at(end + 5)[0]
