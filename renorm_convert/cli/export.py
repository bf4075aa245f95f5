"""Export MODEL to ONNX with every foldable normalization folded into the
preceding Conv/Dense layer, and (unless --no-verify) check the file with
onnxruntime against Keras before it takes its name: outputs, and logits
before a final softmax / sigmoid, within --tolerance of their scale, and
top-1 agreement; on real images with --data SOURCE, else on random inputs.
A model without normalization is exported as it is (with a notice).
Export runs on Keras's TensorFlow backend (tf2onnx) and PyTorch backend
(torch.onnx's dynamo exporter), with the same clean-up and checks; on JAX,
export the same .keras file with KERAS_BACKEND=torch or tensorflow."""

import time

from renorm_convert.cli import _args, progress
from renorm_convert.cli._args import EXIT_OK
from renorm_convert.cli._common import check_model_path, load_model
from renorm_convert.cli._paths import check_output
from renorm_convert.errors import RenormConvertError

HELP = "ONNX with folded normalization, verified"


def add_arguments(p):
    _args.model_input(p)
    _args.output(p, ".onnx")
    _args.option(p, "--opset", type=_args.opset,
                 help="ONNX opset (the exporter's default when omitted: 15 "
                      "for tf2onnx; PyTorch's exporter writes 18 and above, "
                      "20 by default)")
    _args.option(p, "--fixed-batch", type=_args.integer(1), metavar="N",
                 argument="batch_size", shown="--fixed-batch N",
                 help="give the ONNX file a fixed batch dimension of N (as "
                      "TensorRT or OpenCV want; default: dynamic)")
    g = p.add_argument_group("verification")
    _args.option(g, "--no-verify", action="store_true", argument="verify",
                 help="skip the onnxruntime-versus-Keras check")
    _args.data(g, what="verify on real images from this source, resized and "
                       "scaled as finetune prepares them (default: random "
                       "inputs)")
    g.add_argument("--verify-size", type=_args.integer(1), default=64,
                   metavar="N",
                   help="validation images to verify on, with --data")
    _args.option(g, "--tolerance", type=_args.number(above=0.0),
                 default=None,
                 help="largest difference accepted, as a fraction of the "
                      "output scale (default: 1e-3; 2e-2 with --float16)")
    _args.scaling(g)
    g = p.add_argument_group("precision")
    kind = g.add_mutually_exclusive_group()
    _args.option(kind, "--int8", action="store_true", argument="quantize",
                 help="static int8 quantization calibrated on --data's "
                      "training images; compared with the float model on "
                      "its validation images")
    _args.option(kind, "--float16", action="store_true",
                 argument="precision",
                 help="float16 weights and compute, float32 inputs and "
                      "outputs, for GPU runtimes (slow on CPUs)")
    g.add_argument("--calibration-size", type=_args.integer(1), default=256,
                   metavar="N", help="training images to calibrate --int8 on")
    _args.option(p, "--recalibrate", type=_args.integer(1), metavar="N",
                 argument="batches",
                 help="first set the normalization statistics to exact "
                      "averages over N batches of 32 training images from "
                      "--data (\"precise BN\")")


def check(args):
    import renorm_convert.data as data_lib
    from renorm_convert._internal.limits import keras_backend
    from renorm_convert.onnx.exporters import check_backend, check_opset

    if args.recalibrate and not args.data:
        raise RenormConvertError("--recalibrate needs --data SOURCE: the "
                                 "images whose batches give the statistics")
    if args.int8 and not args.data:
        raise RenormConvertError("--int8 needs --data SOURCE: real images to "
                                 "calibrate the activation ranges on (e.g. "
                                 "--data fashion-mnist)")
    inputs = [args.model] + [p for p in [data_lib.source_path(args.data)]
                             if p]
    check_output(args.output, inputs, (".onnx",))
    check_model_path(args.model)
    if args.data:
        data_lib.check_source(args.data)
    check_backend(keras_backend())
    check_opset(args.opset, keras_backend())


def run(args):
    import renorm_convert as rc
    from renorm_convert import data as data_lib
    from renorm_convert.layers import is_normalization
    from renorm_convert.onnx.exporters import exporter

    model = load_model(args)
    if not any(is_normalization(layer) for layer in rc.iter_layers(model)):
        progress(f"notice: {args.model} has no normalization layer; "
                 "exporting it as it is")
    split = None
    if args.data:
        split = data_lib.load_source(args.data).with_scaling(args.scaling)
    if args.recalibrate:
        # The library says on how many batches (a progress line).
        model = rc.recalibrate(model, split, batches=args.recalibrate)
    verify, labels, calibration = not args.no_verify, None, None
    if split is not None:
        part = split.subset(train=args.calibration_size if args.int8 else None,
                            val=args.verify_size, seed=0)
        if args.int8:
            calibration, _ = part.inputs_for(model, part="train")
        if verify:
            if not len(part.y_val):
                raise RenormConvertError(f"--data {args.data}: no "
                                         "validation examples to verify on")
            verify, labels = part.inputs_for(model)
    progress(f"folding and converting with {exporter()}"
             + (", then quantizing to int8" if args.int8 else ""))
    start = time.perf_counter()
    report = rc.export_onnx(
        model, args.output, opset=args.opset, verify=verify,
        tolerance=args.tolerance, batch_size=args.fixed_batch,
        quantize="int8" if args.int8 else None, calibration=calibration,
        labels=labels, precision="float16" if args.float16 else "float32")
    print(report.describe(time.perf_counter() - start))
    return EXIT_OK

