"""What each `python -m merge` command does with its parsed flags, and how it
reports: a text report, or with --json one JSON document on stdout and
nothing else there (warnings and progress go to stderr, as always)."""
from __future__ import annotations

import json
import sys

from trainer.errors import UsageError


def _warn(warnings) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def _emit(doc: dict) -> None:
    # default=str: paths and numpy scalars, which a summary may carry, print as text.
    print(json.dumps(doc, indent=2, default=str))


def cmd_fedavg(a) -> int:
    from .fedavg import Options, fedavg
    o = Options(inputs=a.inputs, out=a.out, weights=a.weights, uniform=a.uniform, force=a.force,
                mask_policy=a.mask_policy, infer_masks=a.infer_masks, target_sparsity=a.target_sparsity,
                allow_nonfinite=a.allow_nonfinite, overwrite=a.overwrite, data=a.data, data_dir=a.data_dir,
                quiet=a.quiet, aggregator=a.aggregator, align=a.align, recalibrate_bn=a.recalibrate_bn)
    try:
        s = fedavg(o)
    finally:
        _warn(o.warnings)
    if a.json:
        _emit({**s, "warnings": o.warnings})
        return 0
    print(f"fedavg of {len(s['inputs'])} inputs -> {s['out']}")
    if s.get("pairing"):
        print(s["pairing"])
    for inp in s["inputs"]:
        print(f"  {inp['path']}  weight {inp['weight']:.4f}  samples {inp['samples_seen'] or '-'}  "
              f"{inp['format']}")
    print(f"lineage: {s['lineage'] or 'unknown'}; samples seen in all: {s['samples_seen']}"
          + (f"; round {s['round']}" if s.get("round") is not None else ""))
    if s["aggregator"] != "mean":
        print(f"aggregator: {s['aggregator']}" + (f" (chose {s['krum_choice']})" if s["krum_choice"] else ""))
    if s["mask_policy"]:
        print(f"masks ({s['mask_policy']}): sparsity {s['sparsity']['overall']:.2%} over the masked tensors")
        for name, sp in s["sparsity"]["tensors"].items():
            print(f"  {name:<32} {sp:7.2%}")
    if s.get("aligned_to"):
        print(f"aligned every input to {s['aligned_to']} before averaging")
    if s.get("recalibrated_layers"):
        print(f"batch-norm statistics recomputed on {a.data} in {s['recalibrated_layers']} layer(s)")
    if s["check"]:
        c = s["check"]
        print(f"--data {a.data}: merged accuracy {c['merged_accuracy']:.4f}, worst input {c['worst_input_accuracy']:.4f}")
    return 0


def cmd_server_step(a) -> int:
    from .server import server_step
    if a.optimizer == "fedavgm":
        given = [flag for flag, v in (("--beta2", a.beta2), ("--tau", a.tau)) if v is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to fedadam and "
                             "fedyogi; fedavgm uses only --server-lr and --beta1 (its momentum): drop "
                             f"{'them' if len(given) > 1 else 'it'} or choose --optimizer fedadam")
    beta2 = 0.99 if a.beta2 is None else a.beta2
    tau = 1e-3 if a.tau is None else a.tau
    s = server_step(a.previous, a.average, a.out, a.optimizer, a.state, a.server_lr, a.beta1, beta2, tau,
                    a.overwrite)
    _warn(s["warnings"])
    if a.json:
        _emit({**s, "out": a.out, "state": a.state})
        return 0
    if s.get("pairing"):
        print(s["pairing"])
    print(f"{a.optimizer} step: {a.previous} + ({a.average} - {a.previous}) -> {a.out}; state in {a.state}")
    return 0


def cmd_scaffold(a) -> int:
    from .scaffold import scaffold
    s, warnings = scaffold(a.previous, a.clients, a.out, a.total, a.overwrite, a.quiet)
    _warn(warnings)
    if a.json:
        _emit({**s, "warnings": warnings})
        return 0
    sc = s["scaffold"]
    print(f"scaffold of {sc['sampled']} of {sc['clients']} clients -> {s['out']} (round "
          f"{s['round'] if s.get('round') is not None else '?'}; server control in {s['out']}/{sc['file']})")
    return 0


def cmd_align(a) -> int:
    from trainer.checkpoint import export_keras

    from .align import align, set_weights
    from .models import load_model
    from .output import check_output
    from .records import recorded_data
    if not a.out.endswith(".keras"):
        raise UsageError(f"-o {a.out}: align writes a .keras file; end the name with .keras")
    check_output(a.out, [a.a, a.b], a.overwrite)
    model_a, model_b = load_model(a.a), load_model(a.b)
    weights, perms = align(model_a, model_b)
    set_weights(model_b, weights)
    data = recorded_data(a.b)
    # the output computes B's function: it was trained on B's data
    export_keras(model_b, a.out, record={"data": {"name": data}} if data else None)
    moved = {g: int((p != range(len(p))).sum()) for g, p in perms.items()}
    if a.json:
        _emit({"a": a.a, "b": a.b, "out": a.out, "data": data,
               "layers": {g: {"moved": moved[g], "units": len(p)} for g, p in perms.items()}})
        return 0
    listing = ", ".join(f"{g} {moved[g]}/{len(p)}" for g, p in perms.items())
    print(f"aligned {a.b} to {a.a} -> {a.out} (units moved per layer: {listing})")
    return 0


def cmd_barrier(a) -> int:
    from .barrier import barrier, format_table, plot
    from .records import default_data
    data, recorded = default_data([a.a, a.b], a.data)
    res = barrier(a.a, a.b, data, a.data_dir, a.points, aligned=not a.no_align, recorded=recorded)
    if a.plot:
        plot(res, a.plot)
    return _scores(a, {**res, "data_recorded": recorded, "plot": a.plot}, format_table(res), data, recorded)


def cmd_auto(a) -> int:
    from .auto import auto
    from .records import default_data
    data, recorded = default_data([a.a, a.b], a.data)
    s = auto(a.a, a.b, data, a.out, a.data_dir, a.overwrite, recorded=recorded)
    if a.json:
        _emit({**s, "data_recorded": recorded})
        return 0
    print(f"{s['choice']} -> {a.out}: {s['why']}")
    return 0


def cmd_ensemble(a) -> int:
    from .ensemble import write_ensemble
    s = write_ensemble(a.inputs, a.out, a.method, a.weights, a.overwrite)
    if a.json:
        _emit(s)
        return 0
    print(f"ensemble ({a.method}) of {len(a.inputs)} members -> {a.out}: input {tuple(s['input_shape'])}, "
          f"{s['num_classes']} classes, {s['params']:,} parameters")
    for path, kind, w in zip(s["members"], s["kinds"], s["weights"]):
        print(f"  {path}  weight {w:.4f}  {kind}")
    return 0


def cmd_inspect(a) -> int:
    from .describe import format_inspect, inspect
    info = inspect(a.input)
    if a.json:
        _emit(info)
    else:
        print(format_inspect(info))
    return 0


def cmd_diff(a) -> int:
    """Exit 1 when anything blocks averaging, with or without --json."""
    from .describe import diff
    problems, note = diff(a.a, a.b)
    if a.json:
        _emit({"a": a.a, "b": a.b, "can_average": not problems, "problems": problems, "note": note})
        return 1 if problems else 0
    if note:
        print(note)
    for line in problems:
        print(line)
    if not problems:
        print(f"{a.a} and {a.b} can be averaged: same tensors, shapes and dtypes, no conflicting lineage")
    return 1 if problems else 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate, format_table, plot
    from .models import source_kind
    from .records import default_data
    for path in a.inputs:  # a typo fails before anything is read
        source_kind(path)
    data, recorded = default_data(a.inputs, a.data)
    rows = evaluate(a.inputs, data, a.data_dir, recorded=recorded)
    if a.plot:
        plot(rows, a.plot, data)
    return _scores(a, {"data": data, "data_recorded": recorded, "models": rows, "plot": a.plot},
                   format_table(rows), data, recorded)


def _scores(a, document: dict, table: str, data: str, recorded: bool) -> int:
    """What barrier and evaluate print: the document under --json, else the
    table and where its data set came from."""
    if a.json:
        _emit(document)
        return 0
    print(table)
    if recorded:
        print(f"scored on the test split of {data}, the data set the inputs record")
    if a.plot:
        print(f"wrote {a.plot}")
    return 0


COMMANDS = {"fedavg": cmd_fedavg, "server-step": cmd_server_step, "scaffold": cmd_scaffold, "align": cmd_align,
            "barrier": cmd_barrier, "auto": cmd_auto, "ensemble": cmd_ensemble, "inspect": cmd_inspect,
            "diff": cmd_diff, "evaluate": cmd_evaluate}
