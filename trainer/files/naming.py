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
    """Variable key (trainer.varnames) <-> Keras v3 key, for one architecture.

    From a live model (the trainer's, for --init) or from a model config
    (merge, when its inputs mix naming schemes), which is then built: a Keras
    3 model cannot be built without its weights, so this costs the model's
    size in memory, once.
    """

    def __init__(self, config: dict | None = None, model=None):
        if model is None:
            model = _build(config)
        if config is None:
            config = serialized_config(model)
        from trainer.varnames import key_map
        names = KerasNames(config)
        variable_key = key_map(model.weights)
        self.var_of: dict[str, str] = {}     # keras key -> variable key
        self.h5_of: dict[str, str] = {}      # keras key -> h5 dataset path
        for path, var in h5_variables(model):
            key = names.key(path)
            if key is not None and id(var) in variable_key:
                self.var_of[key] = variable_key[id(var)]
                self.h5_of[key] = path
        self.key_of = {v: k for k, v in self.var_of.items()}


def h5_variables(model) -> list[tuple[str, object]]:
    """(h5 dataset path, variable) for every variable Keras's saving_lib would
    write for `model`, in its order.

    Asked of Keras itself, by handing its own walk (saving_lib._save_state) a
    store that records instead of writing: the paths are then exactly those
    of the installed Keras, with nothing restated here.
    """
    from keras.src.saving import saving_lib

    class Recorder(saving_lib.NpzIOStore):
        def __init__(self):  # noqa: D401  (no file: only records)
            self.contents = {}

        def make(self, path, metadata=None):
            return self.contents.setdefault(path, {})

    recorder = Recorder()
    saving_lib._save_state(model, recorder, None, "", set())
    return [(f"{path}/vars/{i}" if path else f"vars/{i}", v)
            for path, entry in recorder.contents.items() for i, v in entry.items()]


def serialized_config(model) -> dict:
    """The config a .keras file of `model` carries (config.json)."""
    import keras
    return json.loads(json.dumps(keras.saving.serialize_keras_object(model)))


def _build(config: dict):
    import keras

    import trainer.models  # noqa: F401  registers the trainer's custom layers
    config = {**config, "compile_config": None}
    return keras.saving.deserialize_keras_object(config, safe_mode=True)


def config_from_model_cfg(model_cfg: dict) -> dict:
    """The Keras v3 config of a trainer model, from its manifest entry."""
    from trainer.models import build_model
    model = build_model(model_cfg["name"], tuple(model_cfg["input_shape"]), model_cfg["num_classes"],
                        **(model_cfg.get("options") or {}))
    return serialized_config(model)
