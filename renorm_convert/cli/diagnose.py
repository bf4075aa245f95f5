"""Tell, from MODEL and your own data batched as training will batch it,
whether batch renormalization will help. Nothing is trained and MODEL is
not changed. Works on plain BatchNormalization models (before conversion)
and on converted ones.

Over --batches training batches (i.i.d., or --non-iid K classes per
batch; --microbatch M) it measures, per normalization layer, r =
sigma_B / sigma and d = (mu_B - mu) / sigma against the layer's moving
statistics (median, 5-95 %), the shares clipping would change, how far
the moving statistics drifted from the data's, and how far the outputs
move when only that layer uses batch statistics; and for the model,
top-1 and loss in inference mode, in training mode with your batching,
with i.i.d. batches of the same size, and after recalibration. It prints
the findings, a conclusion (renorm likely helps / batch norm is fine
here / recalibrate first / too few batches to tell), the layers worst
first, and settings to fine-tune with. A model without normalization is
said so (exit status 0)."""

import sys

from renorm_convert.cli import _args, progress
from renorm_convert.cli._args import EXIT_OK, EXIT_USAGE
from renorm_convert.cli._common import (check_model_path, load_model,
                                        training_split)
from renorm_convert.cli._paths import check_outputs

HELP = "tell whether batch renorm will help, from your model and data"


def add_arguments(p):
    _args.model_input(p)
    _args.data(p, required=True, what="the images to measure on")
    _args.sizes(p)
    _args.scaling(p)
    _args.seed(p)
    g = p.add_argument_group("batching, as training will batch")
    _args.option(g, "--batch-size", type=_args.integer(1), default=32,
                 help="examples per training step")
    _args.option(g, "--non-iid", type=_args.integer(1), metavar="K",
                 dest="non_iid_classes",
                 help="each batch from K classes (the paper's Figure 3)")
    _args.microbatch(g)
    _args.option(g, "--batches", type=_args.integer(1), metavar="N",
                 default=16, help="training batches to measure (fewer than "
                                  "4 never give a verdict)")
    _args.option(g, "--steps", type=_args.integer(1), metavar="N",
                 help="the planned run's length in steps, for the "
                      "suggested momentum and schedule")
    _args.option(g, "--final-r-max", type=_args.number(1.0), default=3.0,
                 argument="r_max",
                 help="report the share of r clipped at this r_max too")
    _args.option(g, "--final-d-max", type=_args.number(0.0), default=5.0,
                 argument="d_max",
                 help="report the share of d clipped at this d_max too")
    out = p.add_argument_group("outputs")
    out.add_argument("--json", metavar="OUT",
                     help="write everything measured here as JSON")
    out.add_argument("--plot", metavar="PNG",
                     help="write per-layer r and d ranges against depth, "
                          "with the clipping bounds, and the modes' top-1")
    out.add_argument("--rows", type=_args.integer(1), default=12,
                     help="layers in the table (the worst first)")


def check(args):
    """Outputs, the model file, the source and the batching, before any
    backend loads."""
    from renorm_convert.data import check_batching, check_source, source_path

    outputs = [(flag, path, "file") for flag, path in
               (("--json", args.json), ("--plot", args.plot)) if path]
    check_outputs(outputs, [("model", args.model),
                            ("data", source_path(args.data))])
    check_model_path(args.model)
    check_source(args.data)
    check_batching(None, args.batch_size, args.non_iid_classes,
                   microbatch_size=args.microbatch_size)


def run(args):
    import keras

    import renorm_convert as rc
    from renorm_convert.io import write_atomically

    keras.utils.set_random_seed(args.seed)
    split = training_split(args)
    model = load_model(args)
    progress(f"diagnosing on {split.name}: {args.batches} batches of "
             f"{args.batch_size} (Keras backend: {keras.backend.backend()})")
    diagnosis = rc.diagnose(
        model, split, batch_size=args.batch_size,
        microbatch_size=args.microbatch_size,
        non_iid_classes=args.non_iid_classes, batches=args.batches,
        steps=args.steps, r_max=args.final_r_max, d_max=args.final_d_max,
        seed=args.seed)
    print(diagnosis.describe(rows=args.rows))
    written, failed = [], {}
    if args.json:
        _write(args.json, lambda: write_atomically(
            args.json, diagnosis.to_json().encode()), written, failed)
    if args.plot and diagnosis.has_normalization:
        _write(args.plot, lambda: diagnosis.write_plot(args.plot), written,
               failed)
    if written:
        print("wrote " + ", ".join(written))
    for path, why in failed.items():
        print(f"renorm-convert diagnose: error: could not write {path} "
              f"({why})", file=sys.stderr)
    return EXIT_USAGE if failed else EXIT_OK


def _write(path, write, written, failed):
    try:
        write()
        written.append(str(path))
    except OSError as e:
        failed[str(path)] = e.strerror or str(e)
