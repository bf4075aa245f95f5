"""The private TensorFlow and tf2onnx hooks (and Keras's TensorFlow
backend's), each with why: ONNX export, deterministic TensorFlow kernels.

Part of the one door to private API (`_internal.keras_hooks` re-exports these
names, so callers use that module). Nothing heavy is imported at module
level: every import happens inside the function that needs it, so this
module loads on every backend.
"""

import contextlib
import os

# --- TensorFlow determinism ---


def tf_op_determinism_enabled():
    """Whether TensorFlow's op determinism is on.

    Why: TensorFlow offers `tf.config.experimental.enable_op_determinism`
    but neither a public query nor a way back; `determinism.deterministic()`
    turns it on for one block and must restore the process's setting.
    Without it, one reproduction run would make every later computation of
    the process deterministic (and slower).
    """
    from tensorflow.python.framework import config

    return bool(config.is_op_determinism_enabled())


def disable_tf_op_determinism():
    """Turns TensorFlow's op determinism off again (see above)."""
    from tensorflow.python.framework import config

    config.disable_op_determinism()


# --- tf2onnx and Keras's TensorFlow backend ---


def patch_tf2onnx_for_numpy2():
    """Keras's own patch of tf2onnx for NumPy >= 2 (what Keras's
    `model.export(format="onnx")` applies first).

    Why: tf2onnx 1.17 uses `np.object` and `np.cast`, gone in NumPy 2; Keras
    ships the fix in the private `keras.src.export.tf2onnx_lib` and exposes no
    public name for it. Keras applies it once for the process (its own
    export does the same); it only restores what NumPy 1 had. Without it,
    conversion fails under NumPy 2.
    """
    import warnings

    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        patch_tf2onnx()


@contextlib.contextmanager
def tf2onnx_optimizers_fixed():
    """Within the block, tf2onnx's transpose optimizer handles scalar
    constants and its NodeProto rewriting frees what it replaces; both are
    put back on leaving.

    Why: (1) the transpose optimizer's private `_add_handler` crashes on
    `Conv -> Add(scalar)` (as in hard-swish, `x + 3.0`: `max()` of a
    scalar's empty shape) and then gives up on the whole graph, leaving a
    Transpose around every layer; scalar constants are routed to its generic
    broadcast handler (`_handle_node_having_branches`) instead. (2)
    `Node.update_proto` rewrites every node's NodeProto after each optimizer
    pass (`del attribute[:]`, then `extend`), and protobuf's upb backend
    frees removed sub-messages only with the whole message: each pass kept
    another copy of every weight tensor (ResNet50: 6 to 8 GB peak for 100 MB
    of weights); each node is rebuilt into a fresh NodeProto (the private
    `_op`), so the previous one and its copies are freed. Without these,
    MobileNetV3-style models export with a Transpose per layer, and large
    models need several times the memory. Scoped to our export: another
    user of tf2onnx in the process sees tf2onnx as it ships.
    """
    import numpy as np
    from onnx import NodeProto
    from tf2onnx.graph import Node
    from tf2onnx.optimizer import transpose_optimizer as module

    cls = module.TransposeOptimizer
    original_add = cls._add_handler
    original_update = Node.update_proto

    def _add_handler(self, trans, node):
        second = node.inputs[1]
        if second is not None and second.is_const() and not np.shape(
                second.get_tensor_value(as_list=False)):
            return self._handle_node_having_branches(trans, node)
        return original_add(self, trans, node)

    def update_proto(self, external_tensor_storage=None):
        old = self._op
        self._op = NodeProto(name=old.name, op_type=old.op_type,
                             domain=old.domain, doc_string=old.doc_string)
        original_update(self, external_tensor_storage)

    cls._add_handler = _add_handler
    Node.update_proto = update_proto
    try:
        yield
    finally:
        cls._add_handler = original_add
        Node.update_proto = original_update


def tf2onnx_from_function(function, input_signature, opset):
    """tf2onnx's conversion of a `tf.function` to an ONNX ModelProto, first
    without its per-optimizer `deepcopy` of the whole graph; if an optimizer
    fails, converted again the careful way.

    Why: tf2onnx copies the graph (weights included) before each optimizer,
    only to skip an optimizer that fails, unless its internal switch
    `TF2ONNX_CATCH_ERRORS` (an environment variable its conversion reads) is
    set: ResNet50 peaks at 5.5 GB with the copies, 2.8 GB without. tf2onnx
    1.17 reads only whether the variable is set (it compares the constant's
    own name, not its value, with "TRUE"), so the careful retry runs with
    it unset. Without this, export works but needs twice the memory.
    """
    import gc

    import tf2onnx
    from tf2onnx import constants

    key = constants.ENV_TF2ONNX_CATCH_ERRORS
    saved = os.environ.get(key)
    try:
        os.environ[key] = "FALSE"
        try:
            return tf2onnx.convert.from_function(
                function, input_signature=input_signature, opset=opset)[0]
        except Exception:
            os.environ.pop(key, None)  # unset: tf2onnx catches errors
            gc.collect()
            return tf2onnx.convert.from_function(
                function, input_signature=input_signature, opset=opset)[0]
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
        gc.collect()  # the optimizers' graphs hold reference cycles


@contextlib.contextmanager
def grouped_conv_as_plain_op():
    """While tracing for export, grouped convolutions (`Conv2D(groups>1)`)
    emit TensorFlow's plain Conv op.

    Why: Keras's TensorFlow backend runs grouped convolutions through an
    XLA-compiled function (TensorFlow's CPU kernel lacks them), which
    tf2onnx cannot convert (and Keras's own ONNX export writes a file that
    does not run). The backend's `conv` lives in the private
    `keras.src.backend.tensorflow.nn`, with the private
    `_convert_data_format`; `tf.nn.convolution` states the groups in its
    graph, and tf2onnx writes an ONNX Conv with its `group` attribute. Only
    the trace uses it; nothing runs it. Without it, models with grouped
    convolutions cannot be exported.
    """
    import keras
    import tensorflow as tf
    from keras.src.backend.tensorflow import nn as tf_nn

    original = tf_nn.conv

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None,
             dilation_rate=1):
        fmt = data_format or keras.config.image_data_format()
        channels = inputs.shape[-1 if fmt == "channels_last" else 1]
        if channels == kernel.shape[-2] or len(inputs.shape) == 5:
            return original(inputs, kernel, strides, padding, data_format,
                            dilation_rate)
        return tf.nn.convolution(
            inputs, kernel, strides, padding.upper(),
            data_format=tf_nn._convert_data_format(fmt, len(inputs.shape)),
            dilations=dilation_rate)

    tf_nn.conv = conv
    try:
        yield
    finally:
        tf_nn.conv = original
