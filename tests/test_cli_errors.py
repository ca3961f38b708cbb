"""Bad input: one line naming the problem, exit code 2, nothing overwritten."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import ok, trainer


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_usage_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def write_cifar_bin(root: Path, images_per_batch=4, truncate=None):
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = np.concatenate([rng.integers(0, 10, (images_per_batch, 1)),
                              rng.integers(0, 256, (images_per_batch, 3072))], axis=1).astype(np.uint8)
        data = rec.tobytes()
        if truncate == name:
            data = data[:-100]
        (d / name).write_bytes(data)
    return root


def test_unknown_model(cwd):
    assert_usage_error(trainer("--model", "resnet9000", cwd=cwd), "resnet9000")
    assert not (cwd / "runs").exists()


def test_unknown_data_set(cwd):
    assert_usage_error(trainer("--data", "imagenet", cwd=cwd), "imagenet")


def test_missing_data_directory(cwd):
    assert_usage_error(trainer("--data", "cifar10", "--data-dir", str(cwd / "nope"), cwd=cwd), "nope")
    assert_usage_error(trainer("--data", "cifar10", cwd=cwd), "--data-dir")


def test_truncated_cifar_file(cwd):
    write_cifar_bin(cwd / "c10", truncate="data_batch_3.bin")
    assert_usage_error(trainer("--data", "cifar10", "--data-dir", "c10", "--model", "cifar10_cnn", cwd=cwd),
                       "data_batch_3.bin")


def test_init_whose_shapes_do_not_match(cwd):
    ok(trainer("init", "--model", "mlp", "--data", "synthetic", "--out", "init32", cwd=cwd))
    before = _snapshot(cwd / "init32")
    # Same model name, other input shape: the checkpoint's kernels do not fit.
    assert_usage_error(trainer("--model", "mlp", "--data", "digits", "--init", "init32", "--out", "r", cwd=cwd),
                       "init32")
    assert _snapshot(cwd / "init32") == before
    assert not (cwd / "r").exists()


def test_resume_directory_of_another_model(cwd):
    ok(trainer("--epochs", "1", "--max-steps", "2", "--out", "run", "--quiet", cwd=cwd))
    before = _snapshot(cwd / "run")
    assert_usage_error(trainer("--model", "mlp", "--resume", "--out", "run", cwd=cwd), "digits_cnn", "mlp")
    assert _snapshot(cwd / "run") == before


def test_existing_run_directory_is_not_overwritten(cwd):
    ok(trainer("--epochs", "1", "--max-steps", "2", "--out", "run", "--quiet", cwd=cwd))
    before = _snapshot(cwd / "run")
    assert_usage_error(trainer("--epochs", "1", "--out", "run", cwd=cwd), "--resume")
    assert _snapshot(cwd / "run") == before


@pytest.mark.parametrize("args,needle", [
    (["--epochs", "0"], "--epochs"),
    (["--client", "0"], "--clients"),
    (["--split", "dirichlet:-1", "--client", "0", "--clients", "2"], "dirichlet"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags(cwd, args, needle):
    assert_usage_error(trainer(*args, cwd=cwd), needle)


def test_cifar10_cnn_trains_on_the_official_binary_layout(cwd):
    write_cifar_bin(cwd / "c10", images_per_batch=16)
    ok(trainer("--data", "cifar10", "--data-dir", "c10", "--model", "cifar10_cnn", "--epochs", "1",
               "--batch-size", "16", "--out", "run", "--quiet", cwd=cwd))
    assert (cwd / "run" / "model.keras").exists()
