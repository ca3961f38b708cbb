"""Model registry: every model is a functional ``keras.Model`` (Keras 3) that outputs logits.

``build_model(name, input_shape, num_classes, **options)`` builds either a model
from the registry ``MODELS`` or, for ``name="package.module:function"``, a
user's own Keras model.

Conventions shared by every registry model:

* The input layer is ``keras.Input(shape=input_shape, name="input")``.
* The last layer is a linear ``Dense(num_classes, name="logits")``: no softmax,
  train with ``from_logits=True``.
* Every layer has an explicit, deterministic name, so two models built from the
  same name and options have the same weight names and their weights can be
  matched by name (model averaging, checkpoint restore, broadcast).
* Options that do not apply to a model are ignored here (``python -m trainer``
  refuses a nonzero rate flag for such a model: ``check_options``). Known options:
  ``dropout`` (float, 0.0), ``recurrent_dropout`` (float, 0.0),
  ``stateful`` (bool, False) and ``batch_size`` (int, required if stateful).
"""

from __future__ import annotations

import importlib
import inspect
import numbers
from typing import Callable

import keras
import tensorflow as tf

from trainer.errors import UsageError, one_line

__all__ = [
    "LocalResponseNormalization",
    "MODELS",
    "build_model",
    "is_stateful",
    "model_names",
    "reset_stateful",
]


# --------------------------------------------------------------------------
# Custom layer
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="trainer")
class LocalResponseNormalization(keras.layers.Layer):
    """``tf.nn.local_response_normalization`` as a serializable Keras layer.

    Defaults are those of TensorFlow's CIFAR-10 tutorial (``norm1``/``norm2``).
    Registered as ``trainer>LocalResponseNormalization`` so that a ``.keras``
    file loads with plain ``keras.models.load_model`` once ``trainer.models``
    is imported (Keras 3 imports no module a file names, other than its own;
    no Lambda layer, so safe mode works).
    """

    def __init__(self, depth_radius=4, bias=1.0, alpha=0.001 / 9.0, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        self.depth_radius = int(depth_radius)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs):
        return tf.nn.local_response_normalization(
            inputs,
            depth_radius=self.depth_radius,
            bias=self.bias,
            alpha=self.alpha,
            beta=self.beta,
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            depth_radius=self.depth_radius,
            bias=self.bias,
            alpha=self.alpha,
            beta=self.beta,
        )
        return config


# --------------------------------------------------------------------------
# Option handling
# --------------------------------------------------------------------------


def _rate(options, key):
    value = options.get(key, 0.0)
    if value is None:
        return 0.0
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise UsageError(f"{key} must be in [0, 1), got {value}")
    return value


def _batch_size_for(options, model_name):
    """The fixed batch size of the Input layer: None unless stateful."""
    if not options.get("stateful", False):
        return None
    batch_size = options.get("batch_size")
    if batch_size is None:
        raise UsageError(
            f"stateful {model_name} needs a fixed batch size: pass batch_size "
            "(every batch must then have exactly that many examples)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if tf.distribute.has_strategy():
        # Keras 3 builds it, but the state is one variable mirrored over the
        # replicas while each replica feeds other sequences: their states
        # would be mixed. Refused rather than silently wrong.
        raise UsageError(
            f"stateful {model_name} cannot run under tf.distribute (its state would be shared by "
            "replicas that see different sequences): "
            "use the Horovod backend or drop stateful"
        )
    return batch_size


def _check_shape(input_shape, model_name, ranks, hint=""):
    shape = tuple(input_shape)
    if len(shape) not in ranks or any(
        not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape
    ):
        want = " or ".join(f"rank {r}" for r in sorted(ranks))
        raise UsageError(
            f"{model_name} needs an input shape of {want} with positive sizes, "
            f"got {shape}{hint}"
        )
    return shape


def _logits(x, num_classes, **kwargs):
    return keras.layers.Dense(num_classes, name="logits", **kwargs)(x)


# --------------------------------------------------------------------------
# Registry models
# --------------------------------------------------------------------------


def digits_cnn(input_shape, num_classes, **options):
    """Small CNN for 8x8x1 digits. No BatchNorm/Dropout: training is deterministic."""
    shape = _check_shape(input_shape, "digits_cnn", {3}, " (H, W, C), e.g. (8, 8, 1)")
    if min(shape[:2]) < 3:
        raise UsageError(f"digits_cnn needs images of at least 3x3 pixels, got input shape {shape}")
    inputs = keras.Input(shape=shape, name="input")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    # conv2 is VALID (8x8 -> 6x6): fewer dense weights, and it trains faster and
    # more reliably on digits than a SAME conv2.
    x = keras.layers.Conv2D(64, 3, padding="valid", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool1")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="dense1")(x)
    return keras.Model(inputs, _logits(x, num_classes), name="digits_cnn")


def cifar10_cnn(input_shape, num_classes, **options):
    """The network of TensorFlow's classic CIFAR-10 tutorial (cifar10.py ``inference``).

    conv1 -> pool1 -> norm1 -> conv2 -> norm2 -> pool2 -> local3 -> local4 -> logits,
    with the tutorial's initializers. The tutorial's L2 weight decay on
    local3/local4 (0.004) is a training choice and is not added here.
    """
    shape = _check_shape(input_shape, "cifar10_cnn", {3}, " (H, W, C), e.g. (32, 32, 3)")
    tn = keras.initializers.TruncatedNormal
    const = keras.initializers.Constant
    inputs = keras.Input(shape=shape, name="input")
    x = keras.layers.Conv2D(
        64, 5, padding="same", activation="relu", name="conv1",
        kernel_initializer=tn(stddev=5e-2), bias_initializer=const(0.0),
    )(inputs)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    x = LocalResponseNormalization(4, bias=1.0, alpha=0.001 / 9.0, beta=0.75, name="norm1")(x)
    x = keras.layers.Conv2D(
        64, 5, padding="same", activation="relu", name="conv2",
        kernel_initializer=tn(stddev=5e-2), bias_initializer=const(0.1),
    )(x)
    x = LocalResponseNormalization(4, bias=1.0, alpha=0.001 / 9.0, beta=0.75, name="norm2")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(
        384, activation="relu", name="local3",
        kernel_initializer=tn(stddev=0.04), bias_initializer=const(0.1),
    )(x)
    x = keras.layers.Dense(
        192, activation="relu", name="local4",
        kernel_initializer=tn(stddev=0.04), bias_initializer=const(0.1),
    )(x)
    logits = _logits(
        x, num_classes, kernel_initializer=tn(stddev=1 / 192.0), bias_initializer=const(0.0)
    )
    return keras.Model(inputs, logits, name="cifar10_cnn")


def mlp(input_shape, num_classes, **options):
    """Flatten, dense 256 relu, dense 128 relu, logits; ``dropout`` after each hidden layer."""
    shape = _check_shape(input_shape, "mlp", {1, 2, 3, 4, 5})
    dropout = _rate(options, "dropout")
    inputs = keras.Input(shape=shape, name="input")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(256, activation="relu", name="dense1")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout1")(x)
    x = keras.layers.Dense(128, activation="relu", name="dense2")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout2")(x)
    return keras.Model(inputs, _logits(x, num_classes), name="mlp")


def _lstm(x, options, units=64):
    """LSTM(units) on a (batch, T, F) tensor, with variational dropout.

    Variational dropout (Gal & Ghahramani, 2016) draws ONE mask per sequence
    and reuses it at every time step. Keras 3 does so on both of its LSTM
    paths; Keras 2's fused path (taken whenever recurrent_dropout == 0) drew a
    fresh mask per step (tensorflow/tensorflow#40215). The input dropout is
    therefore a Dropout layer of our own with noise_shape (batch, 1, F): one
    mask per sequence, broadcast over time, by construction rather than by a
    Keras code path, and visible to a test. It has no weights, so weight names
    are the same either way. Recurrent dropout stays inside the cell.
    """
    dropout = _rate(options, "dropout")
    recurrent_dropout = _rate(options, "recurrent_dropout")
    stateful = bool(options.get("stateful", False))
    if dropout > 0 and recurrent_dropout == 0:
        features = x.shape[-1]
        x = keras.layers.Dropout(
            dropout, noise_shape=(None, 1, features), name="lstm_input_dropout"
        )(x)
        dropout = 0.0
    return keras.layers.LSTM(
        units,
        dropout=dropout,
        recurrent_dropout=recurrent_dropout,
        stateful=stateful,
        name="lstm",
    )(x)


def lstm(input_shape, num_classes, **options):
    """Sequence classifier: LSTM(64) over (T, F); an (H, W, C) image is read row by row."""
    shape = _check_shape(
        input_shape, "lstm", {2, 3}, " ((T, F) sequences, or (H, W, C) images read row by row)"
    )
    batch_size = _batch_size_for(options, "lstm")
    inputs = keras.Input(shape=shape, batch_size=batch_size, name="input")
    x = inputs
    if len(shape) == 3:
        h, w, c = shape
        # Rows are time steps, each row's pixels (and channels) are the features.
        x = keras.layers.Reshape((h, w * c), name="to_sequence")(x)
    x = _lstm(x, options)
    return keras.Model(inputs, _logits(x, num_classes), name="lstm")


def cnn_lstm(input_shape, num_classes, **options):
    """Per-frame CNN (in TimeDistributed) -> LSTM(64) -> logits, trained end to end.

    Input: (T, H, W, C) sequences of images.
    """
    shape = tuple(input_shape)
    if len(shape) == 3:
        raise UsageError(
            f"cnn_lstm needs (T, H, W, C) sequences of images, got input shape {shape}: "
            "use e.g. --data synthetic or an .npz of sequences"
        )
    shape = _check_shape(shape, "cnn_lstm", {4}, " (T, H, W, C)")
    batch_size = _batch_size_for(options, "cnn_lstm")

    # The per-frame CNN is its own small functional model, applied to every
    # frame with shared weights by TimeDistributed.
    frame = keras.Input(shape=shape[1:], name="frame")
    f = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="frame_conv1")(frame)
    f = keras.layers.MaxPooling2D(2, padding="same", name="frame_pool1")(f)
    f = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="frame_conv2")(f)
    f = keras.layers.MaxPooling2D(2, padding="same", name="frame_pool2")(f)
    f = keras.layers.Flatten(name="frame_flatten")(f)
    f = keras.layers.Dense(64, activation="relu", name="frame_dense")(f)
    frame_cnn = keras.Model(frame, f, name="frame_cnn")

    inputs = keras.Input(shape=shape, batch_size=batch_size, name="input")
    x = keras.layers.TimeDistributed(frame_cnn, name="frame_cnn_td")(inputs)
    x = _lstm(x, options)
    return keras.Model(inputs, _logits(x, num_classes), name="cnn_lstm")


MODELS: dict[str, Callable[..., keras.Model]] = {
    "digits_cnn": digits_cnn,
    "cifar10_cnn": cifar10_cnn,
    "mlp": mlp,
    "lstm": lstm,
    "cnn_lstm": cnn_lstm,
}


def model_names() -> list[str]:
    """The registry names, sorted."""
    return sorted(MODELS)


# The options each registry model reads; the rest it ignores.
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits_cnn": (),
    "cifar10_cnn": (),
    "mlp": ("dropout",),
    "lstm": ("dropout", "recurrent_dropout", "stateful", "batch_size"),
    "cnn_lstm": ("dropout", "recurrent_dropout", "stateful", "batch_size"),
}


def check_options(name: str, options: dict) -> None:
    """UsageError for a rate flag (--dropout, --recurrent-dropout) set on a
    model that would ignore it: the run would train without dropout while
    its manifest records the rate."""
    given = {k: v for k, v in options.items() if v}
    if not given:
        return
    name = name.strip()
    if ":" in name:
        accepted = set(_accepted_options(_user_function(name), given))
    elif name in MODEL_OPTIONS:
        accepted = set(MODEL_OPTIONS[name])
    else:
        return  # an unknown name is refused when it is built, with the list of names
    for key in given:
        if key not in accepted:
            flag = "--" + key.replace("_", "-")
            why = (f"its function takes no {key} argument" if ":" in name
                   else f"it has no {key.replace('_', ' ')}")
            takers = ", ".join(m for m, keys in MODEL_OPTIONS.items() if key in keys)
            raise UsageError(f"{flag} does not apply to model {name} ({why}); drop {flag}, or pick a model "
                             f"that takes it: {takers}, or a function of yours with a {key} argument")


# --------------------------------------------------------------------------
# build_model
# --------------------------------------------------------------------------


def _choices():
    return (
        f"choose one of {', '.join(model_names())}, "
        "or package.module:function for your own Keras model"
    )



def _accepted_options(function, options):
    """The options ``function`` can take: all if it has **kwargs, else the named ones."""
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return dict(options)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(options)
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in options.items() if k in names}


def _build_user_model(name, input_shape, num_classes, options):
    function = _user_function(name)
    module_name, _, function_name = name.partition(":")
    module_name, function_name = module_name.strip(), function_name.strip()
    # Options the user's function does not declare are ignored, as for registry models.
    model = function(input_shape, num_classes, **_accepted_options(function, options))
    if not isinstance(model, keras.Model):
        raise UsageError(
            f"model {name!r}: {module_name}.{function_name}(input_shape, num_classes, ...) "
            f"returned {type(model).__name__}, not a keras.Model; {_choices()}"
        )
    return _canonical_paths(model)


def _user_function(name):
    """The callable `package.module:function` names; UsageError if there is none."""
    module_name, _, function_name = name.partition(":")
    module_name, function_name = module_name.strip(), function_name.strip()
    if not module_name or not function_name or ":" in function_name:
        raise UsageError(
            f"bad model {name!r}: expected package.module:function; {_choices()}"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while importing it
        raise UsageError(
            f"model {name!r}: cannot import module {module_name!r} ({one_line(exc, limit=None)}); "
            f"{_choices()}"
        ) from None
    function = getattr(module, function_name, None)
    if function is None:
        raise UsageError(
            f"model {name!r}: module {module_name!r} has no attribute {function_name!r}; "
            f"{_choices()}"
        )
    if not callable(function):
        raise UsageError(
            f"model {name!r}: {module_name}.{function_name} is not callable; {_choices()}"
        )
    return function


def _canonical_paths(model):
    """A Sequential built in memory names its variables under its own name
    (``seq/dense/kernel``); the same model loaded from its .keras file does
    not (``dense/kernel``). Checkpoints and merges key variables by path, so
    such a model is rebuilt from its config, as loading would. Initial
    weights come from the seeded generator either way, the same on every
    process. A model whose config Keras cannot rebuild is kept as it is."""
    if not isinstance(model, keras.Sequential) or not any(
            w.path.startswith(f"{model.name}/") for w in model.weights):
        return model
    try:
        return keras.Sequential.from_config(model.get_config())
    except Exception:  # unregistered custom layers: keep the user's object
        return model


def build_model(name: str, input_shape: tuple, num_classes: int, **options) -> keras.Model:
    """Build model ``name`` for inputs of ``input_shape`` (no batch dim) and ``num_classes``.

    ``name`` is a key of ``MODELS`` or ``package.module:function``; the latter is
    called as ``function(input_shape, num_classes, **options)`` and must return a
    ``keras.Model``. Raises ``UsageError`` for anything the user can fix.
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"no model name given; {_choices()}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        input_shape = tuple(
            int(d) if hasattr(d, "__index__") and not isinstance(d, bool) else d
            for d in input_shape
        )
    except TypeError:
        raise UsageError(f"input_shape must be a tuple of sizes, got {input_shape!r}") from None
    name = name.strip()
    if ":" in name:
        return _build_user_model(name, input_shape, num_classes, options)
    builder = MODELS.get(name)
    if builder is None:
        raise UsageError(f"unknown model {name!r}; {_choices()}")
    return builder(input_shape, num_classes, **options)


# --------------------------------------------------------------------------
# Stateful RNNs
# --------------------------------------------------------------------------


def walk_layers(layer):
    """Every layer inside ``layer``, recursing into nested models and wrappers."""
    if isinstance(layer, keras.Model):
        for sub in layer.layers:
            yield from walk_layers(sub)
        return
    yield layer
    if isinstance(layer, keras.layers.Bidirectional):
        yield from walk_layers(layer.forward_layer)
        yield from walk_layers(layer.backward_layer)
    elif isinstance(layer, keras.layers.Wrapper):
        yield from walk_layers(layer.layer)


def _stateful_layers(model):
    return [
        layer
        for layer in walk_layers(model)
        if getattr(layer, "stateful", False) is True and hasattr(layer, "reset_states")
    ]


def is_stateful(model) -> bool:
    """True if ``model`` contains a stateful RNN layer (at any nesting depth)."""
    return bool(_stateful_layers(model))


def reset_stateful(model) -> None:
    """Reset (to zeros) the states of every stateful RNN layer in ``model``; no-op if none."""
    for layer in _stateful_layers(model):
        layer.reset_states()
