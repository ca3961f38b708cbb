"""Keras 2 model configs, made loadable by Keras 3, as JSON (no Keras import).

Keras 3 reads a Keras 2 Sequential `.keras` as it is, but refuses a
functional one: its config names the class by the module Keras 2 kept it in
(`keras.src.engine.functional`), which Keras 3 does not have and, in safe
mode, would not import. The layer list itself (class names, order, layer
configs) is what Keras 3 writes, so the weights file's positional layout is
the same and only a few config details need restating:

  * model classes by their Keras 3 module;
  * a single input or output written as a list of one (`[["input", 0, 0]]`,
    which Keras 3 would take as "the model wants a list");
  * the options Keras 3's own legacy loader renames
    (keras.src.legacy.saving.saving_utils.model_from_config): an InputLayer's
    `batch_input_shape`, a one-element `axis` list;
  * options Keras 3 dropped (`time_major`), removed where they hold the only
    value Keras 3 supports and refused otherwise.

A legacy `.h5` model_config (layers without "module" keys) gets its top-level
module only: Keras 3 rebuilds module-less layers itself.

Staying JSON keeps a merge of Keras 2 `.keras` files free of TensorFlow, and
its output config is one Keras 3 loads with `keras.models.load_model`.
"""
from __future__ import annotations

import copy

from trainer.errors import UsageError

# Where Keras 3 keeps the model classes that Keras 2 kept in keras.src.engine.
_MODEL_MODULES = {"Functional": "keras.src.models.functional", "Sequential": "keras",
                  "Model": "keras.src.models.model"}
# Options Keras 2 layers wrote that Keras 3 layers refuse, with the only value
# Keras 3 computes with: dropping them keeps the function.
_DROPPED = {"time_major": False}


def is_keras2(config) -> bool:
    """True for a config Keras 2 wrote (a .keras, a legacy .h5 model_config):
    a model class in keras.src.engine, a `batch_input_shape` (Keras 3 writes
    `batch_shape`), or a model without a module (the legacy .h5 format)."""
    if isinstance(config, dict) and "module" not in config and config.get("class_name") in _MODEL_MODULES:
        return True
    found = False

    def visit(node):
        nonlocal found
        if found:
            return
        if isinstance(node, dict):
            module = node.get("module")
            if isinstance(module, str) and module.startswith(("keras.src.engine", "keras.engine")):
                found = True
                return
            if isinstance(node.get("config"), dict) and "batch_input_shape" in node["config"]:
                found = True
                return
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(config)
    return found


def is_legacy_h5(config) -> bool:
    """A legacy .h5 model_config (before or after `to_keras3`): its layers
    carry no "module"."""
    layers = (config.get("config") or {}).get("layers") if isinstance(config, dict) else None
    return "module" not in config if not layers else any(
        isinstance(layer, dict) and "module" not in layer for layer in layers)


def to_keras3(config: dict, where: str = "model config") -> dict:
    """A copy of `config` that Keras 3 deserializes; a Keras 3 config comes
    back unchanged. UsageError (naming `where` and the layer) for a Keras 2
    option that has no Keras 3 equivalent."""
    if not isinstance(config, dict) or not is_keras2(config):
        return config
    out = copy.deepcopy(config)
    if "module" not in out and out.get("class_name") in _MODEL_MODULES:  # legacy .h5 model_config
        out["module"] = _MODEL_MODULES[out["class_name"]]
    _entry(out, where)
    return out


def _entry(entry: dict, where: str) -> None:
    """One serialized object (a model or a layer), in place, with what it nests."""
    name = entry.get("class_name")
    module = entry.get("module")
    if isinstance(module, str) and module.startswith(("keras.src.engine", "keras.engine")):
        entry["module"] = _MODEL_MODULES.get(name, module)
    cfg = entry.get("config")
    if not isinstance(cfg, dict):
        return
    _layer_options(name, cfg, where)
    if name in _MODEL_MODULES or isinstance(cfg.get("layers"), list):  # a model, registered subclasses too
        for key in ("input_layers", "output_layers"):
            value = cfg.get(key)
            # One tensor as a list of one reference: [[name, node, index]].
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list) \
                    and len(value[0]) == 3 and isinstance(value[0][0], str):
                cfg[key] = value[0]
        for layer in cfg.get("layers") or []:
            if isinstance(layer, dict):
                _entry(layer, where)
    for value in cfg.values():  # wrappers (TimeDistributed, Bidirectional) keep their layer in the config
        if isinstance(value, dict) and "class_name" in value and isinstance(value.get("config"), dict):
            _entry(value, where)


def _layer_options(class_name, cfg: dict, where: str) -> None:
    if "batch_input_shape" in cfg:
        shape = cfg.pop("batch_input_shape")
        cfg["batch_shape" if class_name == "InputLayer" else "input_shape"] = shape
    axis = cfg.get("axis")
    if isinstance(axis, list) and len(axis) == 1:
        cfg["axis"] = int(axis[0])
    for key, value in _DROPPED.items():
        if key in cfg:
            if cfg[key] != value:
                raise UsageError(f"{where}: layer {cfg.get('name')!r} ({class_name}) uses the Keras 2 option "
                                 f"{key}={cfg[key]!r}, which Keras 3 does not have; rebuild the model in Keras 3")
            del cfg[key]
