"""Streaming FedAvg on large checkpoints: time and peak memory, in one run.

Synthetic inputs: up to 8 plain Keras `.keras` files of about --size-mib each
(one functional model of five Dense layers, each file different random
values), generated once per work directory and kept between runs.

For each number of inputs n, interleaved over --repeats repetitions, each
command a separate process timed from outside by /usr/bin/time (wall
seconds, peak RSS), the median reported:
  cat f1..fn > /dev/null                      the reading floor;
  python -m merge fedavg f1..fn -o DIR         the headline;
  python -m merge fedavg f1..fn -o OUT.keras   plus the zip copy of the output;
  python bench/naive_average.py f1..fn -o OUT.keras
                                               load_model every input whole,
                                               np.mean of get_weights(), save;
and once per repetition `cp f1 COPY`, the cost of writing one output.

Before each timed command the inputs are read once untimed (so every method
reads from the page cache), earlier outputs are removed and `sync` runs.
Unless --no-cold, cat and fedavg (directory) are also timed after evicting
the inputs from the page cache (posix_fadvise DONTNEED).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from merge.fedavg import SLAB_BYTES

from .scaling import REPO, _cpu_name, _env, write_section

TIME = "/usr/bin/time"
MB = 1e6
MiB = 1 << 20
MAX_INPUTS = 8
LAYERS = ("fc1", "fc2", "fc3", "fc4", "fc5")
MEMORY_GUARD = 1 << 30  # kill a measured command when the machine has less than this left


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- synthetic inputs -------------------------------------------------------

def width_for(size_mib: int) -> int:
    """Input(w/2) -> Dense(w) x4 -> Dense(w/2) holds 4 w^2 float32 weights (16 w^2 bytes)."""
    return max(64, int(round(math.sqrt(size_mib * MiB / 16) / 64)) * 64)


def shapes(width: int) -> dict[str, tuple]:
    dims = [width // 2, width, width, width, width, width // 2]
    out = {}
    for name, (a, b) in zip(LAYERS, zip(dims, dims[1:])):
        out[f"{name}/kernel"] = (a, b)
        out[f"{name}/bias"] = (b,)
    return out


def generate_one(path: str, width: int, seed: int) -> None:
    """Run in its own process: one model, random values, plain model.save."""
    import keras
    import numpy as np
    dims = [width // 2, width, width, width, width, width // 2]
    x = inp = keras.Input((dims[0],), name="x")
    for name, units in zip(LAYERS, dims[1:]):
        x = keras.layers.Dense(units, activation="relu" if name != LAYERS[-1] else None, name=name,
                                  kernel_initializer="zeros")(x)
    model = keras.Model(inp, x, name="big_mlp")
    rng = np.random.default_rng(seed)
    for layer in model.layers[1:]:
        k, b = (w.shape for w in layer.weights)
        kernel = rng.standard_normal(tuple(k), dtype=np.float32)
        kernel *= 0.02
        layer.set_weights([kernel, rng.standard_normal(tuple(b), dtype=np.float32) * 0.02])
        del kernel
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def prepare(work: Path, size_mib: int, count: int) -> tuple[list[Path], int]:
    """The inputs, generated unless the work directory's stamp says they exist."""
    width = width_for(size_mib)
    paths = [work / f"in_{i + 1}.keras" for i in range(count)]
    stamp = work / "stamp.json"
    recorded = json.loads(stamp.read_text()) if stamp.exists() else {}
    if recorded.get("width") == width:
        sizes = recorded.get("sizes", {})
        if all(p.exists() and p.stat().st_size == sizes.get(p.name) for p in paths):
            _log(f"reusing {count} inputs in {work} (width {width})")
            return paths, width
    else:
        recorded = {"width": width, "size_mib": size_mib, "sizes": {}}
    for p in paths:
        if p.exists() and p.stat().st_size == recorded["sizes"].get(p.name):
            continue
        t0 = time.time()
        seed = int(p.stem.split("_")[1])
        subprocess.run([sys.executable, "-c", "import sys; from bench.merge_stream import generate_one; "
                        "generate_one(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))", str(p), str(width), str(seed)],
                       cwd=REPO, env=_env(), check=True)
        recorded["sizes"][p.name] = p.stat().st_size
        stamp.write_text(json.dumps(recorded, indent=1))
        _log(f"generated {p} ({p.stat().st_size / MiB:.0f} MiB) in {time.time() - t0:.0f} s")
    return paths, width


def check_disk(work: Path, size_mib: int, count: int) -> None:
    """Inputs (those not yet there), plus the largest output at one time (a
    .keras merge holds its weights twice while zipping) and a copy, plus 1 GiB."""
    existing = sum(p.stat().st_size for p in work.glob("in_*.keras"))
    need = count * size_mib * MiB * 1.01 - existing + 3 * size_mib * MiB + (1 << 30)
    free = shutil.disk_usage(work).free
    if free < need:
        sys.exit(f"error: {work} has {free / 2**30:.1f} GiB free; the benchmark needs {need / 2**30:.1f} GiB "
                 f"more ({count} inputs of {size_mib} MiB and their outputs). Free space or pass --work elsewhere.")


# -- measuring --------------------------------------------------------------

def warm(paths) -> None:
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd, work: Path) -> dict:
    """Wall seconds and peak RSS of one command in its own process, or why it
    failed. Peak RSS is GNU time's; the wall time is taken around it here, at
    a finer resolution than its 10 ms. A command that would exhaust the
    machine's memory is killed and reported so."""
    import threading

    import psutil
    os.sync()
    report = work / "time.out"
    err = work / "stderr.txt"
    guard = {}

    def watch(proc):
        while proc.poll() is None:
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
                guard["peak"] = max(guard.get("peak", 0), sum(c.memory_info().rss for c in tree))
            except psutil.Error:
                tree = []
            left = psutil.virtual_memory().available
            if left < MEMORY_GUARD and tree:
                guard["left"] = left
                for c in tree:
                    try:
                        c.kill()
                    except psutil.Error:
                        pass
            time.sleep(0.1)

    with open(err, "wb") as errf:
        t0 = time.perf_counter()
        proc = subprocess.Popen([TIME, "-f", "%e %M", "-o", str(report), *map(str, cmd)], cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=errf)
        watcher = threading.Thread(target=watch, args=(proc,), daemon=True)
        watcher.start()
        proc.wait()
        wall = time.perf_counter() - t0
        watcher.join()
    lines = report.read_text().strip().splitlines()
    rss_kib = lines[-1].split()[1]
    out = {"wall": wall, "rss": int(rss_kib) * 1024, "ok": proc.returncode == 0 and "left" not in guard}
    if "left" in guard:
        out["note"] = (f"killed by the benchmark at {guard['peak'] / 2**30:.1f} GiB RSS: the machine had "
                       f"{guard['left'] / 2**30:.2f} GiB left")
    elif proc.returncode != 0:
        tail = [ln for ln in err.read_text(errors="replace").strip().splitlines() if ln.strip()]
        status = next((ln for ln in lines if ln.startswith("Command")), f"exit {proc.returncode}")
        out["note"] = f"{status}; {tail[-1][:200] if tail else ''}"
    return out


def clean(*paths) -> None:
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for stray in p.parent.glob(".out*"):  # a killed merge's temporary directory
        shutil.rmtree(stray, ignore_errors=True)
    os.sync()


# -- checking the results ----------------------------------------------------

def _open_weights(path: Path):
    """A .keras's weights through zipfile's own member object, not merge's
    readers, so that the check is independent (slow backward seeks on
    Python 3.11, fine for a few tensors)."""
    import zipfile

    import h5py
    member = zipfile.ZipFile(path).open("model.weights.h5")
    return h5py.File(member, "r"), member


def read_tensor(path: Path, dataset: str):
    import h5py
    path = Path(path)
    if path.is_dir():
        with h5py.File(path / "model.weights.h5", "r") as h5:
            return h5[dataset][()]
    h5, member = _open_weights(path)
    with h5, member:
        return h5[dataset][()]


def largest_dataset(path: Path) -> tuple[str, tuple]:
    import h5py
    found = []
    h5, member = _open_weights(path)
    with h5, member:
        h5.visititems(lambda name, obj: found.append((obj.size, name, obj.shape))
                      if isinstance(obj, h5py.Dataset) else None)
    _, name, shape = max(found)
    return name, shape


def mean_of(paths, dataset: str):
    import numpy as np
    acc = None
    for p in paths:
        x = read_tensor(p, dataset).astype(np.float64)
        acc = x if acc is None else np.add(acc, x, out=acc)
    return acc / len(paths)


def max_diff(a, b) -> float:
    import numpy as np
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -- the run -------------------------------------------------------------------

METHODS = ("cat", "fedavg_dir", "fedavg_keras", "naive")
COLD = ("cat_cold", "fedavg_dir_cold")
LABELS = {"cat": "cat f1..fn > /dev/null", "fedavg_dir": "merge fedavg -o DIR",
          "fedavg_keras": "merge fedavg -o OUT.keras", "naive": "naive (load_model, np.mean, save)",
          "cat_cold": "cat, inputs evicted from page cache", "fedavg_dir_cold": "merge fedavg -o DIR, inputs evicted"}


def command(method: str, paths, work: Path):
    base = method.removesuffix("_cold")
    if base == "cat":
        return ["cat", *paths], None
    if base == "fedavg_dir":
        out = work / "out_dir"
        return [sys.executable, "-m", "merge", "fedavg", *paths, "-o", out, "--quiet", "--uniform"], out
    if base == "fedavg_keras":
        out = work / "out.keras"
        return [sys.executable, "-m", "merge", "fedavg", *paths, "-o", out, "--quiet", "--uniform"], out
    out = work / "out_naive.keras"
    return [sys.executable, REPO / "bench" / "naive_average.py", *paths, "-o", out], out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench merge")
    p.add_argument("--size-mib", type=int, default=1024, help="size of each synthetic input")
    p.add_argument("--inputs", default="2,8", help="numbers of inputs to merge, up to 8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench-merge"),
                   help="inputs are generated here once and kept")
    p.add_argument("--no-cold", action="store_true", help="skip the measurements with evicted inputs")
    p.add_argument("--write", default=str(REPO / "docs" / "benchmarks.md"))
    a = p.parse_args(argv)
    ns = [int(x) for x in a.inputs.split(",")]
    if not all(2 <= n <= MAX_INPUTS for n in ns):
        sys.exit(f"error: --inputs {a.inputs}: each must be between 2 and {MAX_INPUTS}")
    if not Path(TIME).exists():
        sys.exit(f"error: {TIME} (GNU time) is needed to measure peak memory")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    check_disk(work, a.size_mib, max(ns))
    paths, width = prepare(work, a.size_mib, max(ns))
    input_bytes = statistics.mean(p.stat().st_size for p in paths)
    largest = width * width * 4
    methods = METHODS + (() if a.no_cold else COLD)
    results = {(n, m): [] for n in ns for m in methods}
    copies = []
    checks = {}
    scratch = work / "copy.bin"
    measured_from = time.time()
    for rep in range(a.repeats):
        warm(paths[:1])
        clean(scratch)
        copies.append(timed(["cp", paths[0], scratch], work))
        clean(scratch)
        _log(f"rep {rep + 1}/{a.repeats} cp of one input: {copies[-1]['wall']:.2f} s")
        for n in ns:
            files = paths[:n]
            for m in methods:
                cmd, out = command(m, files, work)
                if out is not None:
                    clean(out)
                if m.endswith("_cold"):
                    evict(files)
                else:
                    warm(files)
                r = timed(cmd, work)
                results[(n, m)].append(r)
                _log(f"rep {rep + 1}/{a.repeats} n={n} {m}: {r['wall']:.3f} s, {r['rss'] / MB:.0f} MB"
                     + ("" if r["ok"] else f" FAILED: {r['note']}"))
                if rep == 0 and r["ok"] and m in ("fedavg_dir", "fedavg_keras", "naive"):
                    checks.setdefault(n, {})[m] = out
                    _check(checks[n], m, files, work)
                if out is not None:
                    clean(out)
    seconds = time.time() - started
    (work / "results.json").write_text(json.dumps({
        "args": vars(a), "width": width, "largest": largest, "input_bytes": input_bytes, "cp": copies,
        "checks": checks, "runs": {f"{n} {m}": v for (n, m), v in results.items()}}, indent=1, default=str))
    for f in (work / "time.out", work / "stderr.txt"):
        f.unlink(missing_ok=True)
    for n in ns:
        for f in work.glob(f"check_{n}_*.npy"):
            f.unlink()
    report = render(ns, results, copies, checks, a, width, largest, input_bytes, seconds,
                    time.time() - measured_from)
    print(report)
    if a.write:
        write_section(Path(a.write), "merge", report)
    return 0


def _check(state: dict, method: str, files, work: Path) -> None:
    """Once per n: our output against the float64 mean of the inputs on the
    largest tensor; the naive output against ours."""
    import numpy as np
    if "dataset" not in state:
        state["dataset"], state["shape"] = largest_dataset(files[0])
    ds = state["dataset"]
    got = read_tensor(state[method], ds)
    if method == "fedavg_dir":
        state["fedavg_vs_mean"] = max_diff(got, mean_of(files, ds))
        np.save(work / f"check_{len(files)}_ours.npy", got)
    else:
        ours = work / f"check_{len(files)}_ours.npy"
        state[f"{method}_vs_ours"] = max_diff(got, np.load(ours)) if ours.exists() else None
    state.pop(method)


def _median(runs, key):
    ok = [r[key] for r in runs if r["ok"]]
    return statistics.median(ok) if ok else None


def render(ns, results, copies, checks, a, width, largest, input_bytes, seconds, measured) -> str:
    bound = 3 * largest + 300 * MB
    cp_s = _median(copies, "wall")
    cp_rss = _median(copies, "rss")
    cores = os.cpu_count()

    def cell(n, m, key):
        runs = results[(n, m)]
        v = _median(runs, key)
        if v is None:
            return "failed: " + "; ".join(sorted({r.get("note", "?") for r in runs}))
        return f"{v:.2f}" if key == "wall" else f"{v / MB:.0f}"

    rows = []
    for n in ns:
        cat = _median(results[(n, "cat")], "wall")
        for m in (mm for mm in METHODS + COLD if (n, mm) in results):
            runs = results[(n, m)]
            w = _median(runs, "wall")
            ref = _median(results[(n, "cat_cold")], "wall") if m.endswith("_cold") else cat
            ratio = f"{w / ref:.2f}" if w is not None and ref else "-"
            every = ", ".join(f"{r['wall']:.2f}" if r["ok"] else "failed" for r in runs)
            rows.append(f"| {n} | {LABELS[m]} | {cell(n, m, 'wall')} | {every} | {ratio} | {cell(n, m, 'rss')} |")
    lines = [
        f"## Streaming FedAvg of large checkpoints (synthetic {input_bytes / 2**30:.2f} GiB `.keras` inputs)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()} with {cores} cores ({_cpu_name()}), "
        f"Python {platform.python_version()}; median of {a.repeats} interleaved repetitions "
        f"({measured / 60:.1f} min of measuring, {seconds / 60:.1f} min with generating the inputs). "
        f"`python -m bench merge` reproduces it "
        f"(here `python -m bench.merge_stream --size-mib {a.size_mib} --inputs {a.inputs} --repeats {a.repeats}`).",
        "",
        f"Inputs: {max(ns)} files written by plain Keras `model.save`, one functional model "
        f"Input({width // 2}) -> Dense({width}) x4 -> Dense({width // 2}), float32, different random values in each; "
        f"{input_bytes / MB:.0f} MB per file; largest tensor {width}x{width} = {largest / MB:.0f} MB. "
        "Every command is its own process, run under GNU `/usr/bin/time` (peak RSS) and timed around it (wall); "
        "before each, the inputs are read once untimed so that every method reads them from the page cache "
        "(the cold rows evict them first with `posix_fadvise(DONTNEED)`; this VM's host may still cache them), "
        "earlier outputs are removed and `sync` runs. Times include writing the output into the page cache, "
        "not flushing it to disk (no method fsyncs). fedavg runs with `--uniform --quiet`. MB = 10^6 bytes.",
        "",
        "| inputs | method | wall s (median) | runs | / cat | peak RSS MB |",
        "|---|---|---|---|---|---|",
        *rows,
        f"| 1 | cp of one input to a new file (the output's write floor) | {cp_s:.2f} | "
        f"{', '.join(f'{w:.2f}' for w in (r['wall'] for r in copies))} | | {cp_rss / MB:.0f} |",
        "",
        ("Cold rows are divided by the cold cat. " if not a.no_cold else "") + "The merge writes a 1 GiB-class output that `cat` never writes; "
        "the cp row is the cost of writing one such file here, so a merge that read as fast as cat and wrote as "
        "fast as cp would sit at (cat + cp) / cat, the floor row below.",
        "",
        "| target | " + " | ".join(f"n={n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]

    def target_row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(n) for n in ns) + " |")

    def ratio_cell(n, m, limit):
        w, c = _median(results[(n, m)], "wall"), _median(results[(n, "cat")], "wall")
        if w is None or not c:
            return "failed"
        r = w / c
        return f"{r:.2f} ({'met' if r <= limit else 'not met'})"

    def rss_cell(n, m):
        v = _median(results[(n, m)], "rss")
        return "failed" if v is None else f"{v / MB:.0f} MB ({'met' if v <= bound else 'not met'})"

    target_row("merge fedavg -o DIR: wall / cat <= 2", lambda n: ratio_cell(n, "fedavg_dir", 2))
    target_row("merge fedavg -o OUT.keras: wall / cat <= 2", lambda n: ratio_cell(n, "fedavg_keras", 2))
    target_row(f"merge fedavg -o DIR: peak RSS <= 3 x largest tensor + 300 MB = {bound / MB:.0f} MB",
               lambda n: rss_cell(n, "fedavg_dir"))
    target_row(f"merge fedavg -o OUT.keras: peak RSS <= {bound / MB:.0f} MB", lambda n: rss_cell(n, "fedavg_keras"))
    target_row("floor: (cat + cp of one output) / cat",
               lambda n: f"{(_median(results[(n, 'cat')], 'wall') + cp_s) / _median(results[(n, 'cat')], 'wall'):.2f}")
    target_row("naive: wall / merge fedavg -o OUT.keras",
               lambda n: (f"{_median(results[(n, 'naive')], 'wall') / _median(results[(n, 'fedavg_keras')], 'wall'):.1f}x"
                          if _median(results[(n, "naive")], "wall") and _median(results[(n, "fedavg_keras")], "wall")
                          else "failed"))
    target_row("naive: peak RSS / merge fedavg -o OUT.keras",
               lambda n: (f"{_median(results[(n, 'naive')], 'rss') / _median(results[(n, 'fedavg_keras')], 'rss'):.1f}x"
                          if _median(results[(n, "naive")], "rss") and _median(results[(n, "fedavg_keras")], "rss")
                          else "failed"))
    target_row("max abs diff, largest tensor: fedavg vs float64 mean of the inputs",
               lambda n: _fmt(checks.get(n, {}).get("fedavg_vs_mean")))
    target_row("max abs diff, largest tensor: fedavg .keras vs fedavg directory",
               lambda n: _fmt(checks.get(n, {}).get("fedavg_keras_vs_ours")))
    target_row("max abs diff, largest tensor: naive vs fedavg", lambda n: _fmt(checks.get(n, {}).get("naive_vs_ours")))
    if len(ns) > 1:
        flat = []
        for m in ("fedavg_dir", "fedavg_keras"):
            vals = [_median(results[(n, m)], "rss") for n in ns]
            if all(vals):
                spread = max(vals) / min(vals) - 1
                flat.append(f"{LABELS[m]}: {' / '.join(f'{v / MB:.0f}' for v in vals)} MB for "
                            f"n = {' / '.join(map(str, ns))}, {spread:.1%} apart "
                            f"({'the same within 10%: met' if spread <= 0.10 else 'more than 10% apart: not met'})")
        lines += ["", "Peak memory against the number of inputs: " + "; ".join(flat) + "."]
    lines += [
        "",
        "Why memory stays flat: `merge fedavg` never holds a whole input. It reads each tensor in slabs of "
        f"rows of at most {SLAB_BYTES >> 20} MiB into two reusable buffers (the first input's slab becomes the accumulator; "
        "every later input is read into the second, scaled and added in place), writes the slab into an "
        "output whose blocks were allocated up front, and moves on; n inputs cost n reads, not n buffers. "
        "The naive average holds every model and every `get_weights()` copy at once, so it grows with n.",
    ]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1e}"


if __name__ == "__main__":
    sys.exit(main())
