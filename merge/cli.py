"""`python -m merge {fedavg,server-step,ensemble,inspect,diff,evaluate}`."""
from __future__ import annotations

import json
import sys

from trainer.errors import OneLineParser, UsageError, run_cli

from .aggregate import AGGREGATORS, MASK_POLICIES


def parser() -> OneLineParser:
    p = OneLineParser(prog="python -m merge", description="Merge trained models: FedAvg for models that share an "
                      "initialization, ensembles for models that do not.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    f = sub.add_parser("fedavg", help="weighted average of models that started from the same weights",
                       description="Average models trained from one initialization (FedAvg), streaming one "
                       "tensor at a time. Inputs: trainer run/checkpoint/merge directories, .keras, .weights.h5, "
                       "legacy .h5, TensorFlow checkpoint prefixes. Optimizer state is dropped.")
    f.add_argument("inputs", nargs="+", metavar="INPUT")
    f.add_argument("-o", "--out", required=True, help="OUT.keras, or a directory a trainer can --init from")
    f.add_argument("--weights", type=_floats, help="per-input weights, e.g. 3,1 (default: samples seen)")
    f.add_argument("--uniform", action="store_true", help="weight every input equally")
    f.add_argument("--force", action="store_true", help="average even inputs with different initializations, "
                   "or inputs that record one beside inputs that record none")
    f.add_argument("--aggregator", default="mean", help=f"{AGGREGATORS} (default mean: FedAvg, weighted; "
                   "the others are unweighted and resist a few bad inputs)")
    f.add_argument("--mask-policy", choices=MASK_POLICIES,
                   help="pruned inputs: intersection (default; pruned anywhere stays pruned), union, renormalize")
    f.add_argument("--infer-masks", action="store_true",
                   help="read exact zeros of kernels as pruned, for inputs that record no masks")
    f.add_argument("--target-sparsity", type=float, help="re-prune the merged masked tensors to this sparsity")
    f.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights")
    f.add_argument("--align", action="store_true", help="permute every input's hidden units to match the first "
                   "before averaging (inputs with different initializations; see merge align)")
    f.add_argument("--recalibrate-bn", action="store_true",
                   help="recompute batch-norm statistics of the merged model on --data's training split")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output")
    f.add_argument("--data", help="check the merged model against the inputs on this data set (digits, ...)")
    f.add_argument("--data-dir")
    f.add_argument("--quiet", action="store_true", help="no progress bar")

    so = sub.add_parser("server-step", help="a server optimizer step: previous global + this round's FedAvg",
                        description="FedAvgM, FedAdam or FedYogi: moves PREVIOUS along AVERAGE - PREVIOUS "
                        "with server-side state kept in --state across rounds.")
    so.add_argument("previous")
    so.add_argument("average")
    so.add_argument("-o", "--out", required=True)
    so.add_argument("--optimizer", default="fedavgm", help="fedavgm | fedadam | fedyogi")
    so.add_argument("--state", required=True, help="HDF5 file of the optimizer's state (created if missing)")
    so.add_argument("--server-lr", type=float, default=1.0)
    so.add_argument("--beta1", type=float, default=0.9, help="momentum (fedavgm) or first moment decay")
    so.add_argument("--beta2", type=float, default=0.99)
    so.add_argument("--tau", type=float, default=1e-3, help="adaptivity (fedadam, fedyogi)")
    so.add_argument("--overwrite", action="store_true")

    sc = sub.add_parser("scaffold", help="SCAFFOLD's server step: FedAvg of the clients and the new server control",
                        description="The next global of a SCAFFOLD round: the clients' FedAvg, and the server "
                        "control c + (1/N) sum (c_i+ - c_i) from the clients' scaffold.h5 files, written "
                        "together into a directory the next round's clients --init from.")
    sc.add_argument("clients", nargs="+", metavar="CLIENT_RUN", help="run directories of `trainer --scaffold`")
    sc.add_argument("--global", dest="previous", required=True, metavar="DIR",
                    help="the global these clients started from (a `trainer init` or the last `merge scaffold`)")
    sc.add_argument("-o", "--out", required=True, help="the new global directory")
    sc.add_argument("--clients", dest="total", type=int, metavar="N",
                    help="clients in the federation, sampled or not (default: the runs given, "
                         "i.e. every client took part)")
    sc.add_argument("--overwrite", action="store_true", help="replace an existing output")
    sc.add_argument("--quiet", action="store_true", help="no progress bar")

    al = sub.add_parser("align", help="permute B's hidden units to match A's (weight matching)",
                        description="Weight matching: B's hidden units permuted to best match A's; the output "
                        "computes the same function as B. For chains of Dense/Conv2D layers.")
    al.add_argument("a")
    al.add_argument("b")
    al.add_argument("-o", "--out", required=True, help="OUT.keras")
    al.add_argument("--overwrite", action="store_true")

    ba = sub.add_parser("barrier", help="loss and accuracy on the line from A to B, before and after alignment")
    ba.add_argument("a")
    ba.add_argument("b")
    ba.add_argument("--data", required=True)
    ba.add_argument("--data-dir")
    ba.add_argument("--points", type=int, default=11)
    ba.add_argument("--no-align", action="store_true", help="only the straight line to B as it is")
    ba.add_argument("--plot", help="also write the curves as a PNG here")

    au = sub.add_parser("auto", help="average, align-then-average, or ensemble, by the measured barrier")
    au.add_argument("a")
    au.add_argument("b")
    au.add_argument("--data", required=True)
    au.add_argument("--data-dir")
    au.add_argument("-o", "--out", required=True, help="OUT.keras")
    au.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("ensemble", help="one model that combines the members' predictions",
                       description="Combine independently trained models by their outputs. Members may "
                       "differ in architecture but not in input shape or class count.")
    e.add_argument("inputs", nargs="+", metavar="MEMBER")
    e.add_argument("-o", "--out", required=True, help="OUT.keras")
    e.add_argument("--method", default="mean", choices=("mean", "logit-mean", "vote", "max"),
                   help="mean of probabilities (default), mean of log-probabilities, weighted vote, max")
    e.add_argument("--weights", type=_floats)
    e.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("inspect", help="format, tensors, lineage, sparsity and samples of one input")
    i.add_argument("input")
    i.add_argument("--json", action="store_true")

    d = sub.add_parser("diff", help="what would block averaging two inputs (exit 1 if anything)")
    d.add_argument("a")
    d.add_argument("b")

    v = sub.add_parser("evaluate", help="accuracy and loss of checkpoints, merges and ensembles")
    v.add_argument("inputs", nargs="+", metavar="INPUT")
    v.add_argument("--data", required=True, help="digits | cifar10 | synthetic | PATH.npz")
    v.add_argument("--data-dir")
    v.add_argument("--plot", help="also write a bar chart PNG here")
    return p


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text}: expected numbers separated by commas, e.g. 3,1") from None


def cmd_fedavg(a) -> int:
    from .fedavg import Options, fedavg
    o = Options(inputs=a.inputs, out=a.out, weights=a.weights, uniform=a.uniform, force=a.force,
                mask_policy=a.mask_policy, infer_masks=a.infer_masks, target_sparsity=a.target_sparsity,
                allow_nonfinite=a.allow_nonfinite, overwrite=a.overwrite, data=a.data, data_dir=a.data_dir,
                quiet=a.quiet, aggregator=a.aggregator, align=a.align, recalibrate_bn=a.recalibrate_bn)
    try:
        s = fedavg(o)
    finally:
        for w in o.warnings:
            print(f"warning: {w}", file=sys.stderr)
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
    s = server_step(a.previous, a.average, a.out, a.optimizer, a.state, a.server_lr, a.beta1, a.beta2, a.tau,
                    a.overwrite)
    if s.get("pairing"):
        print(s["pairing"])
    print(f"{a.optimizer} step: {a.previous} + ({a.average} - {a.previous}) -> {a.out}; state in {a.state}")
    return 0


def cmd_scaffold(a) -> int:
    from .scaffold import scaffold
    s, warnings = scaffold(a.previous, a.clients, a.out, a.total, a.overwrite, a.quiet)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    sc = s["scaffold"]
    print(f"scaffold of {sc['sampled']} of {sc['clients']} clients -> {s['out']} (round "
          f"{s['round'] if s.get('round') is not None else '?'}; server control in {s['out']}/{sc['file']})")
    return 0


def cmd_align(a) -> int:
    from trainer.checkpoint import export_keras

    from .align import align, set_weights
    from .models import load_model
    from .output import check_output
    if not a.out.endswith(".keras"):
        raise UsageError(f"-o {a.out}: align writes a .keras file; end the name with .keras")
    check_output(a.out, [a.a, a.b], a.overwrite)
    model_a, model_b = load_model(a.a), load_model(a.b)
    weights, perms = align(model_a, model_b)
    set_weights(model_b, weights)
    export_keras(model_b, a.out)
    moved = ", ".join(f"{g} {int((p != range(len(p))).sum())}/{len(p)}" for g, p in perms.items())
    print(f"aligned {a.b} to {a.a} -> {a.out} (units moved per layer: {moved})")
    return 0


def cmd_barrier(a) -> int:
    from .barrier import barrier, format_table, plot
    res = barrier(a.a, a.b, a.data, a.data_dir, a.points, aligned=not a.no_align)
    print(format_table(res))
    if a.plot:
        plot(res, a.plot)
        print(f"wrote {a.plot}")
    return 0


def cmd_auto(a) -> int:
    from .auto import auto
    s = auto(a.a, a.b, a.data, a.out, a.data_dir, a.overwrite)
    print(f"{s['choice']} -> {a.out}: {s['why']}")
    return 0


def cmd_ensemble(a) -> int:
    from .ensemble import write_ensemble
    s = write_ensemble(a.inputs, a.out, a.method, a.weights, a.overwrite)
    print(f"ensemble ({a.method}) of {len(a.inputs)} members -> {a.out}: input {tuple(s['input_shape'])}, "
          f"{s['num_classes']} classes, {s['params']:,} parameters")
    for path, kind, w in zip(s["members"], s["kinds"], s["weights"]):
        print(f"  {path}  weight {w:.4f}  {kind}")
    return 0


def cmd_inspect(a) -> int:
    from .describe import format_inspect, inspect
    info = inspect(a.input)
    print(json.dumps(info, indent=2) if a.json else format_inspect(info))
    return 0


def cmd_diff(a) -> int:
    from .describe import diff
    problems, note = diff(a.a, a.b)
    if note:
        print(note)
    for line in problems:
        print(line)
    if not problems:
        print(f"{a.a} and {a.b} can be averaged: same tensors, shapes and dtypes, no conflicting lineage")
    return 1 if problems else 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate, format_table, plot
    rows = evaluate(a.inputs, a.data, a.data_dir)
    print(format_table(rows))
    if a.plot:
        plot(rows, a.plot)
        print(f"wrote {a.plot}")
    return 0


COMMANDS = {"fedavg": cmd_fedavg, "server-step": cmd_server_step, "scaffold": cmd_scaffold, "align": cmd_align, "barrier": cmd_barrier, "auto": cmd_auto, "ensemble": cmd_ensemble, "inspect": cmd_inspect, "diff": cmd_diff,
            "evaluate": cmd_evaluate}


def main(argv=None) -> int:
    def body():
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
        return COMMANDS[args.command](args)
    return run_cli(body)
