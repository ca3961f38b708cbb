"""python -m bench [scaling|pruning|fedavg|merge|robust|align|federated] [flags]: run benchmarks (all without a
name) and record each in its section of docs/benchmarks.md."""
import sys

from trainer.quiet import install

install()  # before anything imports tensorflow

from trainer import interrupts  # noqa: E402

interrupts.install()

from . import align_evidence, fedavg_evidence, federated, merge_stream, pruning, robust_evidence, scaling

BENCHMARKS = {"scaling": scaling.main, "pruning": pruning.main, "fedavg": fedavg_evidence.main,
              "merge": merge_stream.main, "robust": robust_evidence.main,
              "align": align_evidence.main, "federated": federated.main}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
        if name not in BENCHMARKS:
            sys.exit(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
        sys.exit(BENCHMARKS[name](args))
    sys.exit(max(fn(args) for fn in BENCHMARKS.values()))
