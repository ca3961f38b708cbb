"""`merge fedavg`: the weighted average of models that share an initialization,
streamed one tensor (or one slab of rows) at a time."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from trainer.checkpoint import package_versions, round_of
from trainer.errors import UsageError

from .aggregate import Select, first_of, krum_index, parse_aggregator, reprune
from .inputs import Inputs
from .output import WeightsWriter, check_output
from .records import common_data, data_name

# Slabs bound memory by the slab, not the largest tensor. 8 MiB measured
# faster than 64 MiB here (bench/merge_stream.py): the arithmetic stays in
# cache and the page cache takes smaller writes more evenly; peak memory
# fell from ~205 MB to ~75 MB.
SLAB_BYTES = 8 << 20
WORSE_BY = 0.05  # accuracy points below the worst input that --data calls "clearly worse"


@dataclass
class Options:
    inputs: list[str]
    out: str
    weights: list[float] | None = None
    uniform: bool = False
    force: bool = False
    aggregator: str = "mean"
    mask_policy: str | None = None
    infer_masks: bool = False
    target_sparsity: float | None = None
    allow_nonfinite: bool = False
    overwrite: bool = False
    data: str | None = None
    data_dir: str | None = None
    quiet: bool = False
    slab_bytes: int = SLAB_BYTES
    align: bool = False
    recalibrate_bn: bool = False
    labels: list[str] | None = None   # how the manifest names the inputs (aligned copies are temporary)
    input_rounds: list[int | None] | None = None  # the rounds of what `labels` names
    input_data: list[str | None] | None = None     # the data sets of what `labels` names
    warnings: list[str] = field(default_factory=list)
    method: str = "fedavg"
    stage: "Callable[[Path], dict] | None" = None  # writes beside the weights, returns manifest entries


def validate(o: Options) -> None:
    if len(o.inputs) < 2:
        raise UsageError("fedavg needs at least two inputs")
    if o.target_sparsity is not None and not 0.0 <= o.target_sparsity < 1.0:
        raise UsageError(f"--target-sparsity {o.target_sparsity}: must be in [0, 1)")
    if o.weights is not None and o.uniform:
        raise UsageError("--weights and --uniform contradict each other; pass one")
    if o.aggregator != "mean" and (o.weights is not None or o.uniform):
        raise UsageError(f"--{'weights' if o.weights is not None else 'uniform'} weights the mean, and "
                         f"--aggregator {o.aggregator} ignores weights (a bad input could fake its sample "
                         "count); drop one of them")
    if o.data_dir and not o.data:
        raise UsageError("--data-dir names where --data's files are, and no --data is given; add --data NAME "
                         "or drop --data-dir")
    check_output(o.out, o.inputs, o.overwrite)


def fedavg(o: Options) -> dict:
    validate(o)
    if o.recalibrate_bn and not o.data:
        raise UsageError("--recalibrate-bn needs --data NAME: the statistics are recomputed on its training split")
    from dataclasses import replace
    # With --recalibrate-bn, --data names the statistics' data; the
    # merged-vs-inputs check would judge the model before its repair.
    run = replace(o, data=None) if o.recalibrate_bn else o
    summary = _aligned(run) if o.align else _fedavg(run)
    if o.recalibrate_bn:
        summary["recalibrated_layers"] = _recalibrate(o)
    return summary


def _aligned(o: Options) -> dict:
    """--align: every input after the first is permuted to match the first
    (merge.align), then the copies are averaged as usual. Needs whole models
    in memory, unlike the streaming merge."""
    import shutil
    import tempfile
    from dataclasses import replace

    from trainer.checkpoint import export_keras

    from .align import align, set_weights
    from .models import load_model
    with Inputs(o.inputs) as inputs:
        keys = inputs.check_tensors()
        if any(s.has_mask(k) for s in inputs.sources for k in keys):
            raise UsageError("--align with pruned inputs is not supported: a permutation would have to move "
                             "the masks too; merge them without --align")
        weights = _weights(inputs, o)
        rounds = [round_of(s.manifest) for s in inputs.sources]
        samples = [s.samples for s in inputs.sources]
        data = [data_name(s.manifest.get("data")) for s in inputs.sources]
    base = load_model(o.inputs[0])
    out = Path(o.out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.align.", suffix=".tmp", dir=out.parent))
    try:
        paths = [o.inputs[0]]
        for i, path in enumerate(o.inputs[1:], 1):
            model = load_model(path)
            aligned, _ = align(base, model)
            set_weights(model, aligned)
            # The copy keeps its original's sample count: the output records
            # the sum over all inputs, which weights the next round.
            export_keras(model, tmp / f"aligned-{i}.keras", record={"samples_seen": samples[i]})
            paths.append(str(tmp / f"aligned-{i}.keras"))
        # Aligned copies of different initializations: lineage no longer applies.
        inner = replace(o, inputs=paths, weights=weights, uniform=False, align=False, recalibrate_bn=False,
                        force=True, labels=list(o.inputs), input_rounds=rounds, input_data=data,
                        warnings=[])
        summary = _fedavg(inner)
        # Of the copies' warnings only the rounds (the originals') still apply.
        o.warnings.extend(w for w in inner.warnings if "different rounds" in w)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**summary, "aligned_to": o.inputs[0]}


def _recalibrate(o: Options) -> int:
    """Batch-norm statistics of the merged model recomputed on --data, written back atomically."""
    import os

    from trainer.checkpoint import export_keras

    from .models import load_model
    from .recalibrate import recalibrate
    model = load_model(o.out)
    n = recalibrate(model, o.data, o.data_dir)
    if not n:
        o.warnings.append("--recalibrate-bn: the model has no BatchNormalization layer; nothing to recompute")
        return 0
    out = Path(o.out)
    if out.suffix == ".keras":
        export_keras(model, out)
    else:
        tmp = out / ".model.weights.tmp.weights.h5"
        model.save_weights(str(tmp))
        os.replace(tmp, out / "model.weights.h5")
    return n


def _fedavg(o: Options) -> dict:
    with Inputs(o.inputs) as inputs:
        keys = inputs.check_tensors()
        for path, reason in inputs.mismatch.items():
            o.warnings.append(f"{path}: its graph differs from {inputs.reference.path}'s ({reason}); "
                              "its tensors were matched by name")
        lineage = _check_lineage(inputs, o)
        round_ = _round(inputs, o)
        weights = _weights(inputs, o)
        masked = any(s.has_mask(k) for s in inputs.sources for k in keys) or o.infer_masks
        policy = o.mask_policy or "intersection"
        if o.mask_policy and not masked:
            raise UsageError(f"--mask-policy {o.mask_policy} combines pruned inputs' masks, and no input records "
                             "masks; drop it, or add --infer-masks to read exact zeros of kernels as masks")
        if o.target_sparsity is not None and not masked:
            raise UsageError("--target-sparsity re-prunes pruned inputs, and no input records masks; "
                             "add --infer-masks to read exact zeros of a pruned .keras as its mask")
        if inputs.config is None:
            raise UsageError("no input records the model's architecture; add a .keras file or run directory")
        rule = parse_aggregator(o.aggregator, len(inputs.sources), policy)
        chosen = None
        if isinstance(rule, tuple):  # krum: a first pass over every tensor picks one input
            chosen = krum_index(_squared_distances(inputs, keys, o), rule[1])
            rule = Select(chosen)
        writer = WeightsWriter(o.out, inputs.config)
        try:
            sparsity = _stream(inputs, keys, weights, rule, writer, o)
            manifest = {
                "kind": "merge", "method": o.method, "aggregator": o.aggregator,
                "krum_choice": None if chosen is None else inputs.sources[chosen].path,
                "mask_policy": policy if masked else None,
                "model": inputs.sources[0].model_cfg, "lineage": lineage, "round": round_,
                "samples_seen": sum(s.samples or 0 for s in inputs.sources),
                "data": _data(inputs, o),
                "inputs": [{"path": label, "format": s.format, "weight": w, "samples_seen": s.samples,
                            "lineage": s.lineage}
                           for s, w, label in zip(inputs.sources, weights, o.labels or [s.path for s in inputs.sources])],
                "sparsity": sparsity, "versions": package_versions(), "step": 0,
                "paired_by_place": inputs.renamed or None,
            }
            if o.stage:
                manifest.update(o.stage(writer.tmp))
            check = _check_merged(writer, inputs, manifest, o) if o.data else None
            writer.commit(manifest, o.overwrite)
        except BaseException:
            writer.abort()
            raise
    return {**manifest, "out": o.out, "check": check, "pairing": inputs.pairing_note()}


def _check_lineage(inputs: Inputs, o: Options) -> str | None:
    """The inputs' common lineage, or None. Refused without --force: inputs of
    different lineages, and inputs of known lineage beside ones that record
    none. A file without lineage (saved by plain Keras, or by an earlier
    version) may come from any initialization; only when no input records
    one is there nothing to go by, and then a warning says so."""
    known = {s.path: s.lineage for s in inputs.sources if s.lineage}
    unknown = [s.path for s in inputs.sources if not s.lineage]
    refused = []  # (error, what --force averages anyway)
    if len(set(known.values())) > 1:
        a, la = next((p, l) for p, l in known.items())
        b, lb = next((p, l) for p, l in known.items() if l != la)
        refused.append((f"{a} and {b} start from different initializations ({la[:19]}... vs {lb[:19]}...): "
                        "independently trained networks put the same features in different units, so averaging "
                        "their weights mixes unrelated units and gives a broken model; combine their predictions "
                        f"with `python -m merge ensemble {a} {b} -o ensemble.keras`, or pass --force to average "
                        "anyway", "inputs with different initializations"))
    if known and unknown:
        lineage = next(iter(known.values()))
        refused.append((f"{', '.join(unknown)}: no recorded initialization, while {', '.join(known)} "
                        f"record{'s' if len(known) == 1 else ''} one ({lineage[:19]}...): a file without lineage "
                        "may come from any initialization, and averaging unrelated networks gives a broken model; "
                        "give the run or merge directory (or the model.keras this version's trainer or merge "
                        "wrote), or pass --force to average anyway",
                        f"{', '.join(unknown)} (no recorded initialization) with inputs that record one"))
    if refused:
        if not o.force:
            raise UsageError(refused[0][0])
        o.warnings.append("--force: averaging " + " and ".join(what for _, what in refused))
    elif unknown:
        o.warnings.append(f"{', '.join(unknown)}: no recorded initialization (a plain Keras file); averaging is "
                          "only meaningful if every input started from the same weights"
                          + ("" if o.data else "; pass --data NAME to check the merged model against the inputs"))
    if known and not unknown and len(set(known.values())) == 1:
        return next(iter(known.values()))
    return None


def _data(inputs: Inputs, o: Options) -> dict | None:
    """The data set the inputs agree on, recorded so that `merge evaluate`
    of the output needs no --data."""
    name = common_data(o.input_data or [data_name(s.manifest.get("data")) for s in inputs.sources])
    return None if name is None else {"name": name}


def _round(inputs: Inputs, o: Options) -> int | None:
    """One more than the newest input's round; None if no input records one.
    Inputs of different rounds are averaged with a warning: a client that
    trained from an older global model pulls the average back towards it,
    which is sometimes intended (a late client) and often a mix-up."""
    labels = o.labels or [s.path for s in inputs.sources]
    rounds = o.input_rounds or [round_of(s.manifest) for s in inputs.sources]
    by_round: dict[int, list[str]] = {}
    for label, r in zip(labels, rounds):
        if r is not None:
            by_round.setdefault(r, []).append(str(label))
    if not by_round:
        return None
    if len(by_round) > 1:
        listing = "; ".join(f"round {r}: {', '.join(paths)}" for r, paths in sorted(by_round.items()))
        o.warnings.append(f"the inputs come from different rounds ({listing}); the output is round "
                          f"{max(by_round) + 1}")
    return max(by_round) + 1


def _weights(inputs: Inputs, o: Options) -> list[float]:
    n = len(inputs.sources)
    if o.weights is not None:
        raw = list(o.weights)
        if len(raw) != n:
            raise UsageError(f"--weights has {len(raw)} values for {n} inputs")
    elif o.uniform:
        raw = [1.0] * n
    else:
        samples = [s.samples for s in inputs.sources]
        if all(samples):
            raw = [float(x) for x in samples]
        elif not any(samples):
            o.warnings.append("no input records how many samples it saw; weighting them equally")
            raw = [1.0] * n
        else:
            missing = next(s.path for s in inputs.sources if not s.samples)
            raise UsageError(f"{missing}: records no sample count while other inputs do; "
                             "pass --weights or --uniform")
    if any(w < 0 or not np.isfinite(w) for w in raw) or sum(raw) <= 0:
        raise UsageError(f"--weights {','.join(map(str, raw))}: weights must be non-negative and not all zero")
    total = sum(raw)
    return [w / total for w in raw]


def _stream(inputs: Inputs, keys, weights, rule, writer: WeightsWriter, o: Options) -> dict:
    from trainer.progress import progress
    sources = inputs.sources
    sliceable = all(s.sliceable for s in sources) and o.target_sparsity is None
    out_bytes = sum(_nbytes(*sources[0].info(k)) for k in keys)
    writer.reserve(out_bytes)
    total = out_bytes * len(sources)
    pruned = kept = 0
    per_tensor = {}
    buffers = _Buffers(o.slab_bytes if sliceable and rule.streaming else 0)
    with progress(total, "fedavg", "B", unit_scale=True, enabled=not o.quiet, leave=False) as bar:
        for key in keys:
            shape, dtype = sources[0].info(key)
            ds = writer.create(inputs.output_key(key), shape, dtype)
            floating = np.issubdtype(dtype, np.floating)
            tensor_pruned = tensor_masked = 0
            for rows in _slabs(shape, dtype, o.slab_bytes if sliceable else None):
                slab = shape if rows is None else (rows.stop - rows.start, *shape[1:])

                def reads():
                    for i, (s, w) in enumerate(zip(sources, weights)):
                        # The first input's buffer becomes the rule's accumulator,
                        # the second is refilled by every later input.
                        x = np.asarray(s.read(key, rows, out=buffers.get(i > 0, slab, dtype)))
                        if floating and not o.allow_nonfinite and not buffers.finite(x):
                            raise UsageError(f"{s.path}: tensor {key} holds NaN or Inf; "
                                             "fix the input or pass --allow-nonfinite")
                        bar.update(x.nbytes)
                        yield x, w, _mask_of(s, key, rows, x, o, floating)
                values, keep = rule.combine(reads()) if floating else first_of(reads())
                if o.target_sparsity is not None and keep is not None:
                    values, keep = reprune(values, keep, o.target_sparsity)
                ds[() if rows is None else rows] = values
                if keep is not None:
                    writer.write_mask(inputs.output_key(key), keep, rows)
                    tensor_masked += keep.size
                    tensor_pruned += int(keep.size - np.count_nonzero(keep))
            if tensor_masked:
                per_tensor[key] = tensor_pruned / tensor_masked
                pruned += tensor_pruned
                kept += tensor_masked
    return {"overall": pruned / kept if kept else 0.0, "tensors": per_tensor}


class _Buffers:
    """Two reusable slab buffers, and a scratch for the finiteness check.

    Reading into fresh arrays cost as much as the merge itself: every new
    page of a fresh array faults on first touch (1.7 GB/s against 6 GB/s
    from the page cache into warm memory)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.pool: dict = {}

    def get(self, second: bool, shape, dtype):
        n = int(np.prod(shape, dtype=np.int64))
        dtype = np.dtype(dtype)
        if not self.nbytes or n * dtype.itemsize > self.nbytes or not np.issubdtype(dtype, np.floating):
            return None
        key = (second, dtype)
        if key not in self.pool:
            self.pool[key] = np.empty(self.nbytes // dtype.itemsize, dtype)
        return self.pool[key][:n].reshape(shape)

    def finite(self, x: np.ndarray) -> bool:
        if "finite" not in self.pool or self.pool["finite"].size < x.size:
            self.pool["finite"] = np.empty(max(x.size, self.nbytes // 4), bool)
        scratch = self.pool["finite"][:x.size].reshape(x.shape)
        return bool(np.isfinite(x, out=scratch).all())


def _squared_distances(inputs: Inputs, keys, o: Options) -> np.ndarray:
    """Pairwise squared distances between whole inputs, slab by slab (n slabs
    in memory at a time)."""
    sources = inputs.sources
    n = len(sources)
    d = np.zeros((n, n))
    sliceable = all(s.sliceable for s in sources)
    for key in keys:
        shape, dtype = sources[0].info(key)
        if not np.issubdtype(dtype, np.floating):
            continue
        for rows in _slabs(shape, dtype, o.slab_bytes if sliceable else None):
            xs = [np.asarray(s.read(key, rows), dtype=np.float64) for s in sources]
            for i in range(n):
                for j in range(i + 1, n):
                    d[i, j] += float(np.square(xs[i] - xs[j]).sum())
    return d + d.T


def _mask_of(s, key, rows, x, o: Options, floating: bool):
    if s.has_mask(key):
        return s.read_mask(key, rows)
    if o.infer_masks and floating and x.ndim >= 2:
        return x != 0
    return None


def _slabs(shape, dtype, slab_bytes):
    n = _nbytes(shape, dtype)
    if slab_bytes is None or not shape or n <= slab_bytes:
        yield None
        return
    per_row = max(1, n // shape[0])
    step = max(1, slab_bytes // per_row)
    for start in range(0, shape[0], step):
        yield slice(start, min(shape[0], start + step))


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _check_merged(writer: WeightsWriter, inputs: Inputs, manifest: dict, o: Options) -> dict:
    """--data: measure the merged model beside its inputs before committing it."""
    from .evaluate import evaluate
    merged_dir = writer.stage(manifest)
    rows = evaluate([s.path for s in inputs.sources] + [str(merged_dir)], o.data, o.data_dir)
    merged, members = rows[-1], rows[:-1]
    worst = min(r["accuracy"] for r in members)
    result = {"merged_accuracy": merged["accuracy"], "worst_input_accuracy": worst,
              "inputs": {r["path"]: r["accuracy"] for r in members}}
    if merged["accuracy"] < worst - WORSE_BY and not o.force:
        raise UsageError(f"the merged model scores {merged['accuracy']:.3f} on {o.data}, clearly below the worst "
                         f"input's {worst:.3f}: the inputs most likely did not share an initialization; use "
                         "`python -m merge ensemble` to combine their predictions (nothing was written)")
    return result
