"""Flags that would mean nothing are refused before any work starts.

A flag that is silently ignored (a pruning target without --prune, a device
count on Horovod, a client split without clients) leaves a user believing
the run did what the command line says. Each check here names the flag and
says what to do instead; the CLI turns it into one line and exit code 2.
Checks that need the model or the data set (--dropout on a model without
dropout, classes:C above the class count) run where those are known.
"""
from __future__ import annotations

import math

from .errors import UsageError

# Flags that only shape pruning: (Options field, flag).
PRUNE_FLAGS = (("target_sparsity", "--target-sparsity"), ("prune_schedule", "--prune-schedule"),
               ("prune_begin", "--prune-begin"), ("prune_end", "--prune-end"), ("prune_every", "--prune-every"),
               ("prune_layers", "--prune-layers"), ("prune_config", "--prune-config"))

# Data sets read from --data-dir: cifar10's batches, or a relative PATH.npz.
DATA_DIR_USERS = "--data cifar10 or --data PATH.npz"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _apply(flags: list) -> str:
    return "apply" if len(flags) > 1 else "applies"


def validate(o) -> None:
    """UsageError for a flag `o` (trainer.job.Options) gives that is out of
    range, contradicts another one, or would change nothing."""
    _counts(o)
    _combinations(o)
    validate_data_dir(o.data, o.data_dir)
    _backend_flags(o)


def _counts(o) -> None:
    for name in ("epochs", "batch_size", "keep", "accum_steps"):
        if getattr(o, name) < 1:
            raise UsageError(f"{_flag(name)} must be at least 1, got {getattr(o, name)}")
    # None means "not given": no limit, auto, every device, the default interval.
    for name, unset in (("max_steps", "no limit"), ("threads", "auto"), ("devices", "every visible device"),
                        ("prune_every", "every 10 steps")):
        value = getattr(o, name)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be at least 1, got {value}; omit it for the default ({unset})")
    if o.save_every_steps < 0:
        raise UsageError(f"--save-every-steps must be 0 (only at epoch ends) or more, got {o.save_every_steps}")
    if o.verify_every_steps < 0:
        raise UsageError(f"--verify-every-steps must be 0 (only at checkpoints) or more, got {o.verify_every_steps}")
    if not (o.warmup_epochs >= 0 and math.isfinite(o.warmup_epochs)):
        raise UsageError(f"--warmup-epochs must be a finite number >= 0 (0: no warmup), got {o.warmup_epochs}")
    for name in ("dropout", "recurrent_dropout"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise UsageError(f"{_flag(name)} must be in [0, 1), got {getattr(o, name)}")
    if o.prox_mu is not None and not (o.prox_mu >= 0 and o.prox_mu < float("inf")):
        raise UsageError(f"--prox-mu must be a finite number >= 0, got {o.prox_mu}")


def _combinations(o) -> None:
    if (o.client is None) != (o.clients is None):
        raise UsageError("--client and --clients go together (e.g. --client 0 --clients 2)")
    if o.clients is None:
        given = [flag for flag, value in (("--split", o.split), ("--split-seed", o.split_seed)) if value is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} only {_apply(given)} to a federated client: add --client K --clients N, "
                             f"or drop {' and '.join(given)}")
    if not (o.prune or o.structured):
        given = [flag for name, flag in PRUNE_FLAGS if getattr(o, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only {_apply(given)} with pruning: "
                             f"add --prune (or --structured), or drop {', '.join(given)}")
    if o.verify_masks and not (o.prune or o.structured or o.freeze):
        raise UsageError("--verify-masks checks pruning or freezing masks: add --prune, --structured or --freeze, "
                         "or drop --verify-masks")
    if o.resume and not o.out:
        raise UsageError("--resume needs --out RUN_DIR, the run to continue")
    if o.resume and o.init:
        raise UsageError("--resume and --init exclude each other: a resumed run keeps its own start")
    if o.freeze and o.structured:
        raise UsageError("--freeze and --structured exclude each other: removing whole units "
                         "would remove frozen weights too")
    if o.scaffold is not None and not (o.init or o.resume):
        raise UsageError("--scaffold trains a client from the round's global: pass --init GLOBAL "
                         "(the directory `python -m merge scaffold` or `trainer init` wrote)")


def validate_data_dir(data: str, data_dir: str | None) -> None:
    """--data-dir is read by cifar10 and a relative .npz path only."""
    if data_dir is not None and str(data).strip().lower() in ("digits", "synthetic"):
        raise UsageError(f"--data-dir does not apply to --data {data}, which is built in; it is for "
                         f"{DATA_DIR_USERS}: drop --data-dir")


def _backend_flags(o) -> None:
    horovod_only = [flag for flag, on in (("--fp16-allreduce", o.fp16_allreduce), ("--no-pin", not o.pin_cores))
                    if on]
    if not horovod_only and o.devices is None and o.startup_timeout is None:
        return
    # auto resolves from the launcher's variables (horovodrun, mpirun, srun),
    # as the run itself will: the flags are judged against the real backend.
    from .backends import resolve
    backend = resolve(o.backend)
    how = "" if o.backend == backend else f" (--backend {o.backend} resolved to {backend})"
    if horovod_only and backend != "horovod":
        raise UsageError(f"{' and '.join(horovod_only)} only {_apply(horovod_only)} to the Horovod backend, and this run uses "
                         f"{backend}{how}: launch it with horovodrun, mpirun or srun, or drop "
                         f"{' and '.join(horovod_only)}")
    if o.startup_timeout is not None and backend not in ("horovod", "multiworker"):
        raise UsageError(f"--startup-timeout only applies to the Horovod and multiworker backends, which wait for "
                         f"their peers, and this run uses {backend}{how}: drop --startup-timeout")
    if o.devices is not None and backend != "mirrored":
        raise UsageError(f"--devices only applies to --backend mirrored, and this run uses {backend}{how}: "
                         "add --backend mirrored, or drop --devices")


def check_resumed_options(o, recorded: dict) -> None:
    """A resumed run keeps the model options it started with; a different
    --dropout would otherwise be dropped without a word."""
    for name in ("dropout", "recurrent_dropout"):
        given, kept = getattr(o, name), recorded.get(name) or 0.0
        if given and given != kept:
            raise UsageError(f"{_flag(name)} {given}: --resume {o.out} continues with the {name.replace('_', ' ')} "
                             f"it started with ({kept}); drop {_flag(name)}")
