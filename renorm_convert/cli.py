"""renorm-convert: Batch Renormalization for existing Keras models.

Convert every BatchNormalization of a Keras model to BatchRenormalization
(keeping all weights and statistics), fine-tune it with the paper's r_max /
d_max schedule, and export it to ONNX with the normalization folded away.

Exit status: 0 success, 2 bad input or usage (one line says what and how to
fix it), 1 internal error.
"""

import argparse
import functools
import json
import os
import re
import sys
import time

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2

CHANNELS_FIRST_ON_CPU = (
    "the model has channels_first layers, which TensorFlow cannot run on "
    "this CPU while oneDNN is off (its default on CPUs without AVX-512); "
    "rerun with TF_ENABLE_ONEDNN_OPTS=1 in the environment, or on a GPU")


def _quiet_tensorflow():
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


def _progress(message):
    print(f"[renorm-convert] {message}", file=sys.stderr, flush=True)


def _load(args, path=None):
    from renorm_convert.io import load

    if getattr(args, "unsafe", False):
        _progress("warning: --unsafe: Python code in Lambda layers of the file "
                  "will run.")
    custom = import_custom_objects(getattr(args, "custom_objects", None))
    path = path or args.model
    _progress(f"loading {path}")
    return load(path, safe_mode=not getattr(args, "unsafe", False),
                custom_objects=custom)


def _layer_options(args):
    options = {}
    for key in ("r_max", "d_max", "renorm_momentum", "microbatch"):
        value = getattr(args, key, None)
        if value is not None:
            options["microbatch_size" if key == "microbatch" else key] = value
    return options


def _parity(reference, other, model):
    """Max abs inference difference on random inputs, and relative to the
    output scale."""
    import numpy as np

    from renorm_convert.export import sample_inputs

    xs = sample_inputs(model, batch=4)
    xs = xs[0] if len(xs) == 1 else xs
    import keras

    a = keras.tree.flatten(reference(xs, training=False))
    b = keras.tree.flatten(other(xs, training=False))
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(a, b))
    scale = max(float(np.abs(np.asarray(x)).max()) for x in a)
    return diff, diff / max(scale, 1e-12)


# --- subcommands ------------------------------------------------------------------

def cmd_inspect(args):
    """List every normalization layer of MODEL: its path, the layer producing
    its input, channels, and whether it can be folded for export (into its
    producer, or forward into the Conv / Dense layers consuming it)."""
    import renorm_convert as rc
    from renorm_convert.fold import fold_plan
    from renorm_convert.graph import GraphError

    model = _load(args)
    try:
        plan = fold_plan(model)
    except GraphError as e:
        raise _usage(str(e))
    rows = [{
        "path": p["path"],
        "class": type(p["layer"]).__name__,
        "producer": p["producer"],
        "channels": p["channels"],
        "foldable": p["foldable"],
        "into": p["into"],
        "consumers": p["consumers"],
        "reason": p["reason"],
    } for p in plan]
    totals = {
        "normalization_layers": len(rows),
        "batch_normalization": sum(r["class"] == "BatchNormalization"
                                   for r in rows),
        "batch_renormalization": sum(r["class"] == "BatchRenormalization"
                                     for r in rows),
        "foldable": sum(r["foldable"] for r in rows),
        "layers": len(list(rc.iter_layers(model))),
        "parameters": int(model.count_params()),
    }
    if args.json:
        print(json.dumps({"model": model.name, "layers": rows,
                          "totals": totals}, indent=2))
        return EXIT_OK
    width = max([len(r["path"]) for r in rows] + [4])
    pwidth = max([len(r["producer"]) for r in rows] + [8])
    print(f"{'path':<{width}}  {'class':<20}  {'producer':<{pwidth}}  "
          f"{'channels':>8}  foldable")
    for r in rows:
        fold = (f"no: {r['reason']}" if not r["foldable"]
                else "yes" if r["into"] == "producer"
                else "yes, forward into " + ", ".join(r["consumers"]))
        print(f"{r['path']:<{width}}  {r['class']:<20}  "
              f"{r['producer']:<{pwidth}}  {r['channels']:>8}  {fold}")
    print(f"\n{totals['normalization_layers']} normalization layers "
          f"({totals['batch_normalization']} BatchNormalization, "
          f"{totals['batch_renormalization']} BatchRenormalization), "
          f"{totals['foldable']} foldable; {totals['layers']} layers, "
          f"{totals['parameters']:,} parameters.")
    return EXIT_OK


def cmd_convert(args):
    """Swap every BatchNormalization of MODEL for a BatchRenormalization that
    keeps all its weights and statistics; write the result to -o OUT.keras and
    print the measured inference parity."""
    import renorm_convert as rc
    from renorm_convert.io import save_atomically

    check_output(args.output, [args.model], (".keras",))
    model = _load(args)
    _progress("converting")
    start = time.perf_counter()
    try:
        converted = rc.convert(model, include=args.include,
                               exclude=args.exclude, **_layer_options(args))
    except ValueError as e:
        raise _usage(str(e))
    elapsed = time.perf_counter() - start
    if not converted.renorm_converted:
        already = len(rc.schedule.renorm_layers(model))
        hint = (f" ({already} are BatchRenormalization already)"
                if already else "")
        selection = " matching --include/--exclude" if (
            args.include or args.exclude) else ""
        raise _usage(f"{args.model}: no BatchNormalization layer{selection} "
                     f"to convert{hint}; nothing written.")
    diff, rel = _parity(model, converted, model)
    save_atomically(converted, args.output)
    print(f"converted {len(converted.renorm_converted)} BatchNormalization "
          f"layers to BatchRenormalization in {elapsed:.2f} s")
    print(f"inference parity: max abs diff {diff:.3g} "
          f"({rel:.3g} of the output scale)")
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_revert(args):
    """Turn every BatchRenormalization of MODEL back into a plain
    BatchNormalization (current moving statistics), so the model can be used
    without this package; write it to -o OUT.keras."""
    import renorm_convert as rc
    from renorm_convert.io import save_atomically

    check_output(args.output, [args.model], (".keras",))
    model = _load(args)
    reverted = rc.revert(model)
    if not reverted.renorm_reverted:
        raise _usage(f"{args.model}: no BatchRenormalization layer to revert; "
                     "nothing written.")
    diff, rel = _parity(model, reverted, model)
    save_atomically(reverted, args.output)
    print(f"reverted {len(reverted.renorm_reverted)} layers to "
          "BatchNormalization")
    print(f"inference parity: max abs diff {diff:.3g} "
          f"({rel:.3g} of the output scale)")
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_export(args):
    """Export MODEL to ONNX with every foldable normalization folded into the
    preceding Conv/Dense layer, and (unless --no-verify) check the file with
    onnxruntime against Keras."""
    import renorm_convert as rc
    from renorm_convert import data as data_lib

    inputs = [args.model] + [p for p in [data_lib.source_path(args.data)]
                             if p]
    check_output(args.output, inputs, (".onnx",))
    model = _load(args)
    if args.recalibrate and not args.data:
        raise _usage("--recalibrate needs --data SOURCE: the images whose "
                     "batches give the statistics")
    if args.recalibrate:
        split = data_lib.load_source(args.data)
        model = rc.recalibrate(model, split, batches=args.recalibrate,
                               scaling=args.scaling)
        _progress(f"recalibrated the normalization statistics on "
                  f"{model.recalibrated_batches} batches of {args.data}")
    if args.int8 and not args.data:
        raise _usage("--int8 needs --data SOURCE: real images to calibrate "
                     "the activation ranges on (e.g. --data fashion-mnist)")
    verify, labels, calibration = not args.no_verify, None, None
    if args.data:
        split = data_lib.load_source(args.data).subset(
            train=args.calibration_size if args.int8 else None,
            val=args.verify_size, seed=0)
        if args.int8:
            calibration, _ = split.inputs_for(model, part="train",
                                              scaling=args.scaling)
        if verify and not len(split.y_val):
            raise _usage(f"--data {args.data}: no validation examples to "
                         "verify on")
        if verify:
            verify, labels = split.inputs_for(model, scaling=args.scaling)
    _progress("folding and converting with tf2onnx"
              + (", then quantizing to int8" if args.int8 else ""))
    start = time.perf_counter()
    report = rc.export_onnx(
        model, args.output, opset=args.opset, verify=verify,
        batch_size=args.batch_size, quantize="int8" if args.int8 else None,
        calibration=calibration, labels=labels,
        precision="float16" if args.float16 else "float32")
    elapsed = time.perf_counter() - start
    print(format_export_report(report, elapsed))
    return EXIT_OK


def cmd_finetune(args):
    """Fine-tune MODEL (usually the output of `convert`) on real data with the
    paper's r_max / d_max relaxation schedule (scaled to the run), and write
    it to -o OUT.keras. Data sources: fashion-mnist[:DIR] (Debian's
    dataset-fashion-mnist), digits (scikit-learn), npz:PATH, or a directory
    with one sub-directory of images per class."""
    import renorm_convert as rc
    from renorm_convert import data as data_lib
    from renorm_convert.distribute import is_chief, make_strategy
    from renorm_convert.finetune import NonFiniteLoss, accuracy
    from renorm_convert.io import save_atomically

    _check_finetune_paths(args)
    # A multi-worker strategy must exist before TensorFlow's first op.
    strategy = make_strategy(args.strategy)
    chief = args.strategy != "multi-worker" or is_chief()
    split = data_lib.load_source(args.data).subset(
        train=args.train_size, val=args.val_size, seed=args.seed)
    data_lib.check_batching(split, args.batch_size, args.non_iid,
                            args.microbatch)
    model = _load(args)
    start_acc = None
    if not args.head and len(split.y_val):
        start_acc = accuracy(model, split, args.scaling)
        print(f"validation accuracy before: {start_acc:.4f}")
    _progress(f"fine-tuning on {split.name}: {len(split.y_train)} examples, "
              f"{args.epochs} epoch(s) of {len(split.y_train) // args.batch_size}"
              " steps")
    try:
        history = rc.fine_tune(
            model, split, epochs=args.epochs, batch_size=args.batch_size,
            optimizer=args.optimizer, learning_rate=args.lr, head=args.head,
            train_only=args.train_only, microbatch_size=args.microbatch,
            momentum=args.momentum,
            non_iid_classes=args.non_iid, scaling=args.scaling,
            mixed_precision=args.mixed_precision, jit_compile=args.xla,
            strategy=strategy, checkpoint_dir=args.checkpoint_dir,
            history_path=_history_prefix(args),
            plot=args.plot, tensorboard_dir=args.tensorboard,
            gradient_report_path=args.grad_report, seed=args.seed,
            verbose=2 if args.quiet_progress or not sys.stdout.isatty()
            else "auto", progress=_progress)
    except NonFiniteLoss as e:
        save_atomically(e.model, args.output)
        print(f"renorm-convert finetune: {e}; wrote that model to "
              f"{args.output}", file=sys.stderr)
        return EXIT_INTERNAL
    trained = history.trained_model
    if not chief:
        print("worker done (the chief writes the outputs)")
        return EXIT_OK
    if args.recalibrate:
        trained = rc.recalibrate(trained, split, batches=args.recalibrate,
                                 batch_size=args.batch_size,
                                 scaling=args.scaling)
        print(f"recalibrated the normalization statistics on "
              f"{trained.recalibrated_batches} batches of training data")
    save_atomically(trained, args.output)
    if args.checkpoint_dir:
        # Only now that the model is safely written: a run killed before
        # this point resumes from the checkpoint instead of starting over.
        from renorm_convert import checkpoint

        checkpoint.remove(args.checkpoint_dir)
    if len(split.y_val):
        end_acc = accuracy(trained, split, args.scaling)
        before = f"{start_acc:.4f} -> " if start_acc is not None else ""
        print(f"validation accuracy: {before}{end_acc:.4f}")
    if history.gradient_report:
        summary = history.gradient_report["summary"]
        print("mean |gradient|: " + ", ".join(
            f"{k} {v:.3g}" for k, v in summary.items()))
    steps = history.steps
    if steps:
        print(f"trained {steps[-1]['step']} steps; final r_max "
              f"{steps[-1].get('r_max', float('nan')):.2f}, d_max "
              f"{steps[-1].get('d_max', float('nan')):.2f}")
    failed = history.artifact_errors
    prefix = _history_prefix(args)
    written = [args.output]
    if prefix not in failed:
        written.append(prefix + ".csv/.steps.csv/.json")
    if args.plot and args.plot not in failed:
        written.append(args.plot)
    print("wrote " + ", ".join(written))
    for path, why in failed.items():
        print(f"renorm-convert finetune: error: could not write {path} "
              f"({why}); the model was written to {args.output}",
              file=sys.stderr)
    return EXIT_USAGE if failed else EXIT_OK


def _history_prefix(args):
    prefix = args.history or os.path.splitext(args.output)[0] + ".history"
    for suffix in (".csv", ".json"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return prefix


def _check_finetune_paths(args):
    """Every place the run writes, checked against the inputs and each other
    before any work: a mistake costs nothing, and a trained model is never
    lost to a path that was wrong from the start."""
    from renorm_convert import checkpoint
    from renorm_convert.data import source_path

    check_output(args.output, [args.model], (".keras",))
    prefix = _history_prefix(args)
    history_flag = "--history" if args.history else "-o (history)"
    outputs = [("-o", args.output, "file")] + [
        (history_flag, prefix + suffix, "file")
        for suffix in (".csv", ".steps.csv", ".json")]
    for flag, path, kind in (("--plot", args.plot, "file"),
                             ("--grad-report", args.grad_report, "file"),
                             ("--tensorboard", args.tensorboard, "logdir"),
                             ("--checkpoint-dir", args.checkpoint_dir, "dir")):
        if path:
            outputs.append((flag, path, kind))
    inputs = [("model", args.model), ("data", source_path(args.data))]
    check_outputs(outputs, inputs)
    if args.checkpoint_dir:
        try:
            checkpoint.check(args.checkpoint_dir)
        except checkpoint.CheckpointError as e:
            raise _usage(str(e).replace("checkpoint_dir=", "--checkpoint-dir "))


def cmd_reproduce(args):
    """Reproduce the paper's Figure 2 (microbatch) or Figure 3 (non-iid) at
    small scale on Fashion-MNIST: batch norm versus batch renorm from the same
    initialisation over several seeds; writes the validation-accuracy curves
    (CSV, JSON, PNG) to --out and prints the final accuracies next to the
    paper's. The defaults take about 3 (microbatch) and 7 (non-iid) minutes
    on 2 CPU cores; raise --steps / --seeds (and use a GPU) for full
    scale."""
    from renorm_convert import reproduce
    from renorm_convert.reporting import write_experiment

    config = reproduce.Config(
        experiment=args.experiment, steps=args.steps, seeds=args.seeds,
        batch_size=args.batch_size, microbatch=args.microbatch,
        classes_per_batch=args.classes_per_batch, eval_every=args.eval_every,
        model=args.model, data=args.data)
    if config.steps < config.eval_every:  # the default --steps too
        raise _usage(f"--steps ({config.steps}) must be at least "
                     f"--eval-every ({config.eval_every}).")
    os.makedirs(args.out, exist_ok=True)
    if config.experiment == "non-iid":
        from renorm_convert.data import check_batching, load_source

        check_batching(load_source(args.data), args.batch_size,
                       args.classes_per_batch)
    _progress(f"{args.experiment}: model {config.model}, {args.seeds} "
              f"seed(s) x 2 variants x {config.steps} steps")
    result = reproduce.run(config, progress=_progress)
    prefix = os.path.join(args.out, args.experiment.replace("-", "_"))
    files = write_experiment(result, prefix)
    paper = result["paper"]
    print(f"{args.experiment} ({paper['setup']} in the paper):")
    print(f"{'':14}{'this run (mean ± std)':>24}{'paper (ImageNet)':>20}")
    for variant in ("batch norm", "batch renorm"):
        f = result["final"][variant]
        print(f"{variant:14}{f['mean']:>17.2f} ± {f['std']:.2f}%"
              f"{paper[variant]:>19.1f}%")
    d = result["final"]["renorm minus norm, paired by seed"]
    print(f"renorm - norm, paired by seed: {d['mean']:+.2f} points, renorm "
          f"ahead in {d['wins']} of {d['seeds']} seeds (paper: "
          f"{paper['batch renorm'] - paper['batch norm']:+.1f})")
    print("wrote " + ", ".join(files))
    return EXIT_OK


def default_model_path():
    """The embedded reference model (models/inception_fmnist.keras)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(here), "models",
                        "inception_fmnist.keras")


def _maybe(value):
    return "n/a" if value is None else f"{value:.2g}"


DEMO_FILES = ("converted.keras", "finetuned.keras", "finetuned.onnx",
              "history.csv", "history.steps.csv", "history.json",
              "history.png")


def cmd_demo(args):
    """The main job on the embedded default: load the reference
    Inception-style Fashion-MNIST model, inspect and convert it, fine-tune it
    briefly with small microbatches under the renorm schedule, export it to
    ONNX with folded statistics, verify it with onnxruntime, and print a
    summary. Artifacts go to --out."""
    import numpy as np

    import renorm_convert as rc
    from renorm_convert.data import source_path
    from renorm_convert.io import save_atomically

    started = time.perf_counter()
    path = args.model or default_model_path()
    check_outputs([("--out", args.out, "logdir")] + [
        ("--out", os.path.join(args.out, name), "file")
        for name in DEMO_FILES if os.path.isdir(args.out)],
        [("model", path), ("data", source_path(args.data))])
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(path):
        raise _usage(f"{path}: the reference model is missing; build it with "
                     "`python models/build.py` or pass --model FILE.")
    model = _load(args, path)
    split = rc.data.load_source(args.data).subset(
        train=args.train_size, val=args.val_size, seed=0)

    converted = rc.convert(model, microbatch_size=args.microbatch)
    del model
    save_atomically(converted, os.path.join(args.out, "converted.keras"))
    before = rc.accuracy(converted, split)
    _progress(f"converted {len(converted.renorm_converted)} layers; "
              f"fine-tuning {args.epochs} epoch(s) on {len(split.y_train)} "
              f"examples, microbatches of {args.microbatch}")
    history = rc.fine_tune(
        converted, split, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, momentum=0.9,
        history_path=os.path.join(args.out, "history"),
        plot=os.path.join(args.out, "history.png"), seed=args.seed,
        verbose=2, copy=False)
    tuned = history.trained_model
    after = rc.accuracy(tuned, split)
    save_atomically(tuned, os.path.join(args.out, "finetuned.keras"))
    _progress("exporting to ONNX")
    x, y = split.inputs_for(tuned, 256)
    report = rc.export_onnx(tuned, os.path.join(args.out, "finetuned.onnx"),
                            verify=x, labels=y)
    trainable = sum(int(np.prod(w.shape)) for w in tuned.trainable_weights)
    rows = [
        ("model", f"{os.path.basename(path)} ({trainable:,} trainable "
                  f"parameters; {tuned.count_params():,} with the "
                  "normalization statistics)"),
        ("layers converted", f"{len(converted.renorm_converted)} "
                             "BatchNormalization -> BatchRenormalization"),
        ("accuracy before fine-tuning", f"{100 * before:.2f}% (converted)"),
        ("accuracy after fine-tuning", f"{100 * after:.2f}% ({args.epochs} "
                                       f"epoch, microbatch {args.microbatch})"),
        ("final r_max / d_max", f"{history.steps[-1]['r_max']:.2f} / "
                                f"{history.steps[-1]['d_max']:.2f}"),
        ("folded into Conv/Dense", f"{report.folded} of "
                                   f"{report.folded + len(report.unfolded)}"),
        ("ONNX BatchNormalization/Mul", f"{report.op_counts.get('BatchNormalization', 0)}"
                                        f" / {report.op_counts.get('Mul', 0)}"),
        ("ONNX parity (onnxruntime)",
         f"on {report.verified_on.replace('given', 'validation')}: logits "
         f"{_maybe(report.logits_relative_diff)}, outputs "
         f"{report.relative_diff:.2g} of their scale; same top-1 on "
         f"{100 * report.top1_agreement:.1f}% of them, accuracy "
         f"{100 * report.float_accuracy:.2f}%"),
        ("artifacts", args.out),
        ("total time", f"{time.perf_counter() - started:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nrenorm-convert demo")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return EXIT_OK


def format_export_report(report, elapsed=None):
    lines = [f"wrote {report.path} ({report.file_size / 1e6:.2f} MB, opset "
             f"{report.opset}" + (f", {elapsed:.1f} s)" if elapsed else ")")]
    lines.append(f"folded {report.folded} normalization layers into their "
                 f"Conv/Dense; {len(report.unfolded)} kept as per-channel "
                 "scale-and-offset")
    for path, reason in report.unfolded.items():
        lines.append(f"  not folded: {path}: {reason}")
    ops = ", ".join(f"{k} {v}" for k, v in report.op_counts.items())
    lines.append(f"ONNX ops: {ops}")
    if report.max_abs_diff is not None:
        lines.append(f"onnxruntime vs Keras on {report.verified_on}: max abs "
                     f"diff {report.max_abs_diff:.3g} "
                     f"({report.relative_diff:.3g} of the output scale)")
        if report.logits_max_abs_diff is not None:
            lines.append(f"  logits before the final activation: "
                         f"{report.logits_relative_diff:.3g} of their scale")
        if report.top1_agreement is not None:
            lines.append(f"  same top-1 on {100 * report.top1_agreement:.1f}%"
                         f" of the inputs; tolerance {report.tolerance:g}")
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
            lines.append(f"  onnxruntime latency on them: int8 "
                         f"{report.int8_latency_ms:.2f} ms, float "
                         f"{report.float_latency_ms:.2f} ms "
                         f"({report.int8_latency_ms / report.float_latency_ms:.2f}x)")
        if report.int8_accuracy is not None:
            lines.append(f"  accuracy: int8 {100 * report.int8_accuracy:.2f}%"
                         f", float {100 * report.float_accuracy:.2f}%")
    return "\n".join(lines)


# --- parser ---------------------------------------------------------------------

def _integer(minimum):
    """An argparse type: an integer >= minimum."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}; got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _number(minimum=None, maximum=None, *, above=None, below=None):
    """An argparse type: a finite float within the bounds given."""

    def parse(text):
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number; got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f"expected a finite number; got {text}")
        for bound, ok, words in ((minimum, lambda b: value >= b, ">="),
                                 (above, lambda b: value > b, ">"),
                                 (maximum, lambda b: value <= b, "<="),
                                 (below, lambda b: value < b, "<")):
            if bound is not None and not ok(bound):
                raise argparse.ArgumentTypeError(
                    f"expected a number {words} {bound}; got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _opset(text):
    from renorm_convert._limits import MAX_OPSET, MIN_OPSET  # no TensorFlow

    value = _integer(MIN_OPSET)(text)
    if value > MAX_OPSET:
        raise argparse.ArgumentTypeError(
            f"expected an opset from {MIN_OPSET} to {MAX_OPSET}; got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (what was wrong, and where the help is),
    exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see "
                              f"{self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default when it has one; option
    and command names get a wide column so that the lists do not wrap."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(
            100, max(80, _terminal_width())))

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False
                and default != argparse.SUPPRESS and action.option_strings
                and "default" not in text):
            text += " (default: %(default)s)"
        return text

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            # argparse measures the command names one indent short of
            # where it prints them, and then wraps the longest.
            longest = max(len(a.metavar or a.dest)
                          for a in action._get_subactions())
            self._action_max_length = max(
                self._action_max_length,
                longest + self._current_indent + 2 * self._indent_increment)


def _terminal_width():
    import shutil

    return shutil.get_terminal_size((100, 24)).columns - 2


class _Usage(Exception):
    pass


def _usage(message):
    return _Usage(message)


def import_custom_objects(modules):
    """Imports each `module.path` (which registers its classes) and returns
    the Keras layers, models and functions it defines, by class name."""
    import importlib
    import inspect

    import keras

    objects = {}
    for name in modules or ():
        try:
            module = importlib.import_module(name)
        except Exception as e:
            raise _usage(
                f"--custom-objects {name}: cannot import it ({type(e).__name__}"
                f": {e}). Give an importable module path (on PYTHONPATH)."
            ) from None
        for attr, value in vars(module).items():
            if inspect.isclass(value) and issubclass(
                value, (keras.layers.Layer, keras.losses.Loss,
                        keras.metrics.Metric)):
                objects[attr] = value
                # Files name registered classes as "package>Class".
                objects[keras.saving.get_registered_name(value)] = value
    return objects


# Output paths, checked for a person before any work: the messages name the
# flags.

def check_output(output, inputs, suffixes):
    """Refuses an output path that is an input (also through `..`, a
    symbolic or a hard link), is a directory, has the wrong suffix, or lies
    in a directory that does not exist or cannot be written."""
    output = str(output)
    if not output.lower().endswith(suffixes):
        raise _usage(
            f"-o {output}: the output name must end in {' or '.join(suffixes)}."
        )
    check_outputs([("-o", output, "file")],
                  [("model", path) for path in inputs])


def _real(path):
    return os.path.realpath(os.path.abspath(str(path)))


def _same(a, b):
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(path, directory):
    inner, outer = _real(path), _real(directory)
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_location(flag, path, kind):
    if kind == "file":
        if os.path.isdir(path):
            raise _usage(f"{flag} {path}: is a directory; give a file "
                         "name.")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise _usage(f"{flag} {path}: the directory {directory} does "
                         "not exist; create it first.")
    else:
        if os.path.exists(path) and not os.path.isdir(path):
            raise _usage(f"{flag} {path}: is a file, not a directory; "
                         "give a directory.")
        directory = os.path.abspath(path)
        while not os.path.exists(directory):
            directory = os.path.dirname(directory)
        if not os.path.isdir(directory):
            raise _usage(f"{flag} {path}: {directory} is a file, not a "
                         "directory.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise _usage(f"{flag} {path}: the directory {directory} is not "
                     "writable.")


def check_outputs(outputs, inputs=()):
    """Checks, before any work, every place a run will write.

    Args:
        outputs: (flag, path, kind) triples, kind "file", "dir" (a
            directory of the run's own, which must not hold an input or
            another output) or "logdir" (a directory the run adds files
            to, such as TensorBoard's).
        inputs: (what, path) pairs: model files, data files or folders.

    Raises:
        _Usage: an output is an input or holds one, two outputs collide,
            or a location is missing, of the wrong kind or not writable.
    """
    outputs = [(flag, str(path), kind) for flag, path, kind in outputs]
    inputs = [(what, str(path)) for what, path in inputs if path]
    for flag, path, kind in outputs:
        _check_location(flag, path, kind)
        for what, source in inputs:
            if _same(path, source):
                raise _usage(
                    f"{flag} {path}: is the input file {source} (the {what}); "
                    "give another output path (inputs are never "
                    "overwritten).")
            if kind == "dir" and _inside(source, path):
                raise _usage(
                    f"{flag} {path}: holds the input {source} (the {what}); "
                    "give a directory of its own.")
            if os.path.isdir(source) and _inside(path, source):
                raise _usage(
                    f"{flag} {path}: lies inside the input directory "
                    f"{source} (the {what}); write elsewhere.")
    for i, (flag, path, kind) in enumerate(outputs):
        for other_flag, other, other_kind in outputs[i + 1:]:
            if _same(path, other) or (kind == "dir" and _inside(other, path)) or (
                    other_kind == "dir" and _inside(path, other)):
                raise _usage(
                    f"{flag} {path} and {other_flag} {other}: would write "
                    "the same place; give each output its own path.")


def _add_load_options(p):
    p.add_argument("--unsafe", action="store_true",
                   help="allow Lambda layers' Python code in the file to run "
                        "(Keras's safe_mode=False); only for files you trust")
    p.add_argument("--custom-objects", metavar="MODULE", action="append",
                   help="import this module (e.g. mypkg.layers) so the custom "
                        "layers it defines can be loaded; repeatable")


def _add_layer_options(p):
    p.add_argument("--r-max", type=_number(), dest="r_max",
                   help="r is clipped to [1/r_max, r_max] (default 3)")
    p.add_argument("--d-max", type=_number(), dest="d_max",
                   help="d is clipped to [-d_max, d_max] (default 5)")
    p.add_argument("--renorm-momentum", type=_number(0.0, below=1.0),
                   dest="renorm_momentum",
                   help="momentum of the renorm statistics (default 0.99)")
    p.add_argument("--microbatch", type=_integer(1), metavar="M",
                   help="normalize groups of M examples separately in "
                        "training (the paper's microbatches)")


def _doc(func):
    return func.__doc__.strip()


# What `--data SOURCE` takes (renorm_convert.data.load_source).
_SOURCES = "fashion-mnist[:DIR], digits, npz:PATH, or an image directory"


def _per_experiment(name):
    from renorm_convert._limits import REPRODUCE_DEFAULTS  # no TensorFlow

    return ", ".join(f"{value[name]} for {experiment}"
                     for experiment, value in REPRODUCE_DEFAULTS.items())


def build_parser():
    from renorm_convert._limits import REPRODUCE_MODELS  # no TensorFlow

    parser = _Parser(
        prog="renorm-convert", description=__doc__, formatter_class=_Formatter)
    from renorm_convert import __version__

    parser.add_argument("--version", action="version",
                        version=f"renorm-convert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=_Parser)
    sub.add_parser = functools.partial(sub.add_parser,
                                       formatter_class=_Formatter)

    p = sub.add_parser("inspect", help="list normalization layers",
                       description=_doc(cmd_inspect))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_load_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="BatchNormalization -> "
                       "BatchRenormalization", description=_doc(cmd_convert))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.keras",
                   help="the output file (written atomically; never one of the inputs)")
    _add_layer_options(p)
    p.add_argument("--include", metavar="RE",
                   help="convert only layers whose name matches RE")
    p.add_argument("--exclude", metavar="RE",
                   help="do not convert layers whose name matches RE")
    _add_load_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("revert", help="BatchRenormalization -> "
                       "BatchNormalization", description=_doc(cmd_revert))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.keras",
                   help="the output file (written atomically; never one of the inputs)")
    _add_load_options(p)
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("export", help="ONNX with folded normalization",
                       description=_doc(cmd_export))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx",
                   help="the output file (written atomically; never one of the inputs)")
    p.add_argument("--opset", type=_opset, help="ONNX opset (tf2onnx's default "
                   "when omitted)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the onnxruntime-versus-Keras check")
    p.add_argument("--data", metavar="SOURCE",
                   help=f"verify on real images from this source "
                        f"({_SOURCES}), resized and scaled as finetune does "
                        "(default: random inputs)")
    p.add_argument("--verify-size", type=_integer(1), default=64, metavar="N",
                   help="validation images to verify on, with --data")
    p.add_argument("--batch-size", type=_integer(1), metavar="N",
                   help="a fixed batch dimension of N (as TensorRT or OpenCV "
                        "want; default: dynamic)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--int8", action="store_true",
                      help="static int8 quantization (QDQ, per-channel "
                           "weights) calibrated on --data's training images; "
                           "compared with the float model on its validation "
                           "images")
    kind.add_argument("--float16", action="store_true",
                      help="float16 weights and compute, float32 inputs and "
                           "outputs, for GPU runtimes (slow on CPUs)")
    p.add_argument("--calibration-size", type=_integer(1), default=256,
                   metavar="N", help="training images to calibrate --int8 on")
    p.add_argument("--recalibrate", type=_integer(1), metavar="N",
                   help="first set the normalization statistics to exact "
                        "averages over N batches of 32 training images "
                        "from --data (\"precise BN\")")
    p.add_argument("--scaling", choices=["unit", "symmetric", "raw"],
                   default="unit", help="pixel scaling the model expects, "
                   "with --data: unit [0,1], symmetric [-1,1], or raw [0,255]")
    _add_load_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", help="fine-tune with the renorm schedule",
                       description=_doc(cmd_finetune))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.keras",
                   help="the output file (written atomically; never one of the inputs)")
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help=_SOURCES)
    p.add_argument("--epochs", type=_integer(1), default=1,
                   help="passes over the training data")
    p.add_argument("--batch-size", type=_integer(1), default=32,
                   help="examples per training step")
    p.add_argument("--microbatch", type=_integer(1), metavar="M",
                   help="normalize groups of M examples separately")
    p.add_argument("--momentum", type=_number(0.0, below=1.0),
                   help="momentum of every normalization layer's moving "
                        "statistics (0.9 suits runs of a few thousand steps; "
                        "default: keep the model's)")
    p.add_argument("--non-iid", type=_integer(1), metavar="K",
                   help="each batch from K classes (the paper's Figure 3)")
    p.add_argument("--optimizer", default="adam",
                   help="Keras optimizer name: adam, rmsprop (the paper's), "
                        "sgd, ...")
    p.add_argument("--lr", type=_number(above=0.0), default=1e-3,
                   help="learning rate")
    p.add_argument("--head", type=_integer(1), metavar="N",
                   help="replace the classifier (the last Dense, or a Conv "
                   "followed only by pooling / flatten / reshape / activation "
                   "/ dropout) by a new one with N classes")
    p.add_argument("--train-only", choices=["norm"],
                   help="train only the normalization parameters")
    p.add_argument("--mixed-precision", choices=["float16", "bfloat16"],
                   help="compute in this type, keep weights and "
                        "normalization statistics in float32 (default: "
                        "float32 throughout)")
    p.add_argument("--xla", action="store_true", help="jit_compile the step")
    p.add_argument("--strategy", choices=["mirrored", "multi-worker"],
                   help="tf.distribute strategy (multi-worker reads TF_CONFIG)")
    p.add_argument("--checkpoint-dir", metavar="DIR",
                   help="back up every epoch here; rerunning the same command "
                        "resumes")
    p.add_argument("--plot", metavar="PNG", help="write the curves here")
    p.add_argument("--history", metavar="PREFIX",
                   help="history files prefix (default: OUT.history)")
    p.add_argument("--tensorboard", metavar="DIR", help="TensorBoard logs")
    p.add_argument("--grad-report", metavar="JSON",
                   help="print and save mean |gradient| of normalization "
                        "parameters versus other weights")
    p.add_argument("--scaling", choices=["unit", "symmetric", "raw"],
                   default="unit", help="pixel scaling the model expects: "
                   "unit [0,1], symmetric [-1,1], or raw [0,255]")
    p.add_argument("--train-size", type=_integer(1), metavar="N",
                   help="use N training examples (default all)")
    p.add_argument("--val-size", type=_integer(0), metavar="N",
                   help="use N validation examples (default all)")
    p.add_argument("--recalibrate", type=_integer(1), metavar="N",
                   help="after training, set the normalization statistics "
                        "to exact averages over N batches of the training "
                        "data (\"precise BN\"; default: keep the moving "
                        "averages)")
    p.add_argument("--seed", type=_integer(0), default=0,
                   help="seeds data order, subsets and initialization")
    p.add_argument("--quiet-progress", action="store_true",
                   help="one line per epoch instead of a progress bar")
    _add_load_options(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("demo", help="the main job on the embedded reference "
                       "model", description=_doc(cmd_demo))
    p.add_argument("--out", default=os.path.join("runs", "demo"),
                   metavar="DIR",
                   help="where the artifacts go")
    p.add_argument("--model", metavar="FILE",
                   help="another .keras / .h5 model (default: the reference "
                        "Inception-style Fashion-MNIST model)")
    p.add_argument("--data", default="fashion-mnist", metavar="SOURCE",
                   help=_SOURCES)
    p.add_argument("--epochs", type=_integer(1), default=1,
                   help="passes over the training subset")
    p.add_argument("--batch-size", type=_integer(1), default=32,
                   help="examples per training step")
    p.add_argument("--microbatch", type=_integer(1), default=4,
                   metavar="M", help="normalize groups of M examples "
                   "separately")
    p.add_argument("--lr", type=_number(above=0.0), default=3e-4,
                   help="learning rate")
    p.add_argument("--train-size", type=_integer(1), default=6000,
                   metavar="N", help="training examples used")
    p.add_argument("--val-size", type=_integer(1), default=2000,
                   metavar="N", help="validation examples used")
    p.add_argument("--seed", type=_integer(0), default=0,
                   help="seeds data order, subsets and initialization")
    _add_load_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("reproduce", help="the paper's Figure 2 / 3 at small "
                       "scale", description=_doc(cmd_reproduce))
    p.add_argument("experiment", choices=["microbatch", "non-iid"],
                   help="Figure 2 (microbatches) or Figure 3 (non-i.i.d. "
                        "batches)")
    p.add_argument("--out", default=os.path.join("runs", "reproduce"),
                   metavar="DIR",
                   help="where EXPERIMENT.csv / .json / .png go")
    p.add_argument("--steps", type=_integer(1), default=None,
                   help="training steps per run (default: "
                        + _per_experiment("steps") + ")")
    p.add_argument("--seeds", type=_integer(1), default=3,
                   help="runs per arm, each from its own initialization")
    p.add_argument("--batch-size", type=_integer(1), default=32,
                   help="examples per training step")
    p.add_argument("--microbatch", type=_integer(1), default=2,
                   help="examples per microbatch (microbatch experiment)")
    p.add_argument("--classes-per-batch", type=_integer(1), default=2,
                   help="classes in each batch (non-iid experiment; "
                        "Fashion-MNIST has 10)")
    p.add_argument("--eval-every", type=_integer(1), default=150,
                   metavar="STEPS", help="validate every STEPS steps")
    p.add_argument("--model", default=None, choices=list(REPRODUCE_MODELS),
                   help="the network: cnn-plain (3 blocks of one "
                        "convolution, pooled), cnn (2 blocks of two and a "
                        "normalized dense head), cnn-wide (cnn at width 32), "
                        "cnn-deep (3 blocks of two and a normalized dense "
                        "head); default: " + _per_experiment("model"))
    p.add_argument("--data", default="fashion-mnist", metavar="SOURCE",
                   help=_SOURCES)
    p.set_defaults(func=cmd_reproduce)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every `finally` (temporary
    files, partial outputs) runs before the process ends."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error
        return e.code
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    import renorm_convert

    renorm_convert._load()  # TensorFlow, only now that a command runs
    _quiet_tensorflow()
    from renorm_convert.convert import ConversionError
    from renorm_convert.data import DataError
    from renorm_convert.export import ExportError
    from renorm_convert.distribute import StrategyError
    from renorm_convert.finetune import FineTuneError
    from renorm_convert.io import UsageError

    from renorm_convert._logs import filtered_stderr

    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with filtered_stderr():
            return args.func(args)
    except (_Usage, UsageError, ConversionError, ExportError, DataError,
            FineTuneError, StrategyError) as e:
        print(f"renorm-convert {args.command}: error: "
              f"{_one_line(e, args.command)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"renorm-convert {args.command}: {what}; outputs not yet "
              "written were not written (temporary files removed)",
              file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except OSError as e:
        print(f"renorm-convert {args.command}: error: "
              f"{_one_line(e, args.command)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # an internal error: say so, briefly
        if os.environ.get("RENORM_CONVERT_DEBUG"):
            raise
        if "only supports the NHWC tensor format" in str(e):
            print(f"renorm-convert {args.command}: error: {CHANNELS_FIRST_ON_CPU}",
                  file=sys.stderr)
            return EXIT_USAGE
        print(f"renorm-convert {args.command}: internal error: "
              f"{_one_line(e, args.command)} (set RENORM_CONVERT_DEBUG=1 for "
              "the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# Library errors name Python arguments (`non_iid_classes=4`); a person at
# the command line reads the flag instead (`--non-iid 4`).
_FLAGS = {
    "non_iid_classes": "--non-iid", "batch_size": "--batch-size",
    "microbatch_size": "--microbatch", "head": "--head",
    "momentum": "--momentum", "learning_rate": "--lr",
    "mixed_precision": "--mixed-precision", "train_only": "--train-only",
    "strategy": "--strategy", "optimizer": "--optimizer",
    "checkpoint_dir": "--checkpoint-dir", "opset": "--opset",
    "seed": "--seed", "r_max": "--r-max", "d_max": "--d-max",
    "renorm_momentum": "--renorm-momentum",
}
_ARGUMENT = re.compile(r"(?<![\w.])(" + "|".join(_FLAGS) + r")=")


# Where a subcommand names an argument's flag otherwise.
_COMMAND_FLAGS = {"reproduce": {"non_iid_classes": "--classes-per-batch"}}


def as_flags(text, command=None):
    """`text` with the Python arguments it names written as `command`'s
    flags."""
    flags = {**_FLAGS, **_COMMAND_FLAGS.get(command, {})}
    text = text.replace("safe_mode=False", "--unsafe")
    text = re.sub(r"Import the module that defines it \((.*?)\) first, or "
                  r"pass custom_objects=\{name: class\}\.",
                  r"Pass --custom-objects your.module (a module that "
                  r"defines it, \1).", text)
    return _ARGUMENT.sub(lambda m: flags[m.group(1)] + (
        " " if m.end() < len(text) and text[m.end()] not in " ,." else ""),
        text)


def _one_line(error, command=None):
    text = as_flags(" ".join(str(error).split()), command)
    return text if len(text) <= 400 else text[:397] + "..."


if __name__ == "__main__":
    sys.exit(main())
