"""One name per tensor across checkpoint formats.

Two naming schemes exist and a merge uses one of them:
  * "keras": the Keras v3 format (.keras, .weights.h5; Keras 2 and 3 write the
    same layout) stores a layer's variables by position under a path built
    from class-name counters ("layers/dense_1/vars/0"), which depends on layer
    order. We rename those paths with the layer names from the model config:
    "dense2/0"; inside a layer, variables keep Keras's own order, as Keras's
    loader does. This needs no TensorFlow, which keeps a merge of .keras files
    small and fast. (Layers whose names differ between inputs are paired by
    their place in the graph: trainer.files.topology.)
  * "variables": TF checkpoints and legacy .h5 files name every variable
    ("dense2/kernel"). Translating between the two needs the model built
    (`VariableLayout`).
"""
from __future__ import annotations

import contextlib
import json
import re

from trainer.errors import UsageError, one_line

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
            with shapes_only():
                model = model_from_config(config)
        # The config as Keras 3 writes it today (same layers, same order, so
        # the same keys), for outputs of a config Keras 2 or a legacy .h5 wrote.
        self.config = serialized_config(model)
        if config is None:
            config = self.config
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


def model_from_config(config: dict, where: str = "model config"):
    """The Keras model a config describes (Keras 2 configs translated), built
    in safe mode and without its compile state; UsageError naming `where` if
    Keras cannot build it."""
    import keras

    import trainer.models  # noqa: F401  registers the trainer's custom layers
    from .archive import check_config
    from .keras2 import is_legacy_h5, to_keras3
    check_config(config, where)  # every config from a file passes here before Keras sees it
    legacy = is_legacy_h5(config)
    try:
        model = _deserialize(to_keras3(config, where))
        if legacy:
            # Keras builds a legacy config's nested models with their own name
            # in every variable path ("inner/dense/kernel"), a .keras config's
            # without ("dense/kernel", the key checkpoints and merges use):
            # once more from the model's own, current config.
            model = _deserialize(keras.saving.serialize_keras_object(model))
    except UsageError:
        raise
    except Exception as e:  # Keras reports a bad config in many types
        raise UsageError(f"{where}: Keras cannot rebuild the model ({one_line(e, typed=False)})") from None
    if not isinstance(model, keras.Model):
        raise UsageError(f"{where}: describes a {type(model).__name__}, not a Keras model")
    return model


def _deserialize(config: dict):
    import keras
    # A copy: Keras's deserialization empties the dicts it is given.
    config = json.loads(json.dumps({**config, "compile_config": None}))
    return keras.saving.deserialize_keras_object(config, safe_mode=True)



def registry_model(model_cfg, where: str):
    """The trainer model a manifest records (`model`: name, input_shape,
    num_classes, options), rebuilt from the registry. A user model
    (`package.module:function`) is refused: a file must not choose which
    module this process imports."""
    from trainer.models import build_model

    from .recorded import recorded_model
    cfg = recorded_model(model_cfg, where)
    if cfg["input_shape"] is None or cfg["num_classes"] is None:
        raise UsageError(f"{where}: its manifest records no input_shape or num_classes; "
                         "give the run's .keras file")
    try:
        return build_model(cfg["name"], tuple(cfg["input_shape"]), cfg["num_classes"], **cfg["options"])
    except UsageError as e:
        raise UsageError(f"{where}: cannot rebuild its model: {e}") from None
    except Exception as e:  # options the builder does not take, sizes it cannot allocate (TF's errors)
        raise UsageError(f"{where}: cannot rebuild its model {cfg['name']!r} ({one_line(e, typed=False)})") from None


def config_from_model_cfg(model_cfg: dict, where: str = "run") -> dict:
    """The Keras v3 config of a trainer model, from its manifest entry."""
    with shapes_only():
        return serialized_config(registry_model(model_cfg, where))


@contextlib.contextmanager
def shapes_only():
    """Models built inside have variables with shapes and paths but no
    values: Keras defers a variable's initialization in a stateless scope.
    Naming needs no more, and a config from another machine may describe a
    model far larger than its file (a Dense of a million units is 4 GB)."""
    import keras
    from keras.src.backend.common import global_state
    # Keras keeps deferred variables in a global list and initializes them all
    # when the next stateless scope closes; these are never to be initialized.
    pending = list(global_state.get_global_attribute("uninitialized_variables", [], set_to_default=True))
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
    finally:
        global_state.set_global_attribute("uninitialized_variables", pending)
