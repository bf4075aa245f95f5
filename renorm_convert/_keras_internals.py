"""Every use of private Keras / TensorFlow API, each with why.

`tests/test_layers.py::test_private_hooks_exist` fails naming the hook when a
new version drops one.
"""


def in_xla_compilation():
    """Whether the function being traced will be compiled by XLA
    (`tf.function(jit_compile=True)`, Keras's `jit_compile=True`).

    Why: XLA compiles both branches of a `tf.cond` for the batch's actual
    size, and cannot take the gradient of a branch whose slices depend on
    shapes computed in the forward pass; `BatchRenormalization` then takes a
    path without `tf.cond` (XLA knows every shape when it compiles, so
    the cond is not needed there). TensorFlow marks such traces with an
    `XLAControlFlowContext` and has no public way to ask. If the hook is
    gone, this answers True: the path taken is then correct everywhere, only
    slower without XLA.
    """
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return True
    check = getattr(control_flow_util, "GraphOrParentsInXlaContext", None)
    if check is None:
        return True
    return bool(check(ops.get_default_graph()))


def flatten_layers(layer, include_self=False, recursive=True):
    """Every layer tracked by `layer` (nested models and the sublayers of
    custom layers too, each once), in Keras's tracking order.

    Why: Keras 3 has no public recursive iteration (`Model.layers` lists the
    top level only; `Layer._flatten_layers` is what Keras's own
    `summary`, `weights` and saving use). Without it, conversion and the
    schedule would miss the normalization layers inside nested models and
    custom blocks.
    """
    return list(layer._flatten_layers(include_self=include_self,
                                      recursive=recursive))
