"""export_onnx: fold, convert with tf2onnx, write atomically, verify with
onnxruntime.

tf2onnx is the established TensorFlow -> ONNX converter (Keras's own
`model.export(format="onnx")` uses it). It never emits an ONNX
BatchNormalization: it lowers normalization to Mul / Add and folds those into a
Conv only while that Conv has no bias, so trained models keep a Mul and an Add
per normalization. Folding in Keras first (`fold`) leaves nothing to lower.
"""

import collections
import contextlib
import dataclasses
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from renorm_convert.fold import fold
from renorm_convert.io import kill_point, replace_atomically


class ExportError(ValueError):
    """The model cannot be exported; the message says why and what to do."""


@dataclasses.dataclass
class ExportReport:
    """What `export_onnx` wrote and measured."""

    path: str
    opset: int
    folded: int
    unfolded: dict
    op_counts: dict
    max_abs_diff: float = None
    output_scale: float = None
    file_size: int = 0
    input_names: list = dataclasses.field(default_factory=list)
    output_names: list = dataclasses.field(default_factory=list)

    @property
    def relative_diff(self):
        if self.max_abs_diff is None:
            return None
        return self.max_abs_diff / max(self.output_scale or 0.0, 1e-12)

    def as_dict(self):
        return {**dataclasses.asdict(self), "relative_diff": self.relative_diff}


def _input_specs(model):
    specs = []
    for tensor in model.inputs:
        shape = (None,) + tuple(tensor.shape[1:])
        name = tensor._keras_history.operation.name
        specs.append(tf.TensorSpec(shape, tensor.dtype, name=name))
    return specs


def _rename(onnx_model, old, new):
    """Renames a graph value everywhere it is used."""
    if old == new:
        return
    graph = onnx_model.graph
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in list(graph.input) + list(graph.output) + list(
            graph.value_info):
        if value.name == old:
            value.name = new


def op_counts(onnx_model):
    """ONNX op type -> number of nodes."""
    return dict(sorted(collections.Counter(
        node.op_type for node in onnx_model.graph.node).items()))


def to_onnx(model, opset=None):
    """The ONNX ModelProto of `model` as it stands (no folding), with the
    Keras input and output names and a dynamic batch dimension."""
    import tf2onnx
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    specs = _input_specs(model)
    single = len(specs) == 1

    @tf.function(input_signature=specs)
    def serve(*inputs):
        outputs = model(inputs[0] if single else list(inputs), training=False)
        return outputs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        patch_tf2onnx()  # Keras's own fix for tf2onnx under NumPy 2
    _patch_transpose_optimizer()
    try:
        with _grouped_conv_as_plain_op():
            # Eager tensors a layer captured (a tf.constant made in build) are
            # not variables, so tf2onnx's freezing leaves them as graph inputs.
            captured = {
                internal.name: external
                for external, internal in serve.get_concrete_function().graph.captures
                if external.dtype != tf.resource
            }
            onnx_model = _from_function(serve, specs, opset)
    except Exception as e:
        text = " ".join(str(e).split())[:300]
        raise ExportError(
            f"tf2onnx could not convert model '{model.name}': "
            f"{type(e).__name__}: {text}. Try another --opset, or replace the "
            "layer whose op it names."
        ) from e
    _check_ops(onnx_model, model.name)
    _embed_captured(onnx_model, captured, len(specs), model.name)
    for value, spec in zip(onnx_model.graph.input, specs):
        _rename(onnx_model, value.name, spec.name)
    for value, name in zip(list(onnx_model.graph.output),
                           unique_names(output_names(model))):
        _rename(onnx_model, value.name, name)
    return onnx_model


def output_names(model):
    """The names a user knows the outputs by: the keys of a model built with
    a dict of outputs (in the sorted order TensorFlow flattens them in),
    else the names of the layers producing them."""
    struct = getattr(model, "_outputs_struct", None)  # Functional's own
    if isinstance(struct, dict) and len(struct) == len(model.outputs):
        return [str(key) for key in sorted(struct)]
    return list(model.output_names)


def unique_names(names):
    """`names` with repeats told apart: a layer that produces several model
    outputs gives `fpn`, `fpn_1`, `fpn_2`."""
    taken, result = set(names), []
    seen = collections.Counter()
    for name in names:
        seen[name] += 1
        new = name
        if seen[name] > 1:
            index = seen[name] - 1
            while f"{name}_{index}" in taken:
                index += 1
            new = f"{name}_{index}"
            taken.add(new)
        result.append(new)
    return result


def _embed_captured(onnx_model, captured, n_inputs, name):
    """Turns graph inputs that stand for captured constants into
    initializers, so the file's inputs are exactly the model's."""
    from onnx import numpy_helper

    graph = onnx_model.graph
    extra = list(graph.input)[n_inputs:]
    for value in extra:
        tensor = captured.get(value.name)
        if tensor is None:
            raise ExportError(
                f"The ONNX graph of model '{name}' has an input "
                f"'{value.name}' that is not a model input (a tensor a layer "
                "captured that tf2onnx could not embed). Make that layer "
                "create it as a non-trainable weight (add_weight) instead."
            )
        graph.initializer.append(
            numpy_helper.from_array(np.asarray(tensor), value.name))
        graph.input.remove(value)


@contextlib.contextmanager
def _grouped_conv_as_plain_op():
    """Keras's TensorFlow backend runs grouped convolutions through an
    XLA-compiled function (TensorFlow's CPU kernel lacks them), which tf2onnx
    cannot convert. While tracing for export, emit TensorFlow's plain Conv
    op instead: its graph states the groups, and tf2onnx writes an ONNX Conv
    with its `group` attribute. Only the trace uses it; nothing runs it."""
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


_TRANSPOSE_PATCHED = False


def _from_function(serve, specs, opset):
    """tf2onnx's conversion, first without its per-optimizer `deepcopy` of
    the whole graph (weights included: ResNet50 peaks at 5.5 GB with it,
    2.8 GB without), which only serves to skip an optimizer that fails; if
    one fails, converted again the careful way."""
    import gc

    import tf2onnx
    from tf2onnx import constants

    key = constants.ENV_TF2ONNX_CATCH_ERRORS
    saved = os.environ.get(key)
    try:
        os.environ[key] = "FALSE"
        try:
            return tf2onnx.convert.from_function(
                serve, input_signature=specs, opset=opset)[0]
        except Exception:
            os.environ[key] = "TRUE"
            gc.collect()
            return tf2onnx.convert.from_function(
                serve, input_signature=specs, opset=opset)[0]
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
        gc.collect()  # the optimizers' graphs hold reference cycles


def _patch_transpose_optimizer():
    """tf2onnx's transpose optimizer crashes on `Conv -> Add(scalar)` (as
    in hard-swish, `x + 3.0`: `max()` of a scalar's empty shape) and then
    gives up on the whole graph, leaving a Transpose around every layer.
    Route scalar constants to its generic broadcast handler instead."""
    global _TRANSPOSE_PATCHED
    if _TRANSPOSE_PATCHED:
        return
    from tf2onnx.optimizer import transpose_optimizer as module

    cls = module.TransposeOptimizer
    original = cls._add_handler

    def _add_handler(self, trans, node):
        second = node.inputs[1]
        if second is not None and second.is_const() and not np.shape(
                second.get_tensor_value(as_list=False)):
            return self._handle_node_having_branches(trans, node)
        return original(self, trans, node)

    cls._add_handler = _add_handler
    _patch_node_update_proto()
    _TRANSPOSE_PATCHED = True


def _patch_node_update_proto():
    """tf2onnx rewrites every node's NodeProto after each optimizer pass
    (`del attribute[:]`, then `extend`), and protobuf's upb backend frees
    removed sub-messages only with the whole message: each pass kept another
    copy of every weight tensor (ResNet50: 6 to 8 GB peak for 100 MB of
    weights). Rebuild into a fresh NodeProto, so the previous one, and its
    copies, are freed."""
    from onnx import NodeProto
    from tf2onnx.graph import Node

    original = Node.update_proto

    def update_proto(self, external_tensor_storage=None):
        old = self._op
        fresh = NodeProto(name=old.name, op_type=old.op_type,
                          domain=old.domain, doc_string=old.doc_string)
        self._op = fresh
        original(self, external_tensor_storage)

    Node.update_proto = update_proto


def _check_ops(onnx_model, name):
    """tf2onnx keeps a TensorFlow op it cannot convert as a node of that
    name, which no runtime can run: refuse the file, naming the op."""
    import onnx

    bad = [
        node for node in onnx_model.graph.node
        if not onnx.defs.has(node.op_type, node.domain)
        and node.domain in ("", "ai.onnx")
    ]
    if bad:
        ops = sorted({n.op_type for n in bad})
        where = bad[0].name.rsplit("/", 1)[0]
        raise ExportError(
            f"tf2onnx cannot convert the TensorFlow op(s) {', '.join(ops)} of "
            f"model '{name}' (first at '{where}'); replace the layer that "
            "uses it, or try another --opset."
        )


def sample_inputs(model, batch=4, seed=0):
    """Random inputs of the model's shape (every unknown size but the batch
    must be known)."""
    rng = np.random.default_rng(seed)
    xs = []
    for tensor in model.inputs:
        dims = tuple(tensor.shape[1:])
        if any(d is None for d in dims):
            raise ExportError(
                f"Input '{tensor.name}' has unknown dimensions {dims}; give "
                "the model a fixed input shape to verify it, or export with "
                "verify=False."
            )
        x = rng.normal(size=(batch,) + dims)
        xs.append(x.astype(keras.backend.standardize_dtype(tensor.dtype)))
    return xs


def run_onnx(path, inputs, optimize=True):
    """Runs an ONNX file in onnxruntime on the CPU; returns its outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(path, options,
                                   providers=["CPUExecutionProvider"])
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def export_onnx(model, path, *, opset=None, verify=True):
    """Exports `model` to ONNX with its normalization folded.

    Folds every normalization layer it can into the producing Conv / Dense
    layer (`fold`), converts with tf2onnx, keeps the input and output names,
    leaves the batch dimension dynamic, and writes `path` atomically (nothing
    is left behind on failure). With `verify`, runs the file in onnxruntime
    on random inputs and compares with the Keras model's inference output,
    before the file takes the name `path`: a file onnxruntime cannot run
    never appears there.

    Args:
        model: A Keras model (BatchNormalization or BatchRenormalization
            layers, nested models, several inputs / outputs).
        path: Where to write the `.onnx` file.
        opset: ONNX opset from `MIN_OPSET` to `MAX_OPSET` (9 to 18);
            tf2onnx's default when None.
        verify: Compare onnxruntime's output with Keras's.

    Returns:
        An `ExportReport`.

    Raises:
        ExportError: an opset out of range, a model tf2onnx cannot convert,
            or a file onnxruntime cannot run (then nothing is written).
    """
    import onnx  # noqa: F401  (fail here, clearly, if it is missing)

    check_opset(opset)
    folded = fold(model)
    onnx_model = to_onnx(folded, opset=opset)
    report = ExportReport(
        path=str(path),
        opset=int(onnx_model.opset_import[0].version),
        folded=len(folded.folded),
        unfolded=dict(folded.unfolded),
        op_counts=op_counts(onnx_model),
        input_names=[i.name for i in onnx_model.graph.input],
        output_names=[o.name for o in onnx_model.graph.output],
    )
    if verify:
        xs = sample_inputs(model)
        expected = model(xs[0] if len(xs) == 1 else xs, training=False)
        expected = [np.asarray(e) for e in keras.tree.flatten(expected)]
    payload = onnx_model.SerializeToString()

    def write_and_verify(tmp):
        # The file is checked before it takes the output's name: a file
        # that fails the check never appears at `path`.
        with open(tmp, "wb") as f:
            f.write(payload)
        report.file_size = os.path.getsize(tmp)
        if not verify:
            return
        kill_point("export-verify")
        try:
            got = run_onnx(tmp, xs)
        except Exception as e:
            text = " ".join(str(e).replace(tmp, str(path)).split())[:200]
            raise ExportError(
                f"{path}: onnxruntime cannot run the exported model "
                f"({type(e).__name__}: {text}); nothing was written. Try "
                "another opset.") from None
        report.max_abs_diff = max(
            float(np.abs(e - g).max()) for e, g in zip(expected, got))
        report.output_scale = max(float(np.abs(e).max()) for e in expected)

    replace_atomically(path, write_and_verify)
    return report


# tf2onnx 1.17 converts these opsets and onnxruntime runs what it writes;
# below 9, tf2onnx leaves variables as graph inputs (measured).
MIN_OPSET, MAX_OPSET = 9, 18


def check_opset(opset):
    """Refuses an opset outside what tf2onnx and onnxruntime support here."""
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or (
            not MIN_OPSET <= int(opset) <= MAX_OPSET):
        raise ExportError(
            f"opset={opset}: expected an ONNX opset from {MIN_OPSET} to "
            f"{MAX_OPSET} (what tf2onnx and onnxruntime support here).")
