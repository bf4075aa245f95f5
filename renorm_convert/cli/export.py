"""Export MODEL to ONNX with every foldable normalization folded into the
preceding Conv/Dense layer, and (unless --no-verify) check the file with
onnxruntime against Keras before it takes its name: outputs, and logits
before a final softmax / sigmoid, within --tolerance of their scale, and
top-1 agreement; on real images with --data SOURCE, else on random inputs.
A model without normalization is exported as it is (with a notice).
Export runs on Keras's TensorFlow backend (tf2onnx); a .keras file trained
on another backend exports here unchanged."""

import time

from renorm_convert.cli import _args, progress
from renorm_convert.cli._args import EXIT_OK
from renorm_convert.cli._common import check_model_path, load_model
from renorm_convert.cli._paths import PathError, check_output

HELP = "ONNX with folded normalization, verified"


def add_arguments(p):
    _args.model_input(p)
    _args.output(p, ".onnx")
    p.add_argument("--opset", type=_args.opset, help="ONNX opset (tf2onnx's "
                   "default when omitted)")
    p.add_argument("--fixed-batch", type=_args.integer(1), metavar="N",
                   help="give the ONNX file a fixed batch dimension of N (as "
                        "TensorRT or OpenCV want; default: dynamic)")
    g = p.add_argument_group("verification")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the onnxruntime-versus-Keras check")
    _args.data(g, what="verify on real images from this source, resized and "
                       "scaled as finetune prepares them (default: random "
                       "inputs)")
    g.add_argument("--verify-size", type=_args.integer(1), default=64,
                   metavar="N",
                   help="validation images to verify on, with --data")
    g.add_argument("--tolerance", type=_args.number(above=0.0), default=None,
                   help="largest difference accepted, as a fraction of the "
                        "output scale (default: 1e-3; 2e-2 with --float16)")
    _args.scaling(g)
    g = p.add_argument_group("precision")
    kind = g.add_mutually_exclusive_group()
    kind.add_argument("--int8", action="store_true",
                      help="static int8 quantization calibrated on --data's "
                           "training images; compared with the float model "
                           "on its validation images")
    kind.add_argument("--float16", action="store_true",
                      help="float16 weights and compute, float32 inputs and "
                           "outputs, for GPU runtimes (slow on CPUs)")
    g.add_argument("--calibration-size", type=_args.integer(1), default=256,
                   metavar="N", help="training images to calibrate --int8 on")
    p.add_argument("--recalibrate", type=_args.integer(1), metavar="N",
                   help="first set the normalization statistics to exact "
                        "averages over N batches of 32 training images "
                        "from --data (\"precise BN\")")


def check(args):
    import renorm_convert.data as data_lib
    from renorm_convert._internal.limits import keras_backend
    from renorm_convert.errors import BackendError

    if args.recalibrate and not args.data:
        raise PathError("--recalibrate needs --data SOURCE: the images whose "
                        "batches give the statistics")
    if args.int8 and not args.data:
        raise PathError("--int8 needs --data SOURCE: real images to calibrate "
                        "the activation ranges on (e.g. --data fashion-mnist)")
    inputs = [args.model] + [p for p in [data_lib.source_path(args.data)]
                             if p]
    check_output(args.output, inputs, (".onnx",))
    check_model_path(args.model)
    if args.data:
        data_lib.check_source(args.data)
    backend = keras_backend()
    if backend != "tensorflow":
        raise BackendError(
            f"ONNX export (tf2onnx) needs Keras's TensorFlow backend; this "
            f"one is {backend} (KERAS_BACKEND). .keras files load on every "
            "backend: export this same file with KERAS_BACKEND=tensorflow "
            "where TensorFlow is installed.")


def run(args):
    import renorm_convert as rc
    from renorm_convert import data as data_lib
    from renorm_convert.onnx.export import VERIFY_TOLERANCE, FLOAT16_TOLERANCE

    from renorm_convert.layers import is_normalization

    model = load_model(args)
    if not any(is_normalization(layer) for layer in rc.iter_layers(model)):
        progress(f"notice: {args.model} has no normalization layer; "
                 "exporting it as it is")
    split = None
    if args.data:
        split = data_lib.load_source(args.data).with_scaling(args.scaling)
    if args.recalibrate:
        model, used = rc.recalibrate(model, split, batches=args.recalibrate,
                                     report=True)
        progress(f"recalibrated the normalization statistics on {used} "
                 f"batches of {args.data}")
    verify, labels, calibration = not args.no_verify, None, None
    if split is not None:
        part = split.subset(train=args.calibration_size if args.int8 else None,
                            val=args.verify_size, seed=0)
        if args.int8:
            calibration, _ = part.inputs_for(model, part="train")
        if verify:
            if not len(part.y_val):
                raise PathError(f"--data {args.data}: no validation "
                                "examples to verify on")
            verify, labels = part.inputs_for(model)
    tolerance = args.tolerance or (FLOAT16_TOLERANCE if args.float16
                                   else VERIFY_TOLERANCE)
    progress("folding and converting with tf2onnx"
             + (", then quantizing to int8" if args.int8 else ""))
    start = time.perf_counter()
    report = rc.export_onnx(
        model, args.output, opset=args.opset, verify=verify,
        tolerance=tolerance, batch_size=args.fixed_batch,
        quantize="int8" if args.int8 else None, calibration=calibration,
        labels=labels, precision="float16" if args.float16 else "float32")
    print(format_report(report, time.perf_counter() - start))
    return EXIT_OK


def format_report(report, elapsed=None):
    lines = [f"wrote {report.path} ({report.file_size / 1e6:.2f} MB, opset "
             f"{report.opset}" + (f", {elapsed:.1f} s)" if elapsed else ")")]
    lines.append(f"folded {report.folded} normalization layers into their "
                 f"Conv/Dense; {len(report.unfolded)} kept as per-channel "
                 "scale-and-offset")
    if report.folded_onnx:
        lines.append(f"then folded {report.folded_onnx} per-channel "
                     "Mul/Add node(s) into the Conv/Gemm next to them in the "
                     "ONNX graph (what Keras could not reach, e.g. inside "
                     "custom layers)")
    for path, reason in report.unfolded.items():
        lines.append(f"  not folded: {path}: {reason}")
    ops = ", ".join(f"{k} {v}" for k, v in report.op_counts.items())
    lines.append(f"ONNX ops: {ops}")
    if report.max_abs_diff is not None:
        lines.append(f"onnxruntime vs Keras on {report.verified_on}: max abs "
                     f"diff {report.max_abs_diff:.3g} "
                     f"({report.relative_diff:.3g} of the output scale; "
                     f"folding {report.fold_max_abs_diff:.2g}, conversion "
                     f"{report.onnx_max_abs_diff:.2g})")
        if report.logits_max_abs_diff is not None:
            lines.append(f"  logits before the final activation: "
                         f"{report.logits_relative_diff:.3g} of their scale")
        if report.top1_agreement is not None:
            lines.append(f"  same top-1 on {100 * report.top1_agreement:.1f}%"
                         f" of the inputs; tolerance {report.tolerance:g}")
        if report.float_accuracy is not None and not report.quantized:
            lines.append(f"  accuracy on them: "
                         f"{100 * report.float_accuracy:.2f}%")
    if report.precision == "float16":
        lines.append("float16 weights and compute (float32 inputs and "
                     "outputs); meant for GPU runtimes, slow on CPUs")
    if report.quantized == "int8":
        lines.append(f"int8: {report.file_size / 1e6:.2f} MB (float "
                     f"{report.float_file_size / 1e6:.2f} MB)")
        if report.int8_top1_agreement is not None:
            lines.append(f"  same top-1 as the float model on "
                         f"{100 * report.int8_top1_agreement:.1f}% of the "
                         "verification inputs")
        if report.int8_accuracy is not None:
            lines.append(f"  accuracy: int8 {100 * report.int8_accuracy:.2f}%"
                         f", float {100 * report.float_accuracy:.2f}%")
        lines.append("  (latency: benchmarks/quantize.py)")
    return "\n".join(lines)
