"""One name per tensor across checkpoint formats.

Two naming schemes exist and a merge uses one of them:
  * "keras": the Keras v3 format (.keras, .weights.h5) stores a layer's
    variables by position under a path built from class-name counters
    ("layers/dense_1/vars/0"), which depends on layer order. We rename those
    paths with the layer names from the model config: "dense2/0". Layers are
    thus matched by name; inside a layer, variables keep Keras's own order, as
    Keras's loader does. This needs no TensorFlow, which keeps a merge of
    .keras files small and fast.
  * "variables": TF checkpoints and legacy .h5 files name every variable
    ("dense2/kernel"). Translating between the two needs the model built, which
    `VariableLayout` does in graph mode, so no weight memory is allocated.
"""
from __future__ import annotations

import json
import re

_MODEL_CLASSES = {"Functional", "Sequential", "Model"}


def snake_case(name: str) -> str:
    # Keras's generic_utils.to_snake_case, restated because importing Keras
    # imports TensorFlow (450 MB, 3 s), which a .keras-only merge avoids.
    s = re.sub("(.)([A-Z][a-z0-9]+)", r"\1_\2", name)
    s = re.sub("([a-z])([A-Z])", r"\1_\2", s).lower()
    return s if s[0] != "_" else "private" + s


def _layers_of(config: dict) -> list[dict]:
    inner = config.get("config", {})
    return inner.get("layers", []) if isinstance(inner, dict) else []


def layer_prefixes(config: dict) -> dict[str, str]:
    """{h5 path of a layer: its name path}, nested models included.

    Keras v3 names list items by class-name counters in list order
    (saving_lib._save_container_state); we undo that with the config's names.
    """
    out: dict[str, str] = {}

    def walk(cfg, h5_prefix, name_prefix):
        counters: dict[str, int] = {}
        for layer in _layers_of(cfg):
            snake = snake_case(layer["class_name"])
            n = counters.get(snake)
            counters[snake] = 0 if n is None else n + 1
            h5 = f"{h5_prefix}layers/{snake}" + ("" if n is None else f"_{n + 1}")
            name = name_prefix + layer["config"]["name"]
            out[h5] = name
            if layer["class_name"] in _MODEL_CLASSES:
                walk(layer, h5 + "/", name + "/")
            # A wrapper (TimeDistributed, Bidirectional) keeps its inner layer
            # under the attribute its config names; a model there has its own list.
            for attr, inner in (layer.get("config") or {}).items():
                if isinstance(inner, dict) and inner.get("class_name") in _MODEL_CLASSES:
                    walk(inner, f"{h5}/{attr}/", f"{name}/{attr}/")

    walk(config, "", "")
    return out


class KerasNames:
    """h5 dataset path <-> "layer/i" key, from a Keras v3 model config."""

    def __init__(self, config: dict):
        self.prefixes = layer_prefixes(config)
        # Longest first, so a nested model's layers win over the model itself.
        self._ordered = sorted(self.prefixes, key=len, reverse=True)

    def key(self, h5_path: str) -> str | None:
        """None for what is not a layer's weight (optimizer, metrics)."""
        if not h5_path.startswith("layers/"):
            return None
        for prefix in self._ordered:
            if h5_path.startswith(prefix + "/"):
                rest = h5_path[len(prefix) + 1:]
                parts = rest.split("/")
                if len(parts) < 2 or parts[-2] != "vars":
                    return None
                middle = "/".join(parts[:-2])
                return "/".join(p for p in (self.prefixes[prefix], middle, parts[-1]) if p)
        return None

    def h5_path(self, key: str) -> str:
        """Where a key goes in a Keras v3 weights file of this architecture."""
        for h5, name in sorted(self.prefixes.items(), key=lambda item: len(item[1]), reverse=True):
            if key.startswith(name + "/"):
                *middle, index = key[len(name) + 1:].split("/")
                return "/".join([h5, *middle, "vars", index])
        raise KeyError(key)

    def groups(self) -> list[str]:
        """The per-layer groups Keras writes even for layers without weights."""
        return ["vars"] + [f"{h5}/vars" for h5 in self.prefixes]


class VariableLayout:
    """Variable name <-> Keras v3 key for one architecture (needs TensorFlow)."""

    def __init__(self, config: dict):
        import tensorflow as tf
        import trainer.models  # noqa: F401  registers the trainer's custom layers
        from keras.src.saving import saving_lib

        names = KerasNames(config)
        self.var_of: dict[str, str] = {}     # keras key -> variable name
        self.h5_of: dict[str, str] = {}      # keras key -> h5 dataset path
        with tf.Graph().as_default():
            model = tf.keras.saving.deserialize_keras_object(config)
            for path, var in _h5_variables(model, saving_lib):
                key = names.key(path)
                if key is not None:
                    self.var_of[key] = var.name.split(":")[0]
                    self.h5_of[key] = path
        self.key_of = {v: k for k, v in self.var_of.items()}


def _h5_variables(model, saving_lib):
    """(h5 dataset path, variable) in the order Keras's saving_lib writes them.

    saving_lib has no public way to list paths without writing values, and in
    graph mode there are no values; this follows _save_state's walk."""
    seen: set[int] = set()

    def walk(obj, path):
        if id(obj) in seen:
            return
        if hasattr(obj, "save_own_variables"):
            own = list(getattr(obj, "_trainable_weights", [])) + list(getattr(obj, "_non_trainable_weights", []))
            for i, v in enumerate(own):
                yield f"{path}/vars/{i}" if path else f"vars/{i}", v
        seen.add(id(obj))
        for attr, child in saving_lib._walk_trackable(obj):
            sub = f"{path}/{attr}" if path else attr
            if saving_lib._is_keras_trackable(child):
                yield from walk(child, sub)
            elif isinstance(child, (list, dict, tuple, set)):
                items = list(child.values()) if isinstance(child, dict) else list(child)
                used: dict[str, int] = {}
                for item in items:
                    if not saving_lib._is_keras_trackable(item) or id(item) in seen:
                        continue
                    name = snake_case(item.__class__.__name__)
                    if name in used:
                        used[name] += 1
                        name = f"{name}_{used[name]}"
                    else:
                        used[name] = 0
                    yield from walk(item, f"{sub}/{name}")

    yield from walk(model, "")


def config_from_model_cfg(model_cfg: dict) -> dict:
    """The Keras v3 config of a trainer model, built in graph mode (no weights)."""
    import tensorflow as tf
    from keras.src.saving import saving_lib, serialization_lib

    from trainer.models import build_model
    with tf.Graph().as_default():
        model = build_model(model_cfg["name"], tuple(model_cfg["input_shape"]), model_cfg["num_classes"],
                            **(model_cfg.get("options") or {}))
        # model.save serializes with this flag set; we do the same so the
        # config is the one a .keras file would carry.
        previous = getattr(saving_lib._SAVING_V3_ENABLED, "value", False)
        saving_lib._SAVING_V3_ENABLED.value = True
        try:
            return json.loads(json.dumps(serialization_lib.serialize_keras_object(model)))
        finally:
            saving_lib._SAVING_V3_ENABLED.value = previous
