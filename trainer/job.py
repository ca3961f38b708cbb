"""One training job, start to end: data -> model -> backend -> loop -> checkpoint.

`run(opts)` is what `python -m trainer` does after parsing its flags.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path


from .errors import ReplicaMismatch, UsageError, first_line

# Input shape of --data synthetic when the model has no natural one.
SYNTHETIC_SHAPES = {"digits_cnn": (8, 8, 1), "lstm": (16, 8), "cnn_lstm": (6, 16, 16, 3)}
DEFAULT_SYNTHETIC_SHAPE = (32, 32, 3)


@dataclass
class Options:
    model: str | None = None
    data: str = "digits"
    data_dir: str | None = None
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    warmup_epochs: float = 1.0
    scale_lr: bool = True
    seed: int = 0
    out: str | None = None
    backend: str = "auto"
    devices: int | None = None  # mirrored only; None: every visible device
    threads: int | None = None  # None: auto, the cores divided among the local ranks
    fp16_allreduce: bool = False
    accum_steps: int = 1
    pin_cores: bool = True
    resume: bool = False
    init: str | None = None
    keep: int = 3
    max_steps: int | None = None  # None: no limit
    save_every_steps: int = 0
    client: int | None = None
    clients: int | None = None
    split: str | None = None  # None: iid (given only with --clients)
    split_seed: int | None = None
    prox_mu: float | None = None
    scaffold: str | None = None  # None: off; "": the client's first round; else its previous run
    dropout: float = 0.0
    recurrent_dropout: float = 0.0
    quiet: bool = False
    json: bool = False
    prune: bool = False
    # None: not given, PruneConfig's default. Given without --prune or
    # --structured they would change nothing, so validate() refuses them.
    target_sparsity: float | None = None
    prune_schedule: str | None = None
    prune_begin: int | None = None
    prune_end: int | None = None
    prune_every: int | None = None
    prune_layers: str | None = None
    prune_config: str | None = None
    freeze: str | None = None
    verify_masks: bool = False
    verify_every_steps: int = 0
    structured: bool = False
    model_options: dict = field(default_factory=dict)
    startup_timeout: float | None = None  # seconds start-up waits for the other workers/ranks (None: 600)
    verbose: bool = False  # native log lines (trainer/quiet.py acts on it before parsing)


def validate(o: Options) -> None:
    """UsageError for flags that are out of range, contradict each other or would do nothing."""
    from .flags import validate as check_flags
    check_flags(o)


def prune_config(o: Options):
    from .pruning.config import PruneConfig, read_per_layer
    given = {k: v for k, v in (("target", o.target_sparsity), ("schedule", o.prune_schedule),
                               ("begin", o.prune_begin), ("end", o.prune_end), ("every", o.prune_every))
             if v is not None}
    cfg = PruneConfig(**given, per_layer=read_per_layer(o.prune_config) if o.prune_config else {},
                      structured=o.structured)
    if o.prune_layers:
        cfg.layers = o.prune_layers
    return cfg


def configure_threads(threads: int) -> None:
    """Intra-op threads per process; must run before TensorFlow starts.

    Several ranks on one host would otherwise each spawn a thread per core
    and fight over them, so the default splits the cores between them.
    """
    import tensorflow as tf
    if not threads:
        local = next((int(os.environ[v]) for v in ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                                   "SLURM_NTASKS_PER_NODE") if v in os.environ), 1)
        threads = max(1, (os.cpu_count() or 1) // max(1, local)) if local > 1 else 0
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def default_out(model: str, data: str) -> str:
    tag = Path(data).stem if data.endswith(".npz") else data
    return str(Path("runs") / f"{model.replace(':', '.')}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")


def _split_seed(o: Options) -> int:
    # Clients of one federation must draw the same split, yet may train with
    # their own --seed (their own initialization or data order).
    return o.seed if o.split_seed is None else o.split_seed


def load_data(o: Options, model: str):
    from .data import load_dataset
    shape = SYNTHETIC_SHAPES.get(model, DEFAULT_SYNTHETIC_SHAPE)
    data = load_dataset(o.data, o.data_dir, synthetic_shape=shape, seed=o.seed)
    return data if o.clients is None else client_share(data, o)


def client_share(data, o: Options):
    """The training samples of client `o.client` (test set unchanged)."""
    from .splits import client_indices
    split = o.split or "iid"
    idx = client_indices(data.y_train, o.client, o.clients, split, _split_seed(o), num_classes=data.num_classes)
    if len(idx) == 0:
        raise UsageError(f"client {o.client} of {o.clients} gets no samples under --split {split}")
    return type(data)(data.name, data.x_train[idx], data.y_train[idx], data.x_test, data.y_test, data.num_classes)


def run(o: Options) -> dict:
    validate(o)
    prune_cfg = prune_config(o) if o.prune else None
    if prune_cfg:  # before any backend starts: bad pruning flags fail fast
        prune_cfg.validate()
    configure_threads(o.threads)
    from .backends import create
    from .backends.tfdistribute import configure_logical_devices
    if o.backend == "mirrored":
        configure_logical_devices(o.devices)
    backend = create(o.backend, fp16_allreduce=o.fp16_allreduce, devices=o.devices, pin_cores=o.pin_cores,
                     startup_timeout=600.0 if o.startup_timeout is None else o.startup_timeout)
    if o.scaffold is not None and backend.name in ("mirrored", "multiworker"):
        raise UsageError(f"--scaffold runs on the single and horovod backends, not {backend.name}: "
                         "tf.distribute sums gradients inside apply_gradients, after the hook that "
                         "needs the summed gradient")

    from . import checkpoint as ck
    from .agreement import WeightCheck
    from .loop import LoopConfig, train
    from .report import ChiefReporter, Reporter

    plan = backend.load_shared(lambda: _plan(o))
    from .failures import set_log_dir
    set_log_dir(Path(plan["out"]) / "logs")  # tracebacks of this rank from here on
    data = load_data(o, plan["model"]["name"])
    model_cfg = {**plan["model"], "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    if plan["expect_model"] and plan["expect_model"] != model_cfg:
        raise UsageError(f"{plan['source']}: was written for model {plan['expect_model']}, "
                         f"not {model_cfg}; pass matching --model/--data")
    model, optimizer, masks, prox, scaffold, checkpoint = _build(o, backend, data, model_cfg, prune_cfg)
    state = backend.load_shared(lambda: _restore(o, plan, model, checkpoint, scaffold))
    backend.broadcast_variables(model.variables + optimizer.variables + masks.variables
                                + (prox.anchor if prox else []) + (scaffold.variables_to_sync if scaffold else []))
    check = WeightCheck(backend, model, o.verify_every_steps)
    if scaffold:  # the controls must agree across ranks as the weights do
        check.named.update(scaffold.named())
    if o.resume or o.init:
        # Under Horovod only rank 0 read, so this proves the broadcast; under
        # tf.distribute every worker read its own copy of the files.
        check.now("after --resume" if o.resume else "after --init")
    if not o.resume:
        masks.start()
        if prox:
            prox.start()

    run_dir = ck.RunDir(plan["out"], keep=o.keep) if backend.is_chief else None
    if run_dir:
        run_dir.clean_partial()
        manifest = _run_manifest(o, plan, backend, data, model_cfg, plan["lineage"] or ck.fingerprint(model.weights))
        run_dir.write_manifest({**(run_dir.manifest() if o.resume else {}), **manifest})
    title = f"{Path(plan['out']).name}: {model_cfg['name']} on {o.data}"
    reporter = ChiefReporter(plan["out"], quiet=o.quiet, json=o.json, title=title) if backend.is_chief else Reporter()
    reporter.line(f"training {model_cfg['name']} on {o.data} ({len(data.x_train)} samples) with "
                  f"{backend.describe()}, {o.batch_size}/replica, run dir {plan['out']}"
                  + (f", resuming at step {state.step}" if o.resume else ""))

    def save(st):
        check.at_checkpoint(st.step)  # on every process, before rank 0 writes its copy as the run's
        if run_dir:
            meta = {**st.to_dict(), "world_size": backend.num_replicas}
            run_dir.save(checkpoint, meta, {"step": st.step, "epoch": st.epoch, "samples_seen": st.samples_seen})

    cfg = LoopConfig(epochs=o.epochs, batch_size=o.batch_size, seed=o.seed, accum_steps=o.accum_steps,
                     max_steps=o.max_steps or 0, save_every_steps=o.save_every_steps)
    hooks = step_hooks(masks, prox, scaffold)
    hooks["after_step"] = [*hooks["after_step"], check.after_step]
    speed = train(model, optimizer, backend, data, cfg, state, reporter, save, **hooks)
    if scaffold and run_dir:
        recorded = run_dir.manifest()
        scaffold.write(run_dir.path, recorded.get("lineage"), recorded.get("round"))
    return _finish(backend, model, data, run_dir, reporter, speed, state, plan["out"], masks, check)


def step_hooks(masks, prox, scaffold) -> dict:
    """The loop's hooks. Gradient hooks in order: SCAFFOLD (it sums the raw
    gradients, before any term is added), FedProx, then the masks (so that a
    masked gradient stays exactly zero)."""
    hooks = masks.hooks()
    hooks["grad_hooks"] = [*([scaffold.grad_hook] if scaffold else []), *([prox.grad_hook] if prox else []),
                           *hooks["grad_hooks"]]
    return hooks


def _build(o: Options, backend, data, model_cfg: dict, prune_cfg=None):
    import keras

    from . import checkpoint as ck
    from .masking import Masking
    from .models import build_model
    from .optim import make_optimizer
    keras.utils.set_random_seed(o.seed)  # the same initial weights on every process
    steps_per_epoch = max(1, len(data.x_train) // (o.batch_size * o.accum_steps * backend.num_replicas))
    with backend.scope():
        model = build_model(model_cfg["name"], tuple(data.input_shape), data.num_classes, **model_cfg["options"])
        scale = backend.lr_scale if o.scale_lr else 1
        optimizer = make_optimizer(o.optimizer, o.lr, scale, int(o.warmup_epochs * steps_per_epoch))
        # Slots exist before any restore or broadcast, so both reach them.
        optimizer.build(model.trainable_variables)
    total_steps = o.max_steps or o.epochs * steps_per_epoch
    masks = Masking(o, model, backend, total_steps, prune_cfg)
    prox = scaffold = None
    extra = masks.checkpoint_entries()
    if o.prox_mu is not None:
        from .proximal import Proximal
        prox = Proximal(model, backend, o.prox_mu)
        extra.update(prox.checkpoint_entries)
    if o.scaffold is not None:
        from .scaffold import Scaffold
        scaffold = Scaffold(model, backend)
        extra.update(scaffold.checkpoint_entries)
    return model, optimizer, masks, prox, scaffold, ck.state_checkpoint(model, optimizer, **extra)


def _restore(o: Options, plan: dict, model, checkpoint, scaffold=None):
    """The starting TrainState, after loading what --resume or --init names."""
    import tensorflow as tf
    from .init import check_lineage, load_initial_weights
    from .loop import TrainState
    if plan["resume_prefix"]:
        try:
            checkpoint.read(plan["resume_prefix"]).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            raise UsageError(f"{o.out}: checkpoint does not fit this model ({first_line(e, 200)})") from None
        return TrainState(**plan["resume_state"])
    if o.init:
        load_initial_weights(model, o.init)
        check_lineage(model, o.init, plan["init_kind"], plan["lineage"])
        if scaffold:
            scaffold.load(_server_control(o, plan), o.scaffold or None, plan["lineage"], plan["init_round"],
                          f"--init {o.init}")
    return TrainState()


def _server_control(o: Options, plan: dict):
    """The global's control file; None (zeros) only for a fresh start."""
    from .files import controls
    path = controls.path_of(o.init)
    if Path(o.init).is_dir() and path.is_file():
        return path
    if plan["init_kind"] == "init" or plan["init_round"] == 0:
        return None
    raise UsageError(f"--init {o.init}: holds no SCAFFOLD server control ({controls.FILE}); --scaffold starts "
                     "from a `trainer init` directory or a global directory written by `python -m merge scaffold`")


def _run_manifest(o: Options, plan: dict, backend, data, model_cfg: dict, lineage: str) -> dict:
    from . import checkpoint as ck
    split = None if o.clients is None else {"client": o.client, "clients": o.clients, "spec": o.split or "iid",
                                            "seed": _split_seed(o)}
    manifest = {
        "kind": "run",
        "model": model_cfg,
        "data": {"name": o.data, "train_samples": int(len(data.x_train)), "split": split},
        "lineage": lineage,
        "init": plan["init_source"],
        "world_size": backend.num_replicas,
        "backend": backend.describe(),
        "optimizer": {"name": o.optimizer, "lr": o.lr, "lr_scale": backend.lr_scale if o.scale_lr else 1,
                      "batch_size_per_replica": o.batch_size, "accum_steps": o.accum_steps},
        "seed": o.seed,
        "prox_mu": o.prox_mu,
        "scaffold": None if o.scaffold is None else {"previous": o.scaffold or None, "file": "scaffold.h5"},
        "versions": ck.package_versions(),
    }
    if not o.resume:
        # A run belongs to the round of what it starts from (0: a fresh start
        # or a `trainer init`); merging a round's runs makes the next round.
        manifest.update(step=0, samples_seen=0, epoch=0, round=plan["init_round"] if o.init else 0)
    return manifest


def _finish(backend, model, data, run_dir, reporter, speed: dict, state, out: str, masks, check) -> dict:
    """Final evaluation, the replica check, the .keras export, the summary line."""
    from . import checkpoint as ck
    from .loop import evaluate
    backend.average_variables(check.statistics)  # before the evaluation that uses them
    test = evaluate(model, data.x_test, data.y_test, backend)
    replicas = backend.replica_fingerprints(model.weights)
    hosts = backend.replica_hosts()
    if len(set(replicas)) != 1:
        check.now("after training")  # names the weight
        raise ReplicaMismatch(f"weights differ across {backend.replica_noun}s after training: {replicas}")
    extra = masks.finish(run_dir, reporter, sample=data.x_test[:256])
    if run_dir:
        # The lineage rides along inside the file: copied alone to another
        # machine, it still merges as what it is.
        ck.export_keras(model, run_dir.path / "model.keras",
                        record={**run_dir.manifest(), "samples_seen": state.samples_seen})
        run_dir.write_manifest({**run_dir.manifest(), **extra, "final": {
            "keras": "model.keras", "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "samples_per_sec": speed["samples_per_sec"], "replica_fingerprints": replicas,
            "replica_hosts": hosts}})
    reporter.line(f"test accuracy {test['accuracy']:.4f}")
    reporter.line(f"final: loss={test['loss']:.4f} accuracy={test['accuracy']:.4f} "
                  f"samples/s={speed['samples_per_sec']:.1f} steps={state.step} "
                  f"replicas={backend.num_replicas} backend={backend.describe()}")
    reporter.close()
    if run_dir:  # --json: the same numbers as the manifest's, for scripts
        recorded = run_dir.manifest()
        reporter.summary({"run_dir": str(out), "model": recorded["model"]["name"], "data": recorded["data"]["name"],
                          "backend": backend.describe(), "replicas": backend.num_replicas, "steps": state.step,
                          "epoch": state.epoch, "samples_seen": state.samples_seen, "test_loss": test["loss"],
                          "test_accuracy": test["accuracy"], "samples_per_sec": speed["samples_per_sec"],
                          "lineage": recorded.get("lineage"), "round": recorded.get("round"),
                          **({"sparsity": extra["pruning"]["sparsity"]} if "pruning" in extra else {})})
    return {"test": test, "speed": speed, "out": out, "state": state.to_dict()}


def _plan(o: Options) -> dict:
    """Chief-side decisions: the run directory, what to resume or start from."""
    from . import checkpoint as ck
    from .files.recorded import recorded_model
    from .init import read_init
    plan = {"resume_prefix": None, "resume_state": None, "lineage": None, "init_source": None,
            "init_kind": None, "init_round": None, "expect_model": None, "source": None}
    options = {"dropout": o.dropout, "recurrent_dropout": o.recurrent_dropout, **o.model_options}
    model = o.model
    if o.resume:
        manifest = ck.read_manifest(Path(o.out))
        recorded = recorded_model(manifest.get("model"), f"--resume {o.out}", named=model)
        if model and model != recorded["name"]:
            raise UsageError(f"--resume {o.out}: that run trains model {recorded['name']!r}, "
                             f"not {model!r}; drop --model or pick another --out")
        if (manifest.get("scaffold") is not None) != (o.scaffold is not None):
            raise UsageError(f"--resume {o.out}: that run was {'' if manifest.get('scaffold') else 'not '}a SCAFFOLD "
                             f"client; {'add' if manifest.get('scaffold') else 'drop'} --scaffold")
        prefix, meta = ck.checkpoint_of(Path(o.out))
        if not all(k in meta for k in ck.META_COUNTS):
            raise UsageError(f"--resume {o.out}: its checkpoint's meta.json lacks {', '.join(ck.META_COUNTS)}; "
                             "the checkpoint is damaged, restore it or pick an earlier one")
        plan.update(resume_prefix=prefix, lineage=manifest.get("lineage"), init_source=manifest.get("init"),
                    resume_state={k: meta[k] for k in ("epoch", "offset", "step", "samples_seen")},
                    expect_model=recorded, source=f"--resume {o.out}")
        from .flags import check_resumed_options
        check_resumed_options(o, recorded["options"])
        model, options = recorded["name"], recorded["options"]
    elif o.init:
        info = read_init(o.init)
        if info.get("model"):
            info["model"] = recorded_model(info["model"], f"--init {o.init}", named=model)
            if model and model != info["model"]["name"]:
                raise UsageError(f"--init {o.init}: written for model {info['model']['name']!r}, not {model!r}; "
                                 f"pass --model {info['model']['name']} or drop --model")
            model = info["model"]["name"]
            plan.update(expect_model={**info["model"], "options": options}, source=f"--init {o.init}")
        plan.update(lineage=info.get("lineage"), init_source=str(o.init), init_kind=info["kind"],
                    init_round=info["round"])
    model = model or "digits_cnn"
    if not o.resume:
        from .models import check_options
        check_options(model, {"dropout": o.dropout, "recurrent_dropout": o.recurrent_dropout})
    out = o.out or default_out(model, o.data)
    if not o.resume and (Path(out) / ck.MANIFEST).exists():
        raise UsageError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    plan.update(out=out, model={"name": model, "options": options})
    return plan

