"""Weights by name: a layer's values read by their short names, and a
layer built with each named weight created directly from a value. The
primitives the layer (`from_batchnorm`, `to_batchnorm`) and every
transform (`transform.weights`) move weights with; public Keras API only."""

import numpy as np
from keras import ops


def short_name(variable):
    """A variable's name within its layer ("kernel", "moving_mean")."""
    return variable.path.split("/")[-1]


def values_by_name(variables):
    """{short name ("kernel", "moving_mean", ...): numpy value}; weights move
    between layers by these names, never by position."""
    return {short_name(v): np.asarray(ops.convert_to_numpy(v))
            for v in variables}


def build_with_values(layer, input_shape, values, build=None):
    """Builds `layer` with each weight named in `values` created directly
    with that value: weights move by name, and no initializer runs and no
    assignment follows (this is most of the cost of converting a model).
    `build` (no arguments) replaces `layer.build(input_shape)`. Returns the
    names of the weights created from `values`."""
    used = []
    add_weight = layer.add_weight

    def add_weight_with_value(*args, name=None, initializer=None, **kwargs):
        if name in values:
            value = values[name]
            used.append(name)

            def initializer(shape, dtype=None):
                return np.asarray(value, dtype=dtype or value.dtype)

        return add_weight(*args, name=name, initializer=initializer, **kwargs)

    # Bypass Layer.__setattr__ (attribute tracking) for this instance hook.
    object.__setattr__(layer, "add_weight", add_weight_with_value)
    try:
        if build is None:
            layer.build(input_shape)
        else:
            build()
    finally:
        object.__delattr__(layer, "add_weight")
    layer.built = True
    return used
