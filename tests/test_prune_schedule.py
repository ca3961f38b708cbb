"""The schedules against TensorFlow Model Optimization's own, step by step.

TFMOT supports only Keras 2, so it cannot be imported beside TensorFlow 2.21
and Keras 3: its schedules were recorded in a TF 2.15 / TFMOT 0.8.0
environment (tests/fixtures/tfmot/make_schedules.py) and are compared here."""
import json
from pathlib import Path

import numpy as np
import pytest

from trainer.pruning.schedule import Schedule

CASES = json.loads((Path(__file__).parent / "fixtures" / "tfmot" / "schedules.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['kind']}-{c['target']}-{c['begin']}-{c['end']}")
def test_matches_tfmot(case):
    kind, target, begin, end, every = (case[k] for k in ("kind", "target", "begin", "end", "every"))
    ours = Schedule(kind, target, begin, end, every)
    for step, (should, sparsity) in enumerate(case["steps"]):
        mine_should, mine_sparsity = ours.at(step)
        # Ours also updates on the end step when TFMOT's frequency skips it.
        assert mine_should == (should or step == end), step
        assert mine_sparsity == pytest.approx(sparsity, abs=1e-6), step
    assert ours.at(end) == (True, pytest.approx(target))
    assert np.isclose(ours.at(end + 5)[1], target) and not ours.at(end + 5)[0]
