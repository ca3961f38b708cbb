"""Structured pruning: remove whole Dense units and Conv2D filters, then slice the model.

A *unit* is an output unit of a ``Dense`` layer or an output channel (filter) of a
``Conv2D`` layer. :func:`select_units` keeps, in every prunable layer, the units
whose kernel slice has the largest L2 norm. The result can be used in two ways:

* the **masked model**: the original model with its weights multiplied by
  :func:`unit_masks` (the kernel slice and the bias entry of every removed unit
  set to zero), e.g. for fine-tuning with the pruned structure fixed; the masks
  are keyed like every variable of the project (``trainer.varnames``:
  ``dense1/kernel``);
* the **sliced model**: :func:`slice_model` builds a new, smaller model of the
  same topology (same layer names, same model name) in which every removed unit
  is physically gone -- the layer keeps an ``(M - r) x N`` kernel instead of
  ``M x N`` -- and the *next* weighted layer's input dimension is sliced to match.

In inference mode (``training=False``) both produce the same outputs, up to
float32 rounding (well within 1e-5 for ordinary models): a removed unit is a
per-channel constant up to the next weighted layer, cut out where it is zero
and folded into that layer's bias where it is not (BatchNormalization, or an
activation with ``f(0) != 0``); where it cannot be folded exactly (a following
``padding="same"`` Conv2D, or no bias) the layer is refused. The rule, and
which layers a removed unit may pass through, are in :mod:`.analysis`.
:func:`slice_checked` slices and reports the largest output difference to
the (masked) model; :func:`check_sliceable` refuses before training starts.

Supported models
----------------
Keras 3 Sequential and functional models that are a single chain: one input,
one output, every layer used once with one input tensor (no Add/Concatenate
branches, no shared layers; see trainer.graph). A Sequential model needs a
known input shape.

Only the layers a removed unit travels through -- from a pruned layer to the
next Dense/Conv2D -- must be of a type that can be sliced; every layer on no
such path (upstream of every pruned layer, or after the last pruned layer's
next weighted layer), whatever its type and whether or not it has weights, is
carried over unchanged by :func:`slice_model` (same config, same weights). So
``digits_cnn`` and ``mlp`` can be pruned everywhere; in ``cifar10_cnn`` the
dense layers ``local3``/``local4`` can be pruned (``layer_regex=r"local.*"``)
but ``conv1``/``conv2`` cannot (their units pass through the
LocalResponseNormalization layers ``norm1``/``norm2``); an LSTM followed by
Dense layers can have those Dense layers pruned. Refusals are
:class:`~trainer.errors.UsageError` naming the layer in the way and the pruned
layer to exclude (``layer_regex`` or a per-layer fraction dict).

The model's *output layer* is its last Dense/Conv2D layer. Its units are the
classes: it is never pruned (only its inputs are sliced).

Modules: :mod:`.kinds` (layer types and activations), :mod:`.analysis`
(the chain and the pruned paths), :mod:`.selection` (select_units,
unit_masks), :mod:`.surgery` (slice_model), :mod:`.verify`
(check_sliceable, slice_checked).
"""
from .selection import select_units, unit_masks
from .surgery import slice_model
from .verify import check_sliceable, slice_checked

__all__ = ["check_sliceable", "select_units", "slice_checked", "slice_model", "unit_masks"]
