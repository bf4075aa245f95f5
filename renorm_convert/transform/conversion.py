"""Model transforms that keep weights, in pairs of a plan (what would
change) and the transform (a new model): `convert_plan` / `convert` and
`revert_plan` / `revert` swap normalization layers; `copy_model` and
`recast` copy. Each returns a new model and leaves its input as it was;
all copy through `copying`, so each reaches every layer at any depth.
"""

import dataclasses
import re
import warnings

import keras

from renorm_convert.errors import RenormConvertError
from renorm_convert.layers import BatchRenormalization
from renorm_convert.transform.blocks import layer_paths
from renorm_convert.transform.copying import transform
from renorm_convert.transform.graph import iter_layers


@dataclasses.dataclass
class ConversionPlan:
    """The layers a transform swaps, by path (`inner/bn_3`, `block/bn` for
    a custom layer's sublayer), in graph order."""

    swapped: list

    def __len__(self):
        return len(self.swapped)

    def __iter__(self):
        return iter(self.swapped)


def _is_plain_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization) and not \
        isinstance(layer, BatchRenormalization)


def _compile(pattern, name):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as e:
        raise RenormConvertError(
            f"Expected `{name}` to be a regular expression ({e}). "
            "Received: {arg}", name, pattern) from None


def _converts(include, exclude):
    """Which layers `convert` swaps: plain BatchNormalization whose name
    matches `include` and not `exclude`."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")

    def converts(layer):
        if not _is_plain_bn(layer):
            return False
        if inc is not None and not inc.search(layer.name):
            return False
        return not (exc is not None and exc.search(layer.name))

    return converts


def _plan(model, swaps):
    return ConversionPlan([path for path, layer in layer_paths(model)
                           if swaps(layer)])


def convert_plan(model, *, include=None, exclude=None):
    """The BatchNormalization layers `convert(model, include=, exclude=)`
    swaps, as a `ConversionPlan` of their paths; nothing is copied."""
    return _plan(model, _converts(include, exclude))


def convert(model, *, include=None, exclude=None, report=False,
            **layer_options):
    """A copy of `model` with every BatchNormalization a BatchRenormalization.

    Each new layer starts from the old one's gamma, beta and moving
    statistics (see `BatchRenormalization.from_batchnorm`), so inference
    outputs are unchanged; every other layer keeps its weights, trainable flag
    and name. Layers that are already BatchRenormalization are kept as they
    are. The input model is not modified. `convert_plan` lists the layers it
    swaps.

    Args:
        model: A Keras model: Sequential, Functional (nested models, shared
            layers, several inputs and outputs), or subclassed.
        include: Regular expression; only layers whose name matches it are
            converted.
        exclude: Regular expression; layers whose name matches it are not.
        report: Deprecated: use `convert_plan(model)`. Also returns the
            plan, as `(model, plan)`.
        **layer_options: Passed to every new layer (r_max, d_max,
            renorm_momentum, microbatch_size, ...).

    Returns:
        The new `keras.Model`.

    Example:
    >>> renormed = convert(keras.applications.ResNet50(), r_max=1, d_max=0)
    """
    # Fail early, with the argument's name, on options the layer refuses.
    BatchRenormalization(**layer_options)
    converts = _converts(include, exclude)

    def swap(layer):
        if converts(layer):
            return BatchRenormalization.from_batchnorm(layer, **layer_options)
        return None

    return _with_plan(transform(model, swap), model, converts, report,
                      "convert_plan")


def revert_plan(model):
    """The BatchRenormalization layers `revert(model)` swaps back, as a
    `ConversionPlan` of their paths; nothing is copied."""
    return _plan(model, _reverts)


def _reverts(layer):
    return isinstance(layer, BatchRenormalization)


def revert(model, *, report=False):
    """A copy of `model` with every BatchRenormalization a plain
    `keras.layers.BatchNormalization` (gamma, beta and the current moving
    statistics), for people who do not have this package. `revert_plan`
    lists the layers it swaps; `report` is deprecated as in `convert`."""

    def swap(layer):
        return layer.to_batchnorm() if _reverts(layer) else None

    return _with_plan(transform(model, swap), model, _reverts, report,
                      "revert_plan")


def _with_plan(new, model, swaps, report, plan_function):
    if not report:
        return new
    warnings.warn(f"report=True is deprecated: call "
                  f"renorm_convert.{plan_function}(model) for the plan",
                  DeprecationWarning, stacklevel=3)
    return new, _plan(model, swaps)


def copy_model(model):
    """A copy of `model` with the same layers, weights and statistics
    (e.g. to re-create it inside a distribution scope)."""
    return transform(model, lambda layer: None)


def recast(model, dtype_policy):
    """A copy of `model` whose layers compute under `dtype_policy`
    (e.g. "mixed_float16"); weights and statistics stay float32."""
    try:
        policy = keras.dtype_policies.get(dtype_policy)
    except ValueError:
        raise RenormConvertError(
            "{arg}: expected a Keras dtype policy such as 'mixed_float16' "
            "or 'mixed_bfloat16'.", "dtype_policy", dtype_policy) from None

    new = copy_model(model)
    # Every layer takes the policy, the models themselves too: `compile`
    # reads the model's to add loss scaling (a LossScaleOptimizer) under
    # mixed_float16. Variables keep their float32 values and dtype.
    for layer in [new] + list(iter_layers(new)):
        if not isinstance(layer, keras.layers.InputLayer):
            layer.dtype_policy = policy
    return new
