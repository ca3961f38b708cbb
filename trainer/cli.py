"""`python -m trainer [flags]` trains; `python -m trainer init` writes a shared start."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import OneLineParser, ReplicaMismatch, UsageError


def _launch_rank() -> int:
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    try:  # a multiworker worker outside Slurm
        import json
        return int(json.loads(os.environ.get("TF_CONFIG", "{}"))["task"]["index"])
    except (ValueError, KeyError, TypeError):
        return 0


def train_parser() -> argparse.ArgumentParser:
    from .backends import CHOICES
    p = OneLineParser(prog="python -m trainer", description=(
        "Data-parallel training on Horovod or tf.distribute. Two subcommands: "
        "`python -m trainer init -o DIR` writes a shared initialization that several runs start from "
        "with --init; `python -m trainer slice RUN -o SMALL.keras` removes the lowest-norm units of a "
        "trained model. Each has its own --help."))
    a = p.add_argument
    a("--model", help="registry name (digits_cnn, cifar10_cnn, mlp, lstm, cnn_lstm) or package.module:function "
                      "(default digits_cnn, or the model of --init/--resume)")
    a("--data", default="digits", help="digits | cifar10 | synthetic | PATH.npz (default %(default)s)")
    a("--data-dir", help="cifar10: the directory holding cifar-10-batches-py or cifar-10-batches-bin; "
                         ".npz: a directory to find a relative PATH.npz in (default none)")
    a("--epochs", type=int, default=8, help="passes over the training data, or this client's share "
                                            "(default %(default)s)")
    a("--batch-size", type=int, default=32, help="per replica (default %(default)s)")
    a("--lr", type=float, default=1e-3, help="base learning rate, scaled by the replica count "
                                             "(default %(default)s)")
    a("--optimizer", default="adam", help="adam | sgd | momentum (default %(default)s)")
    a("--warmup-epochs", type=float, default=1.0, help="epochs to ramp the scaled learning rate up over, "
                                                       ">= 0 (default %(default)g)")
    a("--no-lr-scaling", dest="scale_lr", action="store_false",
      help="keep --lr whatever the replica count (default: scaled)")
    a("--seed", type=int, default=0, help="seed of the initial weights, the data order and synthetic data "
                                          "(default %(default)s)")
    a("-o", "--out", help="run directory (default runs/MODEL-DATA-TIME)")
    a("--backend", default="auto", help=f"{' | '.join(CHOICES)} (default auto: horovod under "
                                        "horovodrun/mpirun/srun, else single)")
    a("--devices", type=int, help="--backend mirrored only: number of devices, on a CPU logical devices "
                                  "(default every visible device)")
    a("--threads", type=int, help="intra-op threads per process, >= 1 (default auto: the cores divided "
                                  "among the local ranks)")
    a("--fp16-allreduce", action="store_true", help="Horovod only: compress gradients to fp16 for the "
                                                    "allreduce (default off)")
    a("--accum-steps", type=int, default=1, help="micro-batches per optimizer step: gradients summed locally, "
                                                 "one allreduce (effective batch = batch-size x accum-steps x "
                                                 "replicas; default %(default)s)")
    a("--no-pin", dest="pin_cores", action="store_false",
      help="Horovod only: don't pin each local rank to its own cores (default: pinned)")
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                                            "(default off: a new run)")
    a("--init", help="start from an init/run/merge directory, a .keras or a .weights.h5 file "
                     "(default: fresh weights from --seed)")
    a("--keep", type=int, default=3, help="checkpoints to keep (default %(default)s)")
    a("--startup-timeout", type=float, metavar="SECONDS",
      help="multiworker and Horovod: wait at most this long for the other workers/ranks to start, then exit 1 "
           "naming the missing ones (default 600)")
    a("--max-steps", type=int, help="stop after this many global steps, >= 1; the last one is checkpointed "
                                    "(default: no limit, every epoch)")
    a("--save-every-steps", type=int, default=0, metavar="N",
      help="also checkpoint every N steps inside epochs (default 0: only at epoch ends)")
    a("--verify-every-steps", type=int, default=0, metavar="N",
      help="also compare the weights across replicas every N steps (one small allgather of per-weight hashes); "
           "they are always compared at checkpoints and after --resume/--init (default 0: only then)")
    a("--client", type=int, help="federated: this client's index, 0 to --clients minus 1 (default: no client, "
                                 "all the training data)")
    a("--clients", type=int, help="federated, with --client: number of clients the data is split among "
                                  "(default none)")
    a("--split", help="federated, with --clients: iid | dirichlet:ALPHA | classes:C (default iid)")
    a("--split-seed", type=int, help="federated, with --clients: seed of the client split, the same for every "
                                     "client (default --seed)")
    a("--prox-mu", type=float, help="federated: FedProx proximal term mu/2 ||w - w_start||^2 "
                                    "(default off; 0 = plain FedAvg)")
    a("--scaffold", nargs="?", const="", metavar="PREV_RUN",
      help="federated: SCAFFOLD client. Corrects every step by c - c_i (server control from --init's "
           "scaffold.h5, client control from PREV_RUN, this client's previous run; omit PREV_RUN in its first "
           "round) and writes the new c_i to RUN/scaffold.h5 for `python -m merge scaffold` (default off)")
    a("--dropout", type=float, default=0.0, help="mlp, lstm, cnn_lstm, or your model if its function takes "
                                                 "dropout: dropout rate in [0, 1) (default 0)")
    a("--recurrent-dropout", type=float, default=0.0, help="lstm, cnn_lstm, or your model if its function "
                                                           "takes recurrent_dropout: rate in [0, 1) (default 0)")
    a("--quiet", action="store_true", help="no progress (default: a bar on a terminal, plain lines elsewhere)")
    a("--json", action="store_true", help="print one JSON document, the final summary, on stdout and nothing "
                                          "else there; every other line goes to stderr (default off)")
    g = p.add_argument_group("pruning and freezing (the --prune-* and --target-sparsity flags need --prune "
                             "or --structured)")
    g.add_argument("--prune", action="store_true", help="magnitude pruning with masks applied inside the step "
                                                        "(default off)")
    g.add_argument("--target-sparsity", type=float, help="final fraction of zeros, in [0, 1) (default 0.8)")
    g.add_argument("--prune-schedule", help="polynomial (Zhu & Gupta, cubic) | constant (default polynomial)")
    g.add_argument("--prune-begin", type=int, help="first step that prunes (default 0)")
    g.add_argument("--prune-end", type=int, help="step that reaches the target (default 3/4 of training)")
    g.add_argument("--prune-every", type=int, help="steps between mask updates, >= 1 (default 10)")
    g.add_argument("--prune-layers", metavar="REGEX",
                   help="regex over weight names, e.g. 'conv.*/kernel' (default: conv and dense kernels "
                        "except the output layer)")
    g.add_argument("--prune-config", metavar="JSON",
                   help='JSON file of per-weight targets: {"conv1/kernel": 0.5, "dense.*": 0.9} (default none)')
    g.add_argument("--structured", action="store_true",
                   help="prune whole Dense units / Conv2D filters by norm; also exports model.sliced.keras "
                        "(default off)")
    g.add_argument("--freeze", help="keep weights fixed: LAYER, LAYER/WEIGHT or LAYER/WEIGHT[i], comma-separated "
                                    "(default: nothing frozen)")
    g.add_argument("--verify-masks", action="store_true",
                   help="with --prune, --structured or --freeze: check after every step that no masked weight "
                        "is nonzero (slow; for tests and audits; default off)")
    return p


def init_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainer init",
                description="Write an initialization that several runs (machines) can start from with --init.")
    p.add_argument("--model", default="digits_cnn", help="registry name or package.module:function "
                                                         "(default %(default)s)")
    p.add_argument("--data", default="digits", help="data set that fixes the input shape and classes: "
                                                    "digits | cifar10 | synthetic | PATH.npz (default %(default)s)")
    p.add_argument("--data-dir", help="cifar10: the directory holding its batches; .npz: a directory to find a "
                                      "relative PATH.npz in (default none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights (default %(default)s)")
    p.add_argument("-o", "--out", required=True, help="the init directory to write (required; must not exist)")
    p.add_argument("--json", action="store_true", help="print one JSON document (out, model, lineage) on stdout "
                                                       "instead of the line (default off)")
    return p


class _DeprecatedAlias(argparse.Action):
    """A flag's old spelling: still works, says which to use instead."""

    def __init__(self, *args, use: str, **kw):
        self.use = use
        super().__init__(*args, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def slice_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainer slice",
                description="Structured pruning as an export step: remove the lowest-norm Dense units and Conv2D "
                            "filters of a .keras model and write the physically smaller model.")
    p.add_argument("model", help="a run directory (its model.keras) or a .keras file")
    p.add_argument("--fraction", type=float, required=True, help="share of units to remove per layer, in [0, 1) "
                                                                 "(required)")
    p.add_argument("--layers", metavar="REGEX", help="regex over layer names to slice (default: every "
                                                     "Dense/Conv2D but the output)")
    p.add_argument("-o", "--out", help="the smaller .keras to write (required)")
    p.add_argument("--output", dest="out", action=_DeprecatedAlias, use="-o/--out", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o file (default: refuse)")
    p.add_argument("--json", action="store_true", help="print one JSON document (out, parameters before and "
                                                       "after, output difference) on stdout (default off)")
    return p


def _slice_source(arg: str):
    """The .keras to slice: the file given, or a run directory's model.keras."""
    from pathlib import Path
    src = Path(arg)
    if src.is_dir():
        if not (src / "model.keras").is_file():
            raise UsageError(f"{src}: a directory without model.keras; give a finished run directory "
                             "or a .keras file")
        return src / "model.keras"
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory; give a run directory or a .keras file")
    return src


def cmd_slice(argv) -> int:
    from pathlib import Path
    args = slice_parser().parse_args(argv)
    if args.out is None:
        raise UsageError("-o/--out is required: the smaller .keras to write (see --help)")
    src, dst = _slice_source(args.model), Path(args.out)
    if dst.suffix != ".keras":
        raise UsageError(f"-o {dst}: must end in .keras")
    if dst.resolve() == src.resolve():
        raise UsageError(f"-o {dst} is the input; write the sliced model elsewhere")
    if dst.exists() and not args.overwrite:
        raise UsageError(f"-o {dst} exists; pass --overwrite or choose another path")
    import tensorflow as tf

    from . import models  # noqa: F401  (registers custom layers)
    from .checkpoint import export_keras
    from .files.archive import load_keras
    from .pruning.structured import select_units, slice_checked, unit_masks
    from .varnames import keyed
    model = load_keras(src)  # the archive checked first, then Keras in safe mode
    keep = select_units(model, args.fraction, layer_regex=args.layers)
    masks = unit_masks(model, keep)
    for name, w in keyed(model.weights).items():
        if name in masks:
            w.assign(w * masks[name])
    x = tf.random.stateless_uniform((64, *model.input_shape[1:]), seed=(0, 0))
    small, diff = slice_checked(model, keep, x)
    export_keras(small, dst)
    if args.json:
        _print_json({"out": str(dst), "source": str(src), "params_before": int(model.count_params()),
                     "params_after": int(small.count_params()), "max_output_difference": float(diff)})
    else:
        print(f"wrote {dst}: {model.count_params():,} -> {small.count_params():,} parameters, "
              f"max output difference to the masked model {diff:.1e}")
    return 0


def _print_json(doc: dict) -> None:
    import json
    print(json.dumps(doc, indent=2, sort_keys=True), flush=True)


def cmd_train(argv) -> int:
    from .job import Options, run
    args = vars(train_parser().parse_args(argv))
    args["prune"] = args["prune"] or args["structured"]
    run(Options(**args))
    return 0


def cmd_init(argv) -> int:
    args = init_parser().parse_args(argv)
    from .flags import validate_data_dir
    from .init import write_init
    from .job import Options, load_data
    validate_data_dir(args.data, args.data_dir)
    data = load_data(Options(data=args.data, data_dir=args.data_dir, seed=args.seed), args.model)
    import keras

    from .models import build_model
    keras.utils.set_random_seed(args.seed)
    model = build_model(args.model, data.input_shape, data.num_classes)
    cfg = {"name": args.model, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
           "options": {}}
    lineage = write_init(args.out, model, cfg)
    if args.json:
        _print_json({"out": str(args.out), "model": cfg, "lineage": lineage, "round": 0})
    else:
        print(f"wrote init {args.out} (model {args.model}, lineage {lineage[:19]}...)")
    return 0


def main(argv=None) -> int:
    from . import failures, interrupts
    from .backends.startup import StartupTimeout
    argv = sys.argv[1:] if argv is None else argv
    rank = _launch_rank()
    interrupts.set_announce(rank == 0)
    try:
        if argv and argv[0] == "init":
            return cmd_init(argv[1:])
        if argv and argv[0] == "slice":
            return cmd_slice(argv[1:])
        return cmd_train(argv)
    except UsageError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # SIGINT or SIGTERM (trainer/interrupts.py)
        if rank == 0:
            name = e.args[0] if isinstance(e, interrupts.Interrupted) else "SIGINT"
            print(f"stopped by {name}: the step under way was abandoned; the run's last checkpoint, if any, is "
                  "kept (--resume continues from it)", file=sys.stderr, flush=True)
        return interrupts.exit_code(e)
    except ReplicaMismatch as e:  # every process raises it, from the same gathered hashes
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except StartupTimeout as e:  # each waiting worker names who it waited for
        print(f"error: worker {rank}: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # only the rank that failed gets here; one line, the traceback in a file
        print(failures.report(e, "trainer", rank), file=sys.stderr, flush=True)
        return 1
