"""export_onnx: a Keras model to a verified ONNX file with its normalization
folded, on TensorFlow and PyTorch, as a chain of steps:

1. prepare: the arguments checked, the verification inputs, the model in
   float32, folded in Keras (`fold`), and Keras's outputs to compare with;
2. convert: the backend's exporter (`exporters.to_onnx`: tf2onnx, or
   PyTorch's dynamo exporter), named and with a dynamic batch;
3. clean: the same for every exporter (`passes.clean`: constants, per-
   channel Mul / Add into the Conv / Gemm next to them, Transposes);
4. precision: float16 or int8 (onnxruntime's own tooling), if asked;
5. write and verify: the file is written beside `path`, run by onnxruntime
   and compared with Keras on the same backend, and only then takes the
   name `path` (nothing is left behind on failure).

tf2onnx and the dynamo exporter never write ONNX BatchNormalization: they
lower it to Mul / Add, which a Conv with a bias keeps; folding in Keras
first leaves nothing to lower, and step 3 folds what Keras could not reach
(normalization inside a custom layer's own code).
"""

import dataclasses
import logging

import keras
import numpy as np

from renorm_convert._internal.limits import MAX_OPSET, MIN_OPSET
from renorm_convert.data import class_ids
from renorm_convert.errors import ExportError
from renorm_convert.evaluation import logits as keras_logits
from renorm_convert.evaluation import to_numpy
from renorm_convert.io import replace_atomically
from renorm_convert.onnx import exporters
from renorm_convert.onnx.exporters import to_onnx
from renorm_convert.onnx.passes import GraphCleanup, clean, op_counts
from renorm_convert.transform.folding import fold, fold_plan
from renorm_convert.transform.graph import iter_layers

_log = logging.getLogger("renorm_convert")

# A fold rewrites weights in float32: on a trained model its outputs move by
# about 1e-6 of their scale. 1e-3 leaves room for deep, badly conditioned
# models, and is far below what a wrong fold does (a gamma off by 1 % moves
# the logits by about 1e-2 of their scale).
VERIFY_TOLERANCE = 1e-3
# float16 keeps 11 significant bits: outputs move by about 1e-3 of their
# scale per layer, more in deep networks.
FLOAT16_TOLERANCE = 2e-2
_FINAL_ACTIVATIONS = ("Softmax", "Sigmoid", "LogSoftmax")


# --- the report --------------------------------------------------------------

@dataclasses.dataclass
class Verification:
    """The file against Keras (on the backend it was exported from), each
    difference the largest absolute one on the inputs it names:
    `fold_max_abs_diff` the folded Keras model against the model given,
    `onnx_max_abs_diff` onnxruntime against the folded Keras model (the
    conversion and the ONNX graph's folds), `max_abs_diff` onnxruntime
    against the model given; the logits are those before a final softmax /
    sigmoid (where outputs saturate and hide a wrong fold)."""

    inputs: str
    tolerance: float
    max_abs_diff: float = None
    output_scale: float = None
    fold_max_abs_diff: float = None
    onnx_max_abs_diff: float = None
    logits_max_abs_diff: float = None
    logits_scale: float = None
    top1_agreement: float = None
    accuracy: float = None  # of the float file, on inputs with labels

    @property
    def relative_diff(self):
        return _relative(self.max_abs_diff, self.output_scale)

    @property
    def logits_relative_diff(self):
        return _relative(self.logits_max_abs_diff, self.logits_scale)


@dataclasses.dataclass
class Int8Comparison:
    """The int8 file against the float one it was made from, on the
    verification inputs (which calibration never saw when they come from
    held-out data)."""

    float_file_size: int
    top1_agreement: float = None
    float_accuracy: float = None
    int8_accuracy: float = None


@dataclasses.dataclass
class ExportReport:
    """What `export_onnx` wrote and measured.

    `folded` normalization layers were folded in Keras, `unfolded` maps the
    others to why not; `graph` says what the ONNX graph's clean-up did
    (`folded_onnx`: per-channel Mul / Add folded there); `verification`
    (None with `verify=False`) holds the parity with Keras, `int8` the
    comparison of an int8 file with its float model."""

    path: str
    opset: int
    exporter: str
    folded: int
    unfolded: dict
    op_counts: dict
    input_names: list
    output_names: list
    graph: GraphCleanup
    precision: str = "float32"  # "float32", "float16" or "int8"
    file_size: int = 0
    verification: Verification = None
    int8: Int8Comparison = None

    @property
    def folded_onnx(self):
        return self.graph.affine

    def _verified(self, name):
        return None if self.verification is None else getattr(
            self.verification, name)

    @property
    def max_abs_diff(self):
        return self._verified("max_abs_diff")

    @property
    def relative_diff(self):
        return self._verified("relative_diff")

    @property
    def fold_max_abs_diff(self):
        return self._verified("fold_max_abs_diff")

    @property
    def onnx_max_abs_diff(self):
        return self._verified("onnx_max_abs_diff")

    def as_dict(self):
        out = dataclasses.asdict(self)
        if self.verification is not None:
            out["verification"].update(
                relative_diff=self.verification.relative_diff,
                logits_relative_diff=self.verification.logits_relative_diff)
        return out

    def describe(self, elapsed=None):
        """The report for people: what was written, folded and measured,
        one fact a line (`elapsed`: the seconds the export took)."""
        lines = [f"wrote {self.path} ({self.file_size / 1e6:.2f} MB, opset "
                 f"{self.opset}, {self.exporter}"
                 + (f", {elapsed:.1f} s)" if elapsed else ")")]
        lines.append(f"folded {self.folded} normalization layers into their "
                     f"Conv/Dense; {len(self.unfolded)} kept as per-channel "
                     "scale-and-offset")
        lines += [f"  not folded: {path}: {reason}"
                  for path, reason in self.unfolded.items()]
        g = self.graph
        done = [f"{n} {what}" for n, what in (
            (g.affine, "per-channel Mul/Add folded into the Conv/Gemm next "
                       "to them"),
            (g.transposes, "fewer by cancelling Transposes"),
            (g.pads, "zero Pads folded into Convs"),
            (g.merged, "fewer by merging constant arithmetic"),
            (g.constants, "computed from constants")) if n]
        lines.append(
            f"ONNX graph: {g.nodes_before} nodes from the exporter, "
            f"{g.nodes_after} after clean-up"
            + (f" ({', '.join(done)})" if done else " (nothing to clean)"))
        lines.append("ONNX ops: " + ", ".join(
            f"{k} {v}" for k, v in self.op_counts.items()))
        if self.verification is not None:
            lines += _describe_verification(self.verification,
                                             self.precision == "int8")
        if self.precision == "float16":
            lines.append("float16 weights and compute (float32 inputs and "
                         "outputs); meant for GPU runtimes, slow on CPUs")
        if self.int8 is not None:
            lines += _describe_int8(self.int8, self.file_size)
        return "\n".join(lines)


def _describe_verification(v, int8):
    lines = [f"onnxruntime vs Keras on {v.inputs}: max abs diff "
             f"{v.max_abs_diff:.3g} ({v.relative_diff:.3g} of the output "
             f"scale; folding {v.fold_max_abs_diff:.2g}, conversion "
             f"{v.onnx_max_abs_diff:.2g})"]
    if v.logits_max_abs_diff is not None:
        lines.append(f"  logits before the final activation: "
                     f"{v.logits_relative_diff:.3g} of their scale")
    if v.top1_agreement is not None:
        lines.append(f"  same top-1 on {100 * v.top1_agreement:.1f}% of the "
                     f"inputs; tolerance {v.tolerance:g}")
    if v.accuracy is not None and not int8:
        lines.append(f"  accuracy on them: {100 * v.accuracy:.2f}%")
    return lines


def _describe_int8(c, file_size):
    lines = [f"int8: {file_size / 1e6:.2f} MB (float "
             f"{c.float_file_size / 1e6:.2f} MB)"]
    if c.top1_agreement is not None:
        lines.append(f"  same top-1 as the float model on "
                     f"{100 * c.top1_agreement:.1f}% of the verification "
                     "inputs")
    if c.int8_accuracy is not None:
        lines.append(f"  accuracy: int8 {100 * c.int8_accuracy:.2f}%, float "
                     f"{100 * c.float_accuracy:.2f}%")
    lines.append("  (latency: benchmarks/quantize.py)")
    return lines


def _relative(diff, scale):
    return None if diff is None else diff / max(scale or 0.0, 1e-12)


# --- 1. prepare --------------------------------------------------------------

@dataclasses.dataclass
class _Request:
    opset: int
    batch_size: int
    quantize: str
    precision: str
    tolerance: float
    xs: list  # verification inputs, or None
    verified_on: str
    calibration: list
    labels: object


def _check_arguments(model, opset, verify, tolerance, batch_size, quantize,
                     calibration, precision, labels):
    """Every argument checked before any work; a `_Request`."""
    check_opset(opset)
    if batch_size is not None and (isinstance(batch_size, bool) or not
                                   isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
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
    if tolerance is not None and not (isinstance(tolerance, (int, float))
                                      and tolerance > 0):
        raise ExportError("{arg}: expected a number > 0, or None for the "
                          "default of the precision.", "tolerance", tolerance)
    exporters.check_backend()
    exporters.check_opset(opset)
    calibration_xs = None
    if quantize:
        if calibration is None or calibration is True:
            raise ExportError(
                "{arg} needs calibration: a batch of real inputs (a few "
                "hundred images, preprocessed as the model takes them) to "
                "measure activation ranges on.", "quantize", quantize)
        calibration_xs, _ = _verification_inputs(model, calibration,
                                                 argument="calibration")
    if tolerance is None:
        tolerance = (FLOAT16_TOLERANCE if precision == "float16"
                     else VERIFY_TOLERANCE)
    xs, verified_on = _verification_inputs(model, verify, batch_size)
    return _Request(opset, batch_size, quantize, precision, float(tolerance),
                    xs, verified_on, calibration_xs, labels)


@dataclasses.dataclass
class _Reference:
    """Keras's outputs on the verification inputs: the model given, its
    fold, and its logits before a final softmax / sigmoid (or None)."""

    expected: list
    via_fold: list
    logits: object


def _prepare(model, request):
    """(float32 model, fold plan, folded model, Keras reference or None)."""
    model = _in_float32(model)
    plan = fold_plan(model)
    folded = fold(model, plan)
    reference = None
    if request.xs is not None:
        xs = request.xs
        feed = xs[0] if len(xs) == 1 else xs
        reference = _Reference(
            expected=[to_numpy(e) for e in keras.tree.flatten(
                model(feed, training=False))],
            via_fold=[to_numpy(e) for e in keras.tree.flatten(
                folded(feed, training=False))],
            logits=keras_logits(model, xs))
    return model, plan, folded, reference


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


# --- 4. precision ------------------------------------------------------------

@dataclasses.dataclass
class _Payloads:
    """The bytes to write, and what verification runs: the float (or
    float16) model, with its logits as an extra output where there are
    logits to compare."""

    file: bytes
    checked: bytes
    logits: bool


def _with_precision(onnx_model, request, report, reference):
    """The file's bytes after float16 conversion or int8 quantization."""
    logits_name = None
    if reference is not None and reference.logits is not None:
        # Found before float16 conversion, which writes a Cast after it.
        logits_name = _onnx_logits_name(onnx_model)
    if request.precision == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx_model = convert_float_to_float16(onnx_model, keep_io_types=True)
        report.precision = "float16"
    float_payload = onnx_model.SerializeToString()
    checked = (_with_output(onnx_model, logits_name) if logits_name
               else float_payload)
    payload = float_payload
    if request.quantize:
        from renorm_convert.onnx.quantization import quantize_int8

        payload = quantize_int8(float_payload, request.calibration,
                                report.input_names)
        report.precision = "int8"
        report.int8 = Int8Comparison(float_file_size=len(float_payload))
    return _Payloads(payload, checked, logits_name is not None)


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


# --- 5. write and verify -----------------------------------------------------

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


def _write_and_verify(tmp, path, payloads, request, reference, report):
    """Writes the file at `tmp` and, with verification inputs, checks it
    before it takes the name `path`: a file that fails never appears
    there."""
    import os

    with open(tmp, "wb") as f:
        f.write(payloads.file)
    report.file_size = os.path.getsize(tmp)
    if reference is None:
        return
    try:
        got = run_onnx(payloads.checked, request.xs)
        got_int8 = run_onnx(tmp, request.xs) if request.quantize else None
    except Exception as e:
        text = " ".join(str(e).replace(tmp, str(path)).split())[:200]
        raise ExportError(
            f"{path}: onnxruntime cannot run the exported model "
            f"({type(e).__name__}: {text}); nothing was written. Try "
            "another {fix}.", fix=("opset", None, "opset=")) from None
    n = len(reference.expected)
    verification = _compare(request, reference, got[:n],
                            got[-1] if payloads.logits else None)
    report.verification = verification
    _check_tolerance(path, verification)
    if got_int8 is not None:
        _compare_int8(report.int8, got[0], got_int8[0], request.labels)
    elif request.labels is not None:
        verification.accuracy = _accuracy(got[0], request.labels)


def _compare(request, reference, got, got_logits):
    v = Verification(inputs=request.verified_on, tolerance=request.tolerance)
    v.max_abs_diff = _max_diff(reference.expected, got)
    v.output_scale = max(float(np.abs(e).max()) for e in reference.expected)
    v.fold_max_abs_diff = _max_diff(reference.expected, reference.via_fold)
    v.onnx_max_abs_diff = _max_diff(reference.via_fold, got)
    if reference.logits is not None and got_logits is not None:
        v.logits_max_abs_diff = _max_diff([reference.logits], [got_logits])
        v.logits_scale = float(np.abs(reference.logits).max())
    first, other = reference.expected[0], got[0]
    if first.ndim == 2 and first.shape[-1] > 1:
        v.top1_agreement = float(
            (first.argmax(-1) == other.argmax(-1)).mean())
    return v


def _check_tolerance(path, v):
    worst = max(v.relative_diff, v.logits_relative_diff or 0.0)
    if worst <= v.tolerance:
        return
    raise ExportError(
        f"{path}: onnxruntime's outputs differ from Keras's by "
        f"{v.relative_diff:.2g} of their scale"
        + (f" (logits before the final activation: "
           f"{v.logits_relative_diff:.2g})"
           if v.logits_relative_diff is not None else "")
        + f" on {v.inputs}, above the tolerance {v.tolerance:g} "
        f"(folding alone: {v.fold_max_abs_diff:.2g}, the conversion "
        f"alone: {v.onnx_max_abs_diff:.2g}); nothing was written. Report "
        "the model, or export with {fix} raised if it is known to be "
        "badly conditioned.", fix=("tolerance", v.tolerance, "tolerance="))


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x, np.float64)
                            - np.asarray(y, np.float64)).max())
               for x, y in zip(a, b))


def _accuracy(outputs, labels):
    return float((np.asarray(outputs).argmax(-1) == class_ids(labels)).mean())


def _compare_int8(comparison, float_out, int8_out, labels):
    comparison.top1_agreement = float(
        (float_out.argmax(-1) == int8_out.argmax(-1)).mean())
    if labels is not None:
        comparison.float_accuracy = _accuracy(float_out, labels)
        comparison.int8_accuracy = _accuracy(int8_out, labels)


# --- the chain ---------------------------------------------------------------

def export_onnx(model, path, *, opset=None, verify=True, tolerance=None,
                batch_size=None, quantize=None, calibration=None,
                precision="float32", labels=None):
    """Exports `model` to ONNX with its normalization folded, on Keras's
    TensorFlow backend (tf2onnx) or PyTorch backend (torch.onnx's dynamo
    exporter).

    Folds every normalization layer it can into the producing Conv / Dense
    layer (`fold`), converts with the backend's exporter, cleans the graph
    the same way for every exporter (constants folded, the per-channel Mul
    / Add still next to a Conv / Gemm folded in: those inside custom
    layers; NCHW / NHWC Transposes cancelled), keeps the input and output
    names, leaves the batch dimension dynamic, and writes `path`
    atomically (nothing is left behind on failure). With `verify`, runs
    the file in onnxruntime and compares it with the Keras model in
    inference mode, before the file takes the name `path`: the outputs,
    the logits before a final softmax / sigmoid (where saturated outputs
    would hide a wrong fold), and top-1 agreement. A file onnxruntime
    cannot run, or whose outputs or logits differ by more than `tolerance`
    of their scale, never appears there.

    Args:
        model: A Keras model (BatchNormalization or BatchRenormalization
            layers, nested models, several inputs / outputs).
        path: Where to write the `.onnx` file.
        opset: ONNX opset from `MIN_OPSET` to `MAX_OPSET` (9 to 18); the
            exporter's default when None.
        verify: True (standard-normal random inputs), False, or the inputs
            to verify on: an array (a list of arrays for several inputs) as
            the model takes them, e.g. real, preprocessed images.
        tolerance: Largest relative difference (of the output scale, and of
            the logits' scale) verification accepts; None:
            `VERIFY_TOLERANCE`, or `FLOAT16_TOLERANCE` for float16.
        batch_size: A fixed batch dimension (as TensorRT or OpenCV want);
            dynamic when None.
        quantize: "int8": static quantization of the folded float model
            with onnxruntime.quantization (QDQ, per-channel int8 weights,
            uint8 activations), calibrated on `calibration`; the report
            compares it with the float model on the verification inputs.
        calibration: Real inputs (as `verify` takes them) for "int8".
        precision: "float16": weights and compute in float16 with float32
            inputs and outputs (onnxruntime.transformers.float16); for GPU
            runtimes (CPUs run float16 slowly).
        labels: Class labels of `verify`'s inputs: the report then gives
            the accuracy of the float (and int8) file.

    Returns:
        An `ExportReport`.

    Raises:
        ExportError: a bad argument, a model the exporter cannot convert,
            a file onnxruntime cannot run, or one that fails verification
            (then nothing is written).
        BackendError: a backend without an exporter (JAX: export the saved
            `.keras` file on PyTorch or TensorFlow), or a missing exporter
            package.
    """
    request = _check_arguments(model, opset, verify, tolerance, batch_size,
                               quantize, calibration, precision, labels)
    model, plan, folded, reference = _prepare(model, request)
    onnx_model = to_onnx(folded, opset=opset, batch_size=batch_size,
                         names_from=model)
    del folded
    onnx_model, cleanup = clean(onnx_model)
    report = ExportReport(
        path=str(path), opset=_opset(onnx_model),
        exporter=exporters.exporter(), folded=len(plan.folded),
        unfolded=dict(plan.unfolded), op_counts=op_counts(onnx_model),
        input_names=[i.name for i in onnx_model.graph.input],
        output_names=[o.name for o in onnx_model.graph.output],
        graph=cleanup)
    payloads = _with_precision(onnx_model, request, report, reference)
    del onnx_model
    replace_atomically(path, lambda tmp: _write_and_verify(
        tmp, path, payloads, request, reference, report))
    return report


def _opset(onnx_model):
    return int(next(o.version for o in onnx_model.opset_import
                    if o.domain in ("", "ai.onnx")))


# --- inputs ------------------------------------------------------------------

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


def check_opset(opset):
    """Refuses an opset outside what the exporters and onnxruntime support
    here."""
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or (
            not MIN_OPSET <= int(opset) <= MAX_OPSET):
        raise ExportError(
            f"{{arg}}: expected an ONNX opset from {MIN_OPSET} to "
            f"{MAX_OPSET} (what the exporters and onnxruntime support "
            "here).", "opset", opset)
