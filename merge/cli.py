"""`python -m merge COMMAND`: the flags of every command (commands.py runs them)."""
from __future__ import annotations

import sys

from trainer.errors import OneLineParser, UsageError, run_cli

from .aggregate import AGGREGATORS, MASK_POLICIES


JSON_HELP = "print one JSON document on stdout instead of the text report (warnings stay on stderr)"
OVERWRITE_HELP = "replace an existing output (default: refuse)"
PAIR_DATA_HELP = "digits, cifar10, synthetic or PATH.npz (default: the data set A and B record)"
DATA_DIR_HELP = "directory of the data set's files, for cifar10 or a relative PATH.npz (default: none)"


def parser() -> OneLineParser:
    p = OneLineParser(prog="python -m merge", description="Merge trained models: FedAvg for models that share an "
                      "initialization, ensembles for models that do not.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    f = sub.add_parser("fedavg", help="weighted average of models that started from the same weights",
                       description="Average models trained from one initialization (FedAvg), streaming one "
                       "tensor at a time. Inputs: trainer run/checkpoint/merge directories, .keras, .weights.h5, "
                       "legacy .h5, TensorFlow checkpoint prefixes. Optimizer state is dropped.")
    f.add_argument("inputs", nargs="+", metavar="INPUT", help="two or more models of the same architecture")
    f.add_argument("-o", "--out", required=True, help="OUT.keras, or a directory a trainer can --init from (required)")
    f.add_argument("--weights", type=_floats, help="per-input weights, e.g. 3,1 (default: samples seen)")
    f.add_argument("--uniform", action="store_true", help="weight every input equally (default: by samples seen)")
    f.add_argument("--force", action="store_true", help="average even inputs with different initializations, "
                   "or inputs that record one beside inputs that record none (default: refuse)")
    f.add_argument("--aggregator", default="mean", help=f"{AGGREGATORS} (default mean: FedAvg, weighted; "
                   "the others are unweighted and resist a few bad inputs)")
    f.add_argument("--mask-policy", choices=MASK_POLICIES,
                   help="pruned inputs: intersection (default; pruned anywhere stays pruned), union, renormalize")
    f.add_argument("--infer-masks", action="store_true",
                   help="read exact zeros of kernels as pruned, for inputs that record no masks (default: off)")
    f.add_argument("--target-sparsity", type=float,
                   help="re-prune the merged masked tensors to this sparsity in [0, 1) (default: keep the masks)")
    f.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights (default: refuse)")
    f.add_argument("--align", action="store_true", help="permute every input's hidden units to match the first "
                   "before averaging (inputs with different initializations; see merge align) (default: off)")
    f.add_argument("--recalibrate-bn", action="store_true",
                   help="recompute batch-norm statistics of the merged model on --data's training split "
                        "(default: off)")
    f.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    f.add_argument("--data", help="check the merged model against the inputs on this data set's test split "
                   "(digits, cifar10, synthetic or PATH.npz; default: no check)")
    f.add_argument("--data-dir", help=DATA_DIR_HELP)
    f.add_argument("--quiet", action="store_true", help="no progress (default: progress on stderr)")
    f.add_argument("--json", action="store_true", help=JSON_HELP)

    so = sub.add_parser("server-step", help="a server optimizer step: previous global + this round's FedAvg",
                        description="FedAvgM, FedAdam or FedYogi: moves PREVIOUS along AVERAGE - PREVIOUS "
                        "with server-side state kept in --state across rounds. The state file records the "
                        "optimizer and its hyperparameters; another optimizer's state is refused.")
    so.add_argument("previous", help="the global model this round's clients started from")
    so.add_argument("average", help="this round's average of the clients (merge fedavg's output)")
    so.add_argument("-o", "--out", required=True, help="the new global: OUT.keras or a directory (required)")
    so.add_argument("--optimizer", default="fedavgm", help="fedavgm | fedadam | fedyogi (default fedavgm)")
    so.add_argument("--state", required=True, help="HDF5 file of the optimizer's state, created if missing, "
                    "updated every round (required)")
    so.add_argument("--server-lr", type=float, default=1.0, help="server learning rate (default 1.0)")
    so.add_argument("--beta1", type=float, default=0.9,
                    help="momentum (fedavgm) or first moment decay (fedadam, fedyogi) (default 0.9)")
    so.add_argument("--beta2", type=float, help="second moment decay, fedadam and fedyogi only (default 0.99)")
    so.add_argument("--tau", type=float, help="adaptivity, fedadam and fedyogi only (default 0.001)")
    so.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    so.add_argument("--json", action="store_true", help=JSON_HELP)

    sc = sub.add_parser("scaffold", help="SCAFFOLD's server step: FedAvg of the clients and the new server control",
                        description="The next global of a SCAFFOLD round: the clients' FedAvg, and the server "
                        "control c + (1/N) sum (c_i+ - c_i) from the clients' scaffold.h5 files, written "
                        "together into a directory the next round's clients --init from.")
    sc.add_argument("clients", nargs="+", metavar="CLIENT_RUN", help="run directories of `trainer --scaffold`")
    sc.add_argument("--global", dest="previous", required=True, metavar="DIR",
                    help="the global these clients started from (a `trainer init` or the last `merge scaffold`) "
                         "(required)")
    sc.add_argument("-o", "--out", required=True, help="the new global directory (required)")
    sc.add_argument("--clients", dest="total", type=int, metavar="N",
                    help="clients in the federation, sampled or not (default: the runs given, "
                         "i.e. every client took part)")
    sc.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    sc.add_argument("--quiet", action="store_true", help="no progress (default: progress on stderr)")
    sc.add_argument("--json", action="store_true", help=JSON_HELP)

    al = sub.add_parser("align", help="permute B's hidden units to match A's (weight matching)",
                        description="Weight matching: B's hidden units permuted to best match A's; the output "
                        "computes the same function as B. For chains of Dense/Conv2D layers.")
    al.add_argument("a", metavar="A", help="the reference model, left as it is")
    al.add_argument("b", metavar="B", help="the model whose units are permuted")
    al.add_argument("-o", "--out", required=True, help="OUT.keras: B with its units in A's order (required)")
    al.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    al.add_argument("--json", action="store_true", help=JSON_HELP)

    ba = sub.add_parser("barrier", help="loss and accuracy on the line from A to B, before and after alignment",
                        description="Scores the models on the straight line from A to B (and to B aligned to "
                        "A) on a data set's test split, and the loss barrier: the worst rise above the line "
                        "between the ends.")
    ba.add_argument("a", metavar="A", help="one end of the line")
    ba.add_argument("b", metavar="B", help="the other end")
    ba.add_argument("--data", help=PAIR_DATA_HELP)
    ba.add_argument("--data-dir", help=DATA_DIR_HELP)
    ba.add_argument("--points", type=int, default=11, help="points on the line, ends included, at least 3 "
                    "(default 11)")
    ba.add_argument("--no-align", action="store_true",
                    help="only the straight line to B as it is (default: also to B aligned to A)")
    ba.add_argument("--plot", metavar="PNG", help="also write the curves as a PNG here (default: no plot)")
    ba.add_argument("--json", action="store_true", help=JSON_HELP)

    au = sub.add_parser("auto", help="average, align-then-average, or ensemble, by the measured barrier",
                        description="Measures the loss barrier between A and B (merge barrier) and writes "
                        "their plain average when it is low, their average after alignment when that is low, "
                        "an ensemble otherwise.")
    au.add_argument("a", metavar="A", help="the first model")
    au.add_argument("b", metavar="B", help="the second model")
    au.add_argument("--data", help=PAIR_DATA_HELP)
    au.add_argument("--data-dir", help=DATA_DIR_HELP)
    au.add_argument("-o", "--out", required=True, help="OUT.keras (required)")
    au.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    au.add_argument("--json", action="store_true", help=JSON_HELP)

    e = sub.add_parser("ensemble", help="one model that combines the members' predictions",
                       description="Combine independently trained models by their outputs. Members may "
                       "differ in architecture but not in input shape or class count.")
    e.add_argument("inputs", nargs="+", metavar="MEMBER", help="two or more models with the same input and classes")
    e.add_argument("-o", "--out", required=True, help="OUT.keras (required)")
    e.add_argument("--method", default="mean", choices=("mean", "logit-mean", "vote", "max"),
                   help="mean of probabilities (default), mean of log-probabilities, weighted vote, max")
    e.add_argument("--weights", type=_floats, help="per-member weights, e.g. 2,1 (default: equal)")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    e.add_argument("--json", action="store_true", help=JSON_HELP)

    i = sub.add_parser("inspect", help="format, tensors, lineage, sparsity and samples of one input")
    i.add_argument("input", metavar="INPUT", help="a run, checkpoint, init or merge directory, or a model file")
    i.add_argument("--json", action="store_true", help=JSON_HELP)

    d = sub.add_parser("diff", help="what would block averaging two inputs (exit 1 if anything)",
                       description="Lists every difference that would stop `merge fedavg A B`: tensors, "
                       "shapes, dtypes, lineage. Exit 0 when none, 1 when any.")
    d.add_argument("a", metavar="A", help="the first model")
    d.add_argument("b", metavar="B", help="the second model")
    d.add_argument("--json", action="store_true", help=JSON_HELP)

    v = sub.add_parser("evaluate", help="accuracy and loss of checkpoints, merges and ensembles",
                       description="Scores every model on the test split of one data set: by default the one "
                       "the inputs record (trainer runs, merges and ensembles of them record it).")
    v.add_argument("inputs", nargs="+", metavar="INPUT", help="models to score side by side")
    v.add_argument("--data", help="digits, cifar10, synthetic or PATH.npz (default: the data set the inputs "
                   "record)")
    v.add_argument("--data-dir", help=DATA_DIR_HELP)
    v.add_argument("--plot", metavar="PNG", help="also write a bar chart PNG here (default: no plot)")
    v.add_argument("--json", action="store_true", help=JSON_HELP)
    return p


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text}: expected numbers separated by commas, e.g. 3,1") from None


def main(argv=None) -> int:
    from .commands import COMMANDS

    def body():
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
        return COMMANDS[args.command](args)
    return run_cli(body, "merge")
