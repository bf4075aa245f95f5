"""Fine-tune MODEL (usually the output of `convert`) on real data and write it
to -o OUT.keras. Batch renormalization layers follow the paper's r_max / d_max
schedule fitted to the run (1 / 0 for a warm-up, then a linear ramp to
--final-r-max / --final-d-max), replacing the bounds the layers were saved
with; --schedule off keeps those. The layer settings it trains with are
printed first. Accuracies are top-1 on the same validation images before
and after. Runs on every Keras backend (KERAS_BACKEND)."""

import os
import sys

from renorm_convert.cli import _args, progress
from renorm_convert.cli._args import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE
from renorm_convert.cli._common import (check_model_path, load_model,
                                        training_split)
from renorm_convert.cli._paths import check_output, check_outputs
from renorm_convert.errors import RenormConvertError

HELP = "fine-tune with the renorm schedule"


def add_arguments(p):
    _args.model_input(p)
    _args.output(p, ".keras")
    _args.data(p, required=True)
    _args.sizes(p)
    _args.scaling(p)
    _args.seed(p)
    g = _args.training(p)
    _args.option(g, "--optimizer", default="adam",
                 help="Keras optimizer name: adam, rmsprop (the paper's), "
                      "sgd, ...")
    _args.option(g, "--non-iid", type=_args.integer(1), metavar="K",
                 dest="non_iid_classes",
                 help="each batch from K classes (the paper's Figure 3)")
    _args.microbatch(g)
    _args.option(g, "--head", type=_args.integer(1), metavar="N",
                 argument=("head", "num_classes"),
                 help="replace the classifier (the last Dense, or a Conv "
                      "followed only by pooling / flatten / reshape / "
                      "activation / dropout) by a new one with N classes")
    g.add_argument("--train-only", choices=["norm"],
                   help="train only the normalization parameters")
    _args.option(g, "--mixed-precision", choices=["float16", "bfloat16"],
                 argument="dtype_policy",
                 help="compute in this type, keep weights and "
                      "normalization statistics in float32 (default: "
                      "float32 throughout)")
    g.add_argument("--xla", action="store_true",
                   help="jit-compile the step (default: Keras's choice for "
                        "the backend: JAX compiles, TensorFlow on a CPU and "
                        "PyTorch do not)")
    _args.option(g, "--strategy", choices=["mirrored", "multi-worker",
                                           "data-parallel"],
                 help="beyond one device: mirrored (TensorFlow, local GPUs), "
                      "multi-worker (TensorFlow, machines in TF_CONFIG), "
                      "data-parallel (JAX, every device; several processes "
                      "with KERAS_DISTRIBUTION_*)")
    _schedule_options(p)
    _record_options(p)


def _schedule_options(p):
    g = p.add_argument_group("renorm schedule")
    g.add_argument("--schedule", choices=["auto", "off"], default="auto",
                   help="auto: the paper's relaxation fitted to this run; "
                        "off: keep the layers' own r_max / d_max")
    g.add_argument("--final-r-max", type=_args.number(1.0), default=3.0,
                   help="r_max the schedule reaches")
    g.add_argument("--final-d-max", type=_args.number(0.0), default=5.0,
                   help="d_max the schedule reaches")
    g.add_argument("--warmup", type=_args.number(0.0, 1.0), default=0.1,
                   metavar="FRACTION",
                   help="fraction of the run held at r_max 1, d_max 0")
    g.add_argument("--d-max-at", type=_args.number(0.0, 1.0), default=0.25,
                   metavar="FRACTION",
                   help="fraction of the run by which d_max is reached")
    g.add_argument("--r-max-at", type=_args.number(0.0, 1.0), default=0.35,
                   metavar="FRACTION",
                   help="fraction of the run by which r_max is reached")


def _record_options(p):
    g = p.add_argument_group("records and checkpoints")
    _args.option(g, "--checkpoint-dir", metavar="DIR",
                 help="back up every epoch here; rerunning the same command "
                      "resumes (one run at a time holds a directory)")
    g.add_argument("--plot", metavar="PNG", help="write the curves here")
    g.add_argument("--history", metavar="PREFIX",
                   help="history files prefix (default: OUT.history)")
    g.add_argument("--tensorboard", metavar="DIR",
                   help="TensorBoard logs (needs the tensorboard package)")
    g.add_argument("--grad-report", metavar="JSON",
                   help="print and save mean |gradient| of normalization "
                        "parameters versus other weights")
    _args.option(g, "--recalibrate", type=_args.integer(1), metavar="N",
                 argument="batches",
                 help="after training, set the normalization statistics to "
                      "exact averages over N batches of the training data "
                      "(\"precise BN\"; default: keep the moving averages)")
    g.add_argument("--quiet-progress", action="store_true",
                   help="one line per epoch instead of a progress bar")


def history_prefix(args):
    from renorm_convert.train.reporting import history_prefix as strip

    return strip(args.history or
                 os.path.splitext(args.output)[0] + ".history")


def check(args):
    """Every place the run writes, checked against the inputs and each other
    before any work, and what else can be told without a backend: a mistake
    costs nothing, and a trained model is never lost to a path that was
    wrong from the start."""
    import renorm_convert.train.checkpoint as checkpoint
    from renorm_convert._internal.limits import (check_strategy_name,
                                                 keras_backend)
    from renorm_convert.data import check_batching, check_source, source_path
    from renorm_convert.train.reporting import history_files

    check_output(args.output, [args.model], (".keras",))
    flag = "--history" if args.history else "-o (history)"
    outputs = [("-o", args.output, "file")] + [
        (flag, path, "file") for path in history_files(history_prefix(args))]
    for name, path, kind in (("--plot", args.plot, "file"),
                             ("--grad-report", args.grad_report, "file"),
                             ("--tensorboard", args.tensorboard, "logdir"),
                             ("--checkpoint-dir", args.checkpoint_dir,
                              "dir")):
        if path:
            outputs.append((name, path, kind))
    check_outputs(outputs, [("model", args.model),
                            ("data", source_path(args.data))])
    check_model_path(args.model)
    check_source(args.data)
    if args.checkpoint_dir:
        checkpoint.check(args.checkpoint_dir)
    check_strategy_name(args.strategy, keras_backend())
    check_batching(None, args.batch_size, args.non_iid_classes,
                   microbatch_size=args.microbatch_size)
    if args.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise RenormConvertError(
                "--tensorboard needs the tensorboard package: pip install "
                "'renorm_convert[tensorboard]' (or tensorboard).")


def run(args):
    import keras

    import renorm_convert as rc
    from renorm_convert.train import distribute

    keras.utils.set_random_seed(args.seed)
    # A multi-worker strategy must exist before TensorFlow's first op.
    strategy = distribute.make_strategy(args.strategy)
    split = training_split(args)
    model = _prepared_model(args)
    batches = rc.data.training_batches(
        split, model, args.batch_size, non_iid_classes=args.non_iid_classes,
        seed=args.seed)
    validation = rc.data.evaluation_batches(split, model) if len(
        split.y_val) else None
    records = _Records(args, split, batches, validation, strategy)
    schedule = _schedule(args, model, batches.num_batches * args.epochs)
    progress(f"fine-tuning on {split.name}: {len(split.y_train)} examples, "
             f"{args.epochs} epoch(s) of {batches.num_batches} steps "
             f"(Keras backend: {keras.backend.backend()})")
    try:
        result = rc.fine_tune(
            model, batches, validation=validation, epochs=args.epochs,
            optimizer=args.optimizer, learning_rate=args.lr,
            schedule=schedule, callbacks=records.callbacks,
            checkpoint_dir=args.checkpoint_dir,
            jit_compile=True if args.xla else "auto", strategy=strategy,
            inplace=True, verbose=2 if args.quiet_progress
            or not sys.stdout.isatty() else "auto")
    except rc.NonFiniteLoss as e:
        return _diverged(args, e)
    if not distribute.is_chief():
        print("worker done (the chief writes the outputs)")
        return EXIT_OK
    return _finish(args, result, split, records)


def _prepared_model(args):
    """The loaded model with the surgery the flags ask for."""
    import renorm_convert as rc
    from renorm_convert.transform.surgery import KEEP, normalization_settings

    model = load_model(args)
    if args.head:
        model = rc.replace_head(model, args.head, inplace=True)
    model = rc.configure(
        model, microbatch_size=KEEP if args.microbatch_size is None
        else args.microbatch_size, momentum=args.momentum, inplace=True)
    if args.train_only == "norm":
        model = rc.freeze_all_but_normalization(model, inplace=True)
    if args.mixed_precision:
        model = rc.recast(model, f"mixed_{args.mixed_precision}")
        progress(f"mixed precision: computing in {args.mixed_precision}, "
                 "weights and normalization statistics in float32"
                 + (", loss scaling on" if args.mixed_precision == "float16"
                    else ""))
    _print_settings(model, normalization_settings(model))
    return model


class _Records:
    """The callbacks that record the run (curve, history files and plot,
    TensorBoard, gradient report), as the flags ask."""

    def __init__(self, args, split, batches, validation, strategy):
        import keras

        from renorm_convert.train import callbacks as cb
        from renorm_convert.train import distribute

        self.prefix = history_prefix(args)
        self.curve = (cb.ValidationCurve(validation, batches.num_batches,
                                         size=len(split.y_val))
                      if validation is not None
                      and distribute.process_count() == 1
                      and not distribute.is_multi_worker(strategy) else None)
        self.history = cb.RunRecords(
            self.prefix, plot=args.plot, curve=self.curve,
            title=f"{os.path.basename(args.model)} on {split.name}")
        self.callbacks = [c for c in (self.curve, self.history)
                          if c is not None]
        if args.tensorboard:
            self.callbacks.append(
                keras.callbacks.TensorBoard(str(args.tensorboard)))
        self.grads = None
        if args.grad_report:
            self.grads = cb.GradientReport(batches[0], args.grad_report)
            self.callbacks.append(self.grads)


def _schedule(args, model, total_steps):
    """The schedule `--schedule` asks for (None: the layers' own bounds),
    said in a progress line."""
    import renorm_convert as rc

    if args.schedule != "auto":
        return None
    schedule = rc.RenormSchedule.for_run(
        total_steps, warmup=args.warmup, d_max_at=args.d_max_at,
        r_max_at=args.r_max_at, r_max=args.final_r_max,
        d_max=args.final_d_max)
    if rc.renorm_layers(model):
        # In the order the bounds are reached.
        progress(f"renorm schedule: {schedule.warmup_steps} steps of warm-up "
                 f"at r_max 1, d_max 0, then d_max 0 -> {schedule.d_max:g} "
                 f"by step {schedule.d_max_steps} and r_max 1 -> "
                 f"{schedule.r_max:g} by step {schedule.r_max_steps} (the "
                 "layers' saved bounds are replaced; --schedule off keeps "
                 "them)")
    return schedule


def _diverged(args, error):
    """A NaN loss: the model with the last good state is written anyway."""
    from renorm_convert.io import save_atomically
    from renorm_convert.train import distribute

    if distribute.is_chief():
        save_atomically(error.model, args.output)
    print(f"renorm-convert finetune: {error}; wrote that model to "
          f"{args.output}", file=sys.stderr)
    return EXIT_INTERNAL


def _finish(args, result, split, records):
    """Writes the model (then drops the checkpoint) and says what happened."""
    import renorm_convert as rc
    from renorm_convert.io import save_atomically
    from renorm_convert.train import checkpoint

    trained = result.model
    if args.recalibrate:
        # The library says on how many batches (a progress line).
        trained = rc.recalibrate(trained, split, batches=args.recalibrate,
                                 batch_size=args.batch_size)
    save_atomically(trained, args.output)
    if result.checkpoint_dir:
        # Only now that the model is safely written: a run killed before
        # this point resumes from the checkpoint instead of starting over.
        checkpoint.remove(result.checkpoint_dir)
    _print_accuracy(rc, trained, split, records.curve, result, args)
    grads = records.grads
    if grads is not None and grads.report:
        print("mean |gradient|: " + ", ".join(
            f"{k} {v:.3g}" for k, v in grads.report["summary"].items()))
    if result.steps:
        bounds = result.final_bounds
        tail = (f"; final r_max {bounds[0]:.2f}, d_max {bounds[1]:.2f}"
                if bounds else "")
        print(f"trained {result.steps[-1]['step']} steps{tail}")
    failed = records.history.errors
    written = [args.output]
    if records.prefix not in failed:
        written.append(records.prefix + ".csv/.steps.csv/.json")
    if args.plot and str(args.plot) not in failed:
        written.append(str(args.plot))
    print("wrote " + ", ".join(written))
    for path, why in failed.items():
        print(f"renorm-convert finetune: error: could not write {path} "
              f"({why}); the model was written to {args.output}",
              file=sys.stderr)
    return EXIT_USAGE if failed else EXIT_OK


def _print_settings(model, settings):
    if not settings:
        progress(f"note: model '{model.name}' has no BatchRenormalization "
                 "layer: it trains as it is (convert it first for batch "
                 "renormalization)")
        return

    def show(values):
        return " / ".join("none" if v is None else f"{v:g}" for v in values)

    progress("training with: microbatch "
             + show(settings["microbatch_size"])
             + ", momentum " + show(settings["momentum"])
             + ", renorm_momentum " + show(settings["renorm_momentum"]))


def _print_accuracy(rc, trained, split, curve, result, args):
    if not len(split.y_val):
        return
    n = len(split.y_val)
    where = f"on {n} validation images"
    after = rc.accuracy(trained, split)
    if curve is not None and curve.points:
        start = curve.points[0]["val_accuracy"]
        label = ("at the start of this run (resumed)" if result.resumed_from
                 else "with the new head" if args.head else "before")
        print(f"validation accuracy {where}: {label} {100 * start:.2f}%, "
              f"after {100 * after:.2f}%"
              + (" (recalibrated)" if args.recalibrate else ""))
    else:
        print(f"validation accuracy {where}: after {100 * after:.2f}%")
