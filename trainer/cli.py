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
    return 0


def train_parser() -> argparse.ArgumentParser:
    from .backends import CHOICES
    p = OneLineParser(prog="python -m trainer", description="Data-parallel training on Horovod or tf.distribute. "
                "`python -m trainer init --help` for shared initializations.")
    a = p.add_argument
    a("--model", help="registry name (digits_cnn, cifar10_cnn, mlp, lstm, cnn_lstm) or package.module:function "
                      "(default digits_cnn, or the model of --init/--resume)")
    a("--data", default="digits", help="digits | cifar10 | synthetic | PATH.npz (default digits)")
    a("--data-dir", help="directory holding cifar-10-batches-py or cifar-10-batches-bin")
    a("--epochs", type=int, default=8)
    a("--batch-size", type=int, default=32, help="per replica (default 32)")
    a("--lr", type=float, default=1e-3, help="base learning rate, scaled by the replica count (default 1e-3)")
    a("--optimizer", default="adam", help="adam | sgd | momentum")
    a("--warmup-epochs", type=float, default=1.0, help="epochs to ramp the scaled learning rate (default 1)")
    a("--no-lr-scaling", dest="scale_lr", action="store_false", help="keep --lr whatever the replica count")
    a("--seed", type=int, default=0)
    a("--out", help="run directory (default runs/MODEL-DATA-TIME)")
    a("--backend", default="auto", choices=None, help=f"{' | '.join(CHOICES)} (auto: horovod under "
                                                      "horovodrun/mpirun/srun, else single)")
    a("--devices", type=int, default=0, help="mirrored: number of devices (CPU: logical devices)")
    a("--threads", type=int, default=0, help="intra-op threads per process (default: cores / local ranks)")
    a("--fp16-allreduce", action="store_true", help="Horovod: compress gradients to fp16 for the allreduce")
    a("--accum-steps", type=int, default=1, help="micro-batches per optimizer step: gradients summed locally, "
                                                 "one allreduce (effective batch = batch-size x accum-steps x replicas)")
    a("--no-pin", dest="pin_cores", action="store_false", help="Horovod: don't pin each local rank to its own cores")
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    a("--init", help="start from an init/run directory, a .keras or a .weights.h5 file")
    a("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    a("--max-steps", type=int, default=0, help="stop after this many global steps (checkpointed)")
    a("--save-every-steps", type=int, default=0, help="also checkpoint every N steps inside epochs")
    a("--verify-every-steps", type=int, default=0, metavar="N",
      help="also compare the weights across replicas every N steps (one small allgather of per-weight hashes); "
           "they are always compared at checkpoints and after --resume/--init (default 0: only then)")
    a("--client", type=int, help="federated: this client's index")
    a("--clients", type=int, help="federated: number of clients")
    a("--split", default="iid", help="iid | dirichlet:ALPHA | classes:C (default iid)")
    a("--split-seed", type=int, help="seed of the client split (default --seed); the same for every client")
    a("--prox-mu", type=float, help="federated: FedProx proximal term mu/2 ||w - w_start||^2 (0 = plain FedAvg)")
    a("--scaffold", nargs="?", const="", metavar="PREV_RUN",
      help="federated: SCAFFOLD client. Corrects every step by c - c_i (server control from --init's "
           "scaffold.h5, client control from PREV_RUN, this client's previous run; omit PREV_RUN in its first "
           "round) and writes the new c_i to RUN/scaffold.h5 for `python -m merge scaffold`")
    a("--dropout", type=float, default=0.0, help="lstm: input dropout")
    a("--recurrent-dropout", type=float, default=0.0, help="lstm: recurrent dropout")
    a("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("pruning and freezing")
    g.add_argument("--prune", action="store_true", help="magnitude pruning with masks applied inside the step")
    g.add_argument("--target-sparsity", type=float, default=0.8, help="final fraction of zeros (default 0.8)")
    g.add_argument("--prune-schedule", default="polynomial", help="polynomial (Zhu & Gupta, cubic) | constant")
    g.add_argument("--prune-begin", type=int, default=0, help="first step that prunes (default 0)")
    g.add_argument("--prune-end", type=int, default=-1, help="step that reaches the target (default 3/4 of training)")
    g.add_argument("--prune-every", type=int, default=10, help="steps between mask updates (default 10)")
    g.add_argument("--prune-layers", help="regex over weight names, e.g. 'conv.*/kernel' (default: conv and dense kernels except the output layer)")
    g.add_argument("--prune-config", help='JSON file of per-weight targets: {"conv1/kernel": 0.5, "dense.*": 0.9}')
    g.add_argument("--structured", action="store_true",
                   help="prune whole Dense units / Conv2D filters by norm; also exports model.sliced.keras")
    g.add_argument("--freeze", help="keep weights fixed: LAYER, LAYER/WEIGHT or LAYER/WEIGHT[i], comma-separated")
    g.add_argument("--verify-masks", action="store_true",
                   help="check after every step that no masked weight is nonzero (slow; for tests and audits)")
    return p


def init_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainer init",
                description="Write an initialization that several runs (machines) can start from with --init.")
    p.add_argument("--model", default="digits_cnn")
    p.add_argument("--data", default="digits", help="data set that fixes the input shape and classes")
    p.add_argument("--data-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    return p


def slice_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainer slice",
                description="Structured pruning as an export step: remove the lowest-norm Dense units and Conv2D "
                            "filters of a .keras model and write the physically smaller model.")
    p.add_argument("model", help="a .keras file (e.g. a run's model.keras)")
    p.add_argument("--fraction", type=float, required=True, help="share of units to remove per layer, in [0, 1)")
    p.add_argument("--layers", help="regex over layer names to slice (default: every Dense/Conv2D but the output)")
    p.add_argument("-o", "--output", required=True, help="the smaller .keras to write")
    p.add_argument("--overwrite", action="store_true")
    return p


def cmd_slice(argv) -> int:
    from pathlib import Path
    args = slice_parser().parse_args(argv)
    src, dst = Path(args.model), Path(args.output)
    if not src.is_file():
        raise UsageError(f"{src}: no such file")
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
    print(f"wrote {dst}: {model.count_params():,} -> {small.count_params():,} parameters, "
          f"max output difference to the masked model {diff:.1e}")
    return 0


def cmd_train(argv) -> int:
    from .job import Options, run
    args = vars(train_parser().parse_args(argv))
    args["prune"] = args["prune"] or args["structured"]
    run(Options(**args))
    return 0


def cmd_init(argv) -> int:
    from .job import Options, load_data
    from .init import write_init
    args = init_parser().parse_args(argv)
    data = load_data(Options(data=args.data, data_dir=args.data_dir, seed=args.seed), args.model)
    import keras

    from .models import build_model
    keras.utils.set_random_seed(args.seed)
    model = build_model(args.model, data.input_shape, data.num_classes)
    cfg = {"name": args.model, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
           "options": {}}
    lineage = write_init(args.out, model, cfg)
    print(f"wrote init {args.out} (model {args.model}, lineage {lineage[:19]}...)")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "init":
            return cmd_init(argv[1:])
        if argv and argv[0] == "slice":
            return cmd_slice(argv[1:])
        return cmd_train(argv)
    except UsageError as e:
        if _launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except ReplicaMismatch as e:  # every process raises it, from the same gathered hashes
        if _launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
