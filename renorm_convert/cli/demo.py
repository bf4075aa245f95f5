"""The main job on the embedded default: load the reference Inception-style
Fashion-MNIST model, convert it, fine-tune it briefly with small
microbatches under the renorm schedule, export it to ONNX with folded
statistics (on TensorFlow or PyTorch; on JAX it says how), verify it with
onnxruntime, and print a summary. Every accuracy is top-1 on the same
validation images. Artifacts go to --out."""

import os
import time

from renorm_convert.cli import _args, progress
from renorm_convert.cli._args import EXIT_OK
from renorm_convert.cli._common import default_model_path, load_model
from renorm_convert.cli._paths import check_outputs
from renorm_convert.errors import RenormConvertError

HELP = "the main job on the embedded reference model"

FILES = ("converted.keras", "finetuned.keras", "finetuned.onnx",
         "history.csv", "history.steps.csv", "history.json", "history.png")


def add_arguments(p):
    p.add_argument("--out", default=os.path.join("runs", "demo"),
                   metavar="DIR", help="where the artifacts go")
    p.add_argument("--model", metavar="FILE",
                   help="another .keras / .h5 model (default: the reference "
                        "Inception-style Fashion-MNIST model)")
    _args.data(p, default="fashion-mnist")
    g = _args.training(p, lr=3e-4, momentum=0.9)
    _args.microbatch(g, default=4)
    _args.sizes(p, train=6000, val=2000)
    _args.seed(p)
    _args.model_loading(p)


def check(args):
    from renorm_convert.data import check_source, source_path

    path = args.model or default_model_path()
    check_outputs([("--out", args.out, "logdir")] + [
        ("--out", os.path.join(args.out, name), "file")
        for name in FILES if os.path.isdir(args.out)],
        [("model", path), ("data", source_path(args.data))])
    if not os.path.exists(path):
        raise RenormConvertError(
            f"{path}: the reference model is missing from this "
            "installation; reinstall renorm_convert, or pass "
            "--model FILE.")
    check_source(args.data)


def run(args):
    import keras

    import renorm_convert as rc
    from renorm_convert.evaluation import accuracy
    from renorm_convert.io import save_atomically
    from renorm_convert.train import callbacks as cb

    started = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    path = args.model or default_model_path()
    model = load_model(args, path)
    split = rc.data.load_source(args.data).subset(
        train=args.train_size, val=args.val_size, seed=0)
    report = rc.convert_plan(model)
    converted = rc.convert(model, microbatch_size=args.microbatch_size)
    del model
    save_atomically(converted, os.path.join(args.out, "converted.keras"))
    tuned = rc.configure(converted, momentum=args.momentum, inplace=True)
    batches = rc.data.training_batches(split, tuned, args.batch_size,
                                       seed=args.seed)
    validation = rc.data.evaluation_batches(split, tuned)
    curve = cb.ValidationCurve(validation, batches.num_batches,
                               size=len(split.y_val))
    records = cb.RunRecords(os.path.join(args.out, "history"),
                            plot=os.path.join(args.out, "history.png"),
                            curve=curve, title="renorm-convert demo")
    progress(f"converted {len(report.swapped)} layers; fine-tuning "
             f"{args.epochs} epoch(s) on {len(split.y_train)} examples, "
             f"microbatches of {args.microbatch_size} (Keras backend: "
             f"{keras.backend.backend()})")
    result = rc.fine_tune(tuned, batches, validation=validation,
                          epochs=args.epochs, learning_rate=args.lr,
                          callbacks=[curve, records], verbose=2, inplace=True)
    before = curve.points[0]["val_accuracy"]
    after = accuracy(tuned, split)
    save_atomically(tuned, os.path.join(args.out, "finetuned.keras"))
    where = f"on {len(split.y_val)} validation images"
    rows = [
        ("model", f"{os.path.basename(path)} ({_trainable(tuned):,} "
                  f"trainable parameters)"),
        ("Keras backend", keras.backend.backend()),
        ("layers converted", f"{len(report.swapped)} BatchNormalization "
                             "-> BatchRenormalization"),
        ("accuracy before fine-tuning", f"{100 * before:.2f}% ({where})"),
        ("accuracy after fine-tuning", f"{100 * after:.2f}% ({args.epochs} "
                                       f"epoch, microbatch "
                                       f"{args.microbatch_size})"),
        ("final r_max / d_max", "{:.2f} / {:.2f}".format(
            *result.final_bounds)),
    ]
    export = _export(tuned, split, args.out)
    if isinstance(export, str):
        rows.append(("ONNX export", export))
    rows += [("artifacts", args.out),
             ("total time", f"{time.perf_counter() - started:.0f} s")]
    width = max(len(k) for k, _ in rows)
    print("\nrenorm-convert demo")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if not isinstance(export, str):
        print("\nONNX export")
        for line in export.describe().splitlines():
            print(f"  {line}")
    for name, why in records.errors.items():
        print(f"renorm-convert demo: error: could not write {name} ({why})")
    return EXIT_OK


def _export(tuned, split, out):
    """The fine-tuned model exported to `out`/finetuned.onnx and verified
    on the validation images: the `ExportReport`, or why it was skipped
    (a backend without an exporter)."""
    import keras

    import renorm_convert as rc
    from renorm_convert.errors import BackendError
    from renorm_convert.onnx.exporters import check_backend, exporter

    try:
        check_backend()
    except BackendError as e:
        if keras.backend.backend() != "jax":
            return f"skipped: {e}"
        saved = os.path.join(out, "finetuned.keras")
        return ("skipped on JAX; export the saved file on PyTorch (or "
                "TensorFlow): KERAS_BACKEND=torch renorm-convert export "
                f"{saved} -o {os.path.join(out, 'finetuned.onnx')}")
    progress(f"exporting to ONNX with {exporter()}")
    x, y = split.inputs_for(tuned)
    return rc.export_onnx(tuned, os.path.join(out, "finetuned.onnx"),
                          verify=x, labels=y)


def _trainable(model):
    import numpy as np

    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)

