"""export_onnx: fold, convert with tf2onnx, write atomically, verify with
onnxruntime.

tf2onnx is the established TensorFlow -> ONNX converter (Keras's own
`model.export(format="onnx")` uses it). It never emits an ONNX
BatchNormalization: it lowers normalization to Mul / Add and folds those into a
Conv only while that Conv has no bias, so trained models keep a Mul and an Add
per normalization. Folding in Keras first (`fold`) leaves nothing to lower.
"""

import collections
import dataclasses
import logging
import os

import keras
import numpy as np

from renorm_convert._internal import backend as _backend
from renorm_convert._internal import keras_hooks as internals
from renorm_convert._internal.limits import MAX_OPSET, MIN_OPSET
from renorm_convert.data import class_ids
from renorm_convert.errors import ExportError
from renorm_convert.evaluation import logits as keras_logits
from renorm_convert.evaluation import to_numpy
from renorm_convert.transform.folding import fold, fold_plan
from renorm_convert.transform.graph import iter_layers
from renorm_convert.io import kill_point, replace_atomically
from renorm_convert.onnx.quantization import quantize_int8

_log = logging.getLogger("renorm_convert")


@dataclasses.dataclass
class ExportReport:
    """What `export_onnx` wrote and measured.

    Parity is measured in two steps and end to end, each as the largest
    absolute difference on the verification inputs: `fold_max_abs_diff`
    (the folded Keras model against the model given), `onnx_max_abs_diff`
    (onnxruntime against the folded Keras model: the conversion and the
    folding in the ONNX graph) and
    `max_abs_diff` (onnxruntime against the model given)."""

    path: str
    opset: int
    folded: int
    unfolded: dict
    op_counts: dict
    max_abs_diff: float = None
    output_scale: float = None
    fold_max_abs_diff: float = None
    onnx_max_abs_diff: float = None
    file_size: int = 0
    input_names: list = dataclasses.field(default_factory=list)
    output_names: list = dataclasses.field(default_factory=list)
    # Verification: on what, the logits before a final softmax / sigmoid
    # (where outputs saturate and hide a wrong fold), top-1 agreement, and
    # the bound a relative difference must stay within.
    verified_on: str = None
    logits_max_abs_diff: float = None
    logits_scale: float = None
    top1_agreement: float = None
    tolerance: float = None
    # precision="float16" / quantize="int8": what the file holds, and the
    # int8 file against the float one it was made from (on the verification
    # inputs, which calibration never saw when they come from --data).
    precision: str = "float32"
    quantized: str = None
    float_file_size: int = None
    int8_top1_agreement: float = None
    float_accuracy: float = None
    int8_accuracy: float = None
    # Normalizations folded at the Keras level (`folded`, from the FoldPlan),
    # and per-channel constant Mul / Add nodes folded afterwards in the ONNX
    # graph (`onnx_folding.fold_affine`: those a custom layer's own code
    # joined to its Conv). Verification covers both.
    folded_keras: int = 0
    folded_onnx: int = 0

    def summary(self):
        """The folding in one line, for people."""
        return (f"folded {self.folded_keras} normalization layer(s) at the "
                f"Keras level and {self.folded_onnx} per-channel Mul/Add "
                f"node(s) in the ONNX graph; {len(self.unfolded)} kept as "
                "scale-and-offset in Keras")

    @property
    def relative_diff(self):
        if self.max_abs_diff is None:
            return None
        return self.max_abs_diff / max(self.output_scale or 0.0, 1e-12)

    @property
    def logits_relative_diff(self):
        if self.logits_max_abs_diff is None:
            return None
        return self.logits_max_abs_diff / max(self.logits_scale or 0.0, 1e-12)

    def as_dict(self):
        return {**dataclasses.asdict(self), "relative_diff": self.relative_diff,
                "logits_relative_diff": self.logits_relative_diff}


def _input_specs(model, batch_size=None):
    import tensorflow as tf

    specs = []
    for tensor in model.inputs:
        shape = (batch_size,) + tuple(tensor.shape[1:])
        name = internals.producing_operation(tensor).name
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


def to_onnx(model, opset=None, batch_size=None):
    """The ONNX ModelProto of `model` as it stands (no folding), with the
    Keras input and output names and a dynamic batch dimension (or a fixed
    one of `batch_size`)."""
    import tensorflow as tf

    specs = _input_specs(model, batch_size)
    single = len(specs) == 1

    @tf.function(input_signature=specs)
    def serve(*inputs):
        outputs = model(inputs[0] if single else list(inputs), training=False)
        return outputs

    internals.patch_tf2onnx_for_numpy2()
    try:
        with internals.grouped_conv_as_plain_op(), \
                internals.tf2onnx_optimizers_fixed():
            # Eager tensors a layer captured (a tf.constant made in build) are
            # not variables, so tf2onnx's freezing leaves them as graph inputs.
            captured = {
                internal.name: external
                for external, internal in serve.get_concrete_function().graph.captures
                if external.dtype != tf.resource
            }
            onnx_model = internals.tf2onnx_from_function(serve, specs, opset)
    except Exception as e:
        text = " ".join(str(e).split())[:300]
        raise ExportError(
            f"tf2onnx could not convert model '{model.name}': "
            f"{type(e).__name__}: {text}. Try another {{fix}}, or replace "
            "the layer whose op it names.", fix=("opset", None, "opset=")
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
    struct = internals.outputs_structure(model)
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
            "uses it, or try another {fix}.", fix=("opset", None, "opset="))


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
                "the model a fixed input shape to verify it, or export "
                "without verification ({fix}).",
                fix=("verify", False, "verify=False"))
        x = rng.normal(size=(batch,) + dims)
        xs.append(x.astype(keras.backend.standardize_dtype(tensor.dtype)))
    return xs


def run_onnx(path, inputs, optimize=True):
    """Runs an ONNX file (a path, or the serialized model) in onnxruntime on
    the CPU; returns its outputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(path, options,
                                   providers=["CPUExecutionProvider"])
    feed = {i.name: x for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


# A fold rewrites weights in float32: on a trained model its outputs move by
# about 1e-6 of their scale. 1e-3 leaves room for deep, badly conditioned
# models, and is far below what a wrong fold does (a gamma off by 1 % moves
# the logits by about 1e-2 of their scale).
VERIFY_TOLERANCE = 1e-3
_FINAL_ACTIVATIONS = ("Softmax", "Sigmoid", "LogSoftmax")


# float16 keeps 11 significant bits: outputs move by about 1e-3 of their
# scale per layer, more in deep networks.
FLOAT16_TOLERANCE = 2e-2


def export_onnx(model, path, *, opset=None, verify=True,
                tolerance=VERIFY_TOLERANCE, batch_size=None, quantize=None,
                calibration=None, precision="float32", labels=None):
    """Exports `model` to ONNX with its normalization folded.

    Folds every normalization layer it can into the producing Conv / Dense
    layer (`fold`), converts with tf2onnx, folds the per-channel Mul / Add
    still next to a Conv / Gemm in the ONNX graph (`onnx_folding`: those
    inside custom layers), keeps the input and output names,
    leaves the batch dimension dynamic, and writes `path` atomically (nothing
    is left behind on failure). With `verify`, runs the file in onnxruntime
    and compares it with the Keras model in inference mode, before the file
    takes the name `path`: the outputs, and the logits before a final
    softmax / sigmoid (where saturated outputs would hide a wrong fold), and
    top-1 agreement. A file onnxruntime cannot run, or whose outputs or
    logits differ by more than `tolerance` of their scale, never appears
    there.

    Args:
        model: A Keras model (BatchNormalization or BatchRenormalization
            layers, nested models, several inputs / outputs).
        path: Where to write the `.onnx` file.
        opset: ONNX opset from `MIN_OPSET` to `MAX_OPSET` (9 to 18);
            tf2onnx's default when None.
        verify: True (standard-normal random inputs), False, or the inputs
            to verify on: an array (a list of arrays for several inputs) as
            the model takes them, e.g. real, preprocessed images.
        tolerance: Largest relative difference (of the output scale, and of
            the logits' scale) verification accepts.
        batch_size: A fixed batch dimension (as TensorRT or OpenCV want);
            dynamic when None.
        quantize: "int8": static quantization of the folded float model
            with onnxruntime.quantization (QDQ, per-channel int8 weights,
            uint8 activations), calibrated on `calibration`; the report
            compares it with the float model on the verification inputs.
        calibration: Real inputs (as `verify` takes them) for "int8".
        precision: "float16": weights and compute in float16 with float32
            inputs and outputs (onnxruntime.transformers.float16), verified
            within FLOAT16_TOLERANCE; for GPU runtimes (CPUs run float16
            slowly).
        labels: Class labels of `verify`'s inputs: the report then gives
            the accuracy of the float (and int8) file.

    Returns:
        An `ExportReport`.

    Raises:
        ExportError: an opset out of range, a model tf2onnx cannot convert,
            a file onnxruntime cannot run, or one that fails verification
            (then nothing is written).
    """
    import onnx  # noqa: F401  (fail here, clearly, if it is missing)

    _backend.require_tensorflow(
        "ONNX export (tf2onnx)",
        "Save the model (.keras files load on every backend) and export it "
        "where TensorFlow is installed: KERAS_BACKEND=tensorflow "
        "renorm-convert export MODEL.keras -o OUT.onnx.")
    check_opset(opset)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
            batch_size, (int, np.integer)) or batch_size < 1):
        raise ExportError("{arg}: expected a positive integer, or None for a "
                          "dynamic batch.", "batch_size", batch_size)
    if quantize not in (None, "int8"):
        raise ExportError("{arg}: expected None or 'int8'.", "quantize",
                          quantize)
    if precision not in ("float32", "float16"):
        raise ExportError("{arg}: expected 'float32' or 'float16'.",
                          "precision", precision)
    if quantize and precision != "float32":
        raise ExportError("{arg} and precision='float16' exclude each other; "
                          "choose one.", "quantize", quantize)
    calibration_xs = None
    if quantize:
        if calibration is None or calibration is True:
            raise ExportError(
                "{arg} needs calibration: a batch of real inputs (a few "
                "hundred images, preprocessed as the model takes them) to "
                "measure activation ranges on.", "quantize", quantize)
        calibration_xs, _ = _verification_inputs(model, calibration,
                                                 argument="calibration")
    if precision == "float16" and tolerance == VERIFY_TOLERANCE:
        tolerance = FLOAT16_TOLERANCE
    xs, verified_on = _verification_inputs(model, verify, batch_size)
    model = _in_float32(model)
    plan = fold_plan(model)
    folded = fold(model, plan)
    onnx_model = to_onnx(folded, opset=opset, batch_size=batch_size)
    # What Keras could not fold (normalization a custom layer's own code
    # joins to its Conv), in the ONNX graph; before verification, so the
    # parity check covers it.
    from renorm_convert.onnx.folding import fold_affine

    onnx_model, folded_onnx = fold_affine(onnx_model)
    report = ExportReport(
        path=str(path),
        opset=int(onnx_model.opset_import[0].version),
        folded=len(plan.folded),
        folded_keras=len(plan.folded),
        folded_onnx=folded_onnx,
        unfolded=dict(plan.unfolded),
        op_counts=op_counts(onnx_model),
        input_names=[i.name for i in onnx_model.graph.input],
        output_names=[o.name for o in onnx_model.graph.output],
    )
    if xs is not None:
        report.verified_on, report.tolerance = verified_on, float(tolerance)
        feed = xs[0] if len(xs) == 1 else xs
        expected = [to_numpy(e) for e in keras.tree.flatten(
            model(feed, training=False))]
        via_fold = [to_numpy(e) for e in keras.tree.flatten(
            folded(feed, training=False))]
        report.fold_max_abs_diff = _max_diff(expected, via_fold)
        expected_logits, logits_name = keras_logits(model, xs), None
        if expected_logits is not None:
            logits_name = _onnx_logits_name(onnx_model)
    del folded
    if precision == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx_model = convert_float_to_float16(onnx_model, keep_io_types=True)
        report.precision = "float16"
    float_payload = onnx_model.SerializeToString()
    checked = _with_output(onnx_model, logits_name) if (
        xs is not None and logits_name) else None
    del onnx_model
    payload = float_payload
    if quantize:
        payload = quantize_int8(float_payload, calibration_xs,
                                 report.input_names)
        report.quantized = "int8"
        report.float_file_size = len(float_payload)

    def write_and_verify(tmp):
        # The file is checked before it takes the output's name: a file
        # that fails the check never appears at `path`.
        with open(tmp, "wb") as f:
            f.write(payload)
        report.file_size = os.path.getsize(tmp)
        if xs is None:
            return
        kill_point("export-verify")
        try:
            got = run_onnx(checked or float_payload, xs)
            if quantize:
                got_int8 = run_onnx(tmp, xs)
        except Exception as e:
            text = " ".join(str(e).replace(tmp, str(path)).split())[:200]
            raise ExportError(
                f"{path}: onnxruntime cannot run the exported model "
                f"({type(e).__name__}: {text}); nothing was written. Try "
                "another {fix}.", fix=("opset", None, "opset=")) from None
        got = got[:len(expected)] + (got[-1:] if checked else [])
        report.onnx_max_abs_diff = _max_diff(via_fold, got[:len(expected)])
        _compare(report, expected, got[:len(expected)],
                 expected_logits, got[-1] if checked else None)
        worst = max(report.relative_diff,
                    report.logits_relative_diff or 0.0)
        if not worst <= tolerance:
            raise ExportError(
                f"{path}: onnxruntime's outputs differ from Keras's by "
                f"{report.relative_diff:.2g} of their scale"
                + (f" (logits before the final activation: "
                   f"{report.logits_relative_diff:.2g})"
                   if report.logits_relative_diff is not None else "")
                + f" on {verified_on}, above the tolerance {tolerance:g} "
                f"(folding alone: {report.fold_max_abs_diff:.2g}, the "
                f"conversion alone: {report.onnx_max_abs_diff:.2g}); "
                "nothing was written. Report the model, or export with "
                "{fix} raised if it is known to be badly conditioned.",
                fix=("tolerance", tolerance, "tolerance="))
        if quantize:
            _compare_int8(report, got[0], got_int8[0], labels)
        elif labels is not None:
            report.float_accuracy = _accuracy(got[0], labels)

    replace_atomically(path, write_and_verify)
    return report


def _in_float32(model):
    """`model` computing in float32. A model trained in mixed precision
    keeps float32 weights but computes in float16 / bfloat16, whose
    rounding (1e-3 of the outputs and more) is above what verification
    accepts and is not what a float32 ONNX file computes; its export is
    the float32 model (`precision="float16"` then writes float16)."""
    policies = {layer.dtype_policy.name for layer in iter_layers(model)
                if not isinstance(layer, keras.layers.InputLayer)}
    below = sorted(p for p in policies if p != "float32")
    if not below:
        return model
    from renorm_convert.transform.conversion import recast

    _log.info(f"the model computes in {', '.join(below)}; exporting it "
              "computing in float32 (its weights are float32)")
    return recast(model, "float32")


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x, np.float64)
                            - np.asarray(y, np.float64)).max())
               for x, y in zip(a, b))


def _accuracy(outputs, labels):
    return float((np.asarray(outputs).argmax(-1) == class_ids(labels)).mean())


def _compare_int8(report, float_out, int8_out, labels):
    report.int8_top1_agreement = float(
        (float_out.argmax(-1) == int8_out.argmax(-1)).mean())
    if labels is not None:
        report.float_accuracy = _accuracy(float_out, labels)
        report.int8_accuracy = _accuracy(int8_out, labels)


def _verification_inputs(model, verify, batch_size=None,
                         argument="verify"):
    """(inputs, what they are) for verification, or (None, None)."""
    if verify is False or verify is None:
        return None, None
    if verify is True:
        return (sample_inputs(model, batch=batch_size or 4),
                "random standard-normal inputs")
    xs = verify if isinstance(verify, (list, tuple)) else [verify]
    xs = [np.asarray(x) for x in xs]
    if len(xs) != len(model.inputs) or any(
            x.ndim != len(t.shape) or any(
                d is not None and d != n for d, n in zip(t.shape[1:],
                                                         x.shape[1:]))
            for x, t in zip(xs, model.inputs)) or not len(xs[0]):
        shapes = ", ".join(str(tuple(t.shape)) for t in model.inputs)
        got = ", ".join(str(x.shape) for x in xs)
        raise ExportError(
            f"inputs of shape {got} do not fit model '{model.name}' "
            f"(inputs {shapes}); give a non-empty batch preprocessed as the "
            "model takes it.", argument, "the arrays given", quote=False)
    xs = [x.astype(keras.backend.standardize_dtype(t.dtype))
          for x, t in zip(xs, model.inputs)]
    if batch_size is not None:  # the file takes batches of exactly that
        reps = -(-batch_size // len(xs[0]))
        xs = [np.concatenate([x] * reps)[:batch_size] for x in xs]
    return xs, f"{len(xs[0])} given inputs"


def _onnx_logits_name(onnx_model):
    """The input of the Softmax / Sigmoid node producing the single graph
    output, or None."""
    outputs = [o.name for o in onnx_model.graph.output]
    if len(outputs) != 1:
        return None
    for node in onnx_model.graph.node:
        if outputs[0] in node.output and node.op_type in _FINAL_ACTIVATIONS:
            return node.input[0]
    return None


def _with_output(onnx_model, name):
    """A serialized copy of the model that also outputs tensor `name`."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(onnx_model)
    copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return copy.SerializeToString()


def _compare(report, expected, got, expected_logits, got_logits):
    report.max_abs_diff = max(
        float(np.abs(e - g).max()) for e, g in zip(expected, got))
    report.output_scale = max(float(np.abs(e).max()) for e in expected)
    if expected_logits is not None and got_logits is not None:
        report.logits_max_abs_diff = float(
            np.abs(expected_logits - got_logits).max())
        report.logits_scale = float(np.abs(expected_logits).max())
    first, other = expected[0], got[0]
    if first.ndim == 2 and first.shape[-1] > 1:
        report.top1_agreement = float(
            (first.argmax(-1) == other.argmax(-1)).mean())




def check_opset(opset):
    """Refuses an opset outside what tf2onnx and onnxruntime support here."""
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or (
            not MIN_OPSET <= int(opset) <= MAX_OPSET):
        raise ExportError(
            f"{{arg}}: expected an ONNX opset from {MIN_OPSET} to "
            f"{MAX_OPSET} (what tf2onnx and onnxruntime support here).",
            "opset", opset)
