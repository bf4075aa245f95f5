"""The one backend-specific step of export: a (folded) Keras model to an
ONNX ModelProto, by the converter of the Keras backend it runs on.

- TensorFlow: tf2onnx, from a `tf.function` of the model.
- PyTorch: torch.onnx's dynamo exporter (`torch.export`, then onnxscript),
  with a dynamic batch dimension; never the deprecated TorchScript
  exporter, which Keras's own `model.export(format="onnx")` falls back to
  for a dynamic batch (float Casts between each Conv and its bias, outputs
  named by number).
- JAX: none here; `export_onnx` says how to export the same `.keras` file
  on PyTorch or TensorFlow (README, "Export on JAX", has the measurements
  behind that choice).

Every converter's graph leaves here with the model's input and output
names (unique ones: a layer giving several outputs names them `fpn`,
`fpn_1`) and a dynamic batch dimension (or the fixed one asked for), and
only with ops a runtime knows; what follows (constant folding, Transposes,
folding per-channel ops, verification) is the same for all.
"""

import collections
import contextlib
import importlib.util
import logging
import warnings

import numpy as np

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.errors import BackendError, ExportError

__all__ = ["to_onnx", "exporter", "input_names", "output_names",
           "unique_names", "check_backend"]

_OPSET_FIX = ("opset", None, "opset=")


def _backend():
    import keras

    return keras.backend.backend()


def check_backend(backend=None):
    """Refuses, in one line, a backend without an exporter, or whose
    exporter is not installed (`backend` named: without loading Keras)."""
    backend = backend or _backend()
    if backend == "tensorflow":
        if importlib.util.find_spec("tf2onnx") is None:
            raise BackendError(
                "ONNX export on TensorFlow needs tf2onnx; install it (pip "
                "install tf2onnx, or renorm_convert[tensorflow]).")
    elif backend == "torch":
        if importlib.util.find_spec("onnxscript") is None:
            raise BackendError(
                "ONNX export on PyTorch needs onnxscript (torch.onnx's "
                "dynamo exporter writes with it); install it (pip install "
                "onnxscript, or renorm_convert[torch]).")
    else:
        raise BackendError(
            f"ONNX export runs on Keras's TensorFlow and PyTorch backends; "
            f"this one is {backend}. .keras files load on every backend: "
            "save the model and export that file with KERAS_BACKEND=torch "
            "(pip install renorm_convert[torch]) or KERAS_BACKEND="
            "tensorflow.")


# torch.onnx's dynamo exporter writes opset 18 and above: asked for less, it
# writes 18 anyway (onnx's version converter cannot take its graphs lower:
# no Relu adapter below 14, ReduceMean's attributes above 17).
TORCH_MIN_OPSET = 18


def check_opset(opset, backend=None):
    """Refuses an opset the backend's exporter cannot write (`backend`
    named: without loading Keras); the range itself is `export.check_opset`'s."""
    backend = backend or _backend()
    if opset is not None and backend == "torch" and (
            not isinstance(opset, bool) and isinstance(opset, int)
            and opset < TORCH_MIN_OPSET):
        raise ExportError(
            f"{{arg}}: PyTorch's dynamo exporter writes opset "
            f"{TORCH_MIN_OPSET} and above; use {{fix}}, or export the same "
            ".keras file with KERAS_BACKEND=tensorflow (tf2onnx writes "
            "opsets 9 to 18).", "opset", opset,
            fix=("opset", TORCH_MIN_OPSET))


def exporter(backend=None):
    """The converter the backend exports with, and its version, in words."""
    from importlib.metadata import version

    backend = backend or _backend()
    if backend == "tensorflow":
        return f"tf2onnx {version('tf2onnx')}"
    if backend == "torch":
        return (f"torch.onnx dynamo exporter (torch {version('torch')}, "
                f"onnxscript {version('onnxscript')})")
    return "none"


def to_onnx(model, opset=None, batch_size=None, names_from=None):
    """The ONNX ModelProto of `model` as it stands (no folding), converted
    by its backend's exporter, with the Keras input and output names (of
    `names_from`, the model `model` was folded from: folding a final
    normalization into the Dense before it would name the output after
    the Dense) and a dynamic batch dimension (or a fixed one of
    `batch_size`)."""
    import onnx  # noqa: F401  (fail here, clearly, if it is missing)

    backend = _backend()
    check_backend(backend)
    convert = {"tensorflow": _tensorflow, "torch": _torch}[backend]
    onnx_model = convert(model, opset, batch_size)
    _check_ops(onnx_model, model.name)
    named = names_from if names_from is not None else model
    rename_values(onnx_model, [i.name for i in onnx_model.graph.input],
                  input_names(named))
    rename_values(onnx_model, [o.name for o in onnx_model.graph.output],
                  unique_names(output_names(named)))
    return onnx_model


# --- names -------------------------------------------------------------------

def input_names(model):
    """The names of the model's input layers, in order."""
    return [internals.producing_operation(t).name for t in model.inputs]


def output_names(model):
    """The names a user knows the outputs by: the keys of a model built with
    a dict of outputs (in the sorted order they are flattened in), else the
    names of the layers producing them."""
    struct = internals.outputs_structure(model)
    if isinstance(struct, dict) and len(struct) == len(model.outputs):
        return [str(key) for key in sorted(struct)]
    return [internals.producing_operation(t).name for t in model.outputs]


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


def _value_names(graph):
    names = {v.name for v in list(graph.input) + list(graph.output)
             + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(n for n in node.input if n)
        names.update(n for n in node.output if n)
    return names


def _rename(graph, old, new):
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in list(graph.input) + list(graph.output) + list(
            graph.value_info):
        if value.name == old:
            value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new


def rename_values(onnx_model, old_names, new_names):
    """Renames graph values (`old_names[i]` to `new_names[i]`) everywhere
    they are used; a value inside the graph that already has one of the new
    names is renamed out of the way first."""
    graph = onnx_model.graph
    wanted = dict(zip(old_names, new_names))
    taken = _value_names(graph)
    for new in set(wanted.values()) & taken:
        if new not in wanted or wanted[new] != new:
            index, spare = 1, f"{new}__{1}"
            while spare in taken:
                index += 1
                spare = f"{new}__{index}"
            _rename(graph, new, spare)
            taken.add(spare)
            wanted = {spare if k == new else k: v for k, v in wanted.items()}
    for old, new in wanted.items():
        if old != new:
            _rename(graph, old, new)


def _check_ops(onnx_model, name):
    """A converter may keep an op it cannot convert as a node of that name,
    which no runtime can run: refuse the file, naming the op."""
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
            f"{exporter()} cannot convert the op(s) {', '.join(ops)} of "
            f"model '{name}' (first at '{where}'); replace the layer that "
            "uses it, or try another {fix}.", fix=_OPSET_FIX)


def _refusal(what, model, error, advice):
    text = " ".join(str(error).split())[:300]
    return ExportError(
        f"{what} could not convert model '{model.name}': "
        f"{type(error).__name__}: {text}. {advice}", fix=_OPSET_FIX)


# --- TensorFlow: tf2onnx -----------------------------------------------------

def _tensorflow(model, opset, batch_size):
    import tensorflow as tf

    specs = [tf.TensorSpec((batch_size,) + tuple(t.shape[1:]), t.dtype,
                           name=name)
             for t, name in zip(model.inputs, input_names(model))]
    single = len(specs) == 1

    @tf.function(input_signature=specs)
    def serve(*inputs):
        return model(inputs[0] if single else list(inputs), training=False)

    internals.patch_tf2onnx_for_numpy2()
    try:
        with internals.grouped_conv_as_plain_op(), \
                internals.tf2onnx_optimizers_fixed():
            # Eager tensors a layer captured (a tf.constant made in build)
            # are not variables, so tf2onnx's freezing leaves them as graph
            # inputs.
            captured = {
                internal.name: external for external, internal in
                serve.get_concrete_function().graph.captures
                if external.dtype != tf.resource
            }
            onnx_model = internals.tf2onnx_from_function(serve, specs, opset)
    except Exception as e:
        raise _refusal("tf2onnx", model, e, "Try another {fix}, or replace "
                       "the layer whose op it names.") from e
    _check_ops(onnx_model, model.name)
    _embed_captured(onnx_model, captured, len(specs), model.name)
    return onnx_model


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


# --- PyTorch: torch.onnx's dynamo exporter -----------------------------------

# Sizes that stand for an unknown dimension while torch.export traces: 2
# for the batch (torch.export takes a size of 1 for a constant), 32 for
# another (large enough for a few poolings); both stay symbolic.
_TRACE_BATCH, _TRACE_SIZE = 2, 32


def _torch_examples(model, batch_size):
    """Example inputs to trace with, on the model's device, and the
    dynamic-shape spec of `torch.export` (None: all sizes fixed)."""
    import keras
    import torch

    device = next((v.value.device for v in model.weights), None)
    batch = torch.export.Dim("batch") if batch_size is None else None
    examples, dims = [], []
    for tensor in model.inputs:
        shape, dynamic = [batch_size or _TRACE_BATCH], {}
        if batch is not None:
            dynamic[0] = batch
        for axis, size in enumerate(tensor.shape[1:], 1):
            shape.append(size or _TRACE_SIZE)
            if size is None:
                dynamic[axis] = torch.export.Dim.AUTO
        dtype = getattr(torch, keras.backend.standardize_dtype(tensor.dtype))
        examples.append(torch.zeros(shape, dtype=dtype, device=device))
        dims.append(dynamic)
    dynamic_shapes = (tuple(dims),) if any(dims) else None
    return tuple(examples), dynamic_shapes


def _inference_module(model):
    """A torch Module running `model` in inference mode on positional
    inputs and returning its outputs flattened (dicts by sorted key, as
    `output_names` names them). Keras layers are torch Modules on this
    backend, so the model's weights are this Module's parameters."""
    import keras
    import torch

    single = len(model.inputs) == 1

    class Inference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            outputs = self.model(inputs[0] if single else list(inputs),
                                 training=False)
            return tuple(keras.tree.flatten(outputs))

    return Inference().eval()


@contextlib.contextmanager
def _quiet_torch_export():
    """torch.onnx logs a warning per optional op library it lacks
    (torchvision's) and torch.export warns about constants it captures;
    neither concerns the user."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _torch(model, opset, batch_size):
    import torch

    examples, dynamic_shapes = _torch_examples(model, batch_size)
    try:
        with _quiet_torch_export(), torch.no_grad():
            program = torch.onnx.export(
                _inference_module(model), examples, dynamo=True,
                dynamic_shapes=dynamic_shapes, opset_version=opset,
                optimize=True, verbose=False, external_data=False)
    except Exception as e:
        raise _torch_refusal(model, e, batch_size) from e
    onnx_model = program.model_proto
    _strip_metadata(onnx_model.graph)
    return onnx_model


def _strip_metadata(graph):
    """Drops the exporter's notes on every node and value: the Python stack
    trace that made each node (with this machine's file paths) and the
    torch.fx node it came from, a third of a small model's file."""
    for item in (list(graph.node) + list(graph.value_info)
                 + list(graph.input) + list(graph.output)
                 + list(graph.initializer)):
        del item.metadata_props[:]
        item.doc_string = ""
    del graph.metadata_props[:]


def _torch_refusal(model, error, batch_size):
    """The one-line refusal of a model torch.export cannot trace: with a
    dynamic batch that the model fixes (a reshape to a constant batch),
    a fixed batch is the way out."""
    text = " ".join(str(error).split())
    fixed = batch_size is None and "batch" in text and (
        "onstraint" in text or "specializ" in text)
    advice = ("The model fixes its batch size; export with a fixed batch "
              "({fix})." if fixed else
              "Replace the layer it names, or try another {fix}; the same "
              ".keras file may export with KERAS_BACKEND=tensorflow "
              "(tf2onnx).")
    return ExportError(
        f"torch.onnx's dynamo exporter could not convert model "
        f"'{model.name}': {type(error).__name__}: {text[:300]}. {advice}",
        fix=("batch_size", 1, "batch_size=N") if fixed else _OPSET_FIX)
