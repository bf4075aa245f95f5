"""Reproduce the paper's Figure 2 (microbatch) or Figure 3 (non-iid) at
small scale on Fashion-MNIST: batch norm versus batch renorm from the same
initialisation over several seeds; writes the validation-accuracy curves
(CSV, JSON, PNG) to --out and prints this run's set-up, its final
accuracies, and the paper's. The defaults take about 3 (microbatch) and 7
(non-iid) minutes on 2 CPU cores; raise --steps / --seeds (and use a GPU)
for full scale. Runs repeat exactly on the same machine (deterministic
kernels)."""

import os

from renorm_convert.cli import _args, progress
from renorm_convert.cli._args import EXIT_OK
from renorm_convert.cli._paths import check_outputs
from renorm_convert.errors import RenormConvertError

HELP = "the paper's Figure 2 / 3 at small scale"


def _per_experiment(name):
    # No backend is loaded for this.
    from renorm_convert._internal.limits import REPRODUCE_DEFAULTS

    return ", ".join(f"{value[name]} for {experiment}"
                     for experiment, value in REPRODUCE_DEFAULTS.items())


def add_arguments(p):
    # No backend is loaded for this.
    from renorm_convert._internal.limits import REPRODUCE_MODELS

    p.add_argument("experiment", choices=["microbatch", "non-iid"],
                   help="Figure 2 (microbatches) or Figure 3 (non-i.i.d. "
                        "batches)")
    p.add_argument("--out", default=os.path.join("runs", "reproduce"),
                   metavar="DIR",
                   help="where EXPERIMENT.csv / .json / .png go")
    p.add_argument("--steps", type=_args.integer(1), default=None,
                   help="training steps per run (default: "
                        + _per_experiment("steps") + ")")
    p.add_argument("--seeds", type=_args.integer(1), default=3,
                   help="runs per arm, each from its own initialization")
    _args.option(p, "--batch-size", type=_args.integer(1), default=32,
                 help="examples per training step")
    _args.option(p, "--microbatch", type=_args.integer(1), default=2,
                 argument="microbatch_size",
                 help="examples per microbatch (microbatch experiment)")
    _args.option(p, "--classes-per-batch", type=_args.integer(1), default=2,
                 argument="non_iid_classes",
                 help="classes in each batch (non-iid experiment; "
                      "Fashion-MNIST has 10)")
    p.add_argument("--eval-every", type=_args.integer(1), default=150,
                   metavar="STEPS", help="validate every STEPS steps")
    p.add_argument("--model", default=None, choices=list(REPRODUCE_MODELS),
                   help="the network: cnn-plain (3 blocks of one "
                        "convolution, pooled), cnn (2 blocks of two and a "
                        "normalized dense head), cnn-wide (cnn at width 32), "
                        "cnn-deep (3 blocks of two and a normalized dense "
                        "head); default: " + _per_experiment("model"))
    _args.data(p, default="fashion-mnist")


def _config(args):
    from renorm_convert.train import reproduce

    return reproduce.Config(
        experiment=args.experiment, steps=args.steps, seeds=args.seeds,
        batch_size=args.batch_size, microbatch=args.microbatch,
        classes_per_batch=args.classes_per_batch, eval_every=args.eval_every,
        model=args.model, data=args.data)


def check(args):
    from renorm_convert._internal.limits import REPRODUCE_DEFAULTS
    from renorm_convert.data import check_batching, check_source, source_path

    steps = args.steps or REPRODUCE_DEFAULTS[args.experiment]["steps"]
    if steps < args.eval_every:  # the default --steps too
        raise RenormConvertError(f"--steps ({steps}) must be at least "
                        f"--eval-every ({args.eval_every}).")
    if args.experiment == "non-iid":
        check_batching(None, args.batch_size, args.classes_per_batch)
    check_outputs([("--out", args.out, "logdir")],
                  [("data", source_path(args.data))])
    check_source(args.data)


def run(args):
    from renorm_convert.data import check_batching, load_source
    from renorm_convert.train import reproduce
    from renorm_convert.train.determinism import deterministic
    from renorm_convert.train.reporting import write_experiment

    config = _config(args)
    split = load_source(args.data)
    if config.experiment == "non-iid":
        check_batching(len(split.y_train), args.batch_size,
                       args.classes_per_batch, split.num_classes)
    os.makedirs(args.out, exist_ok=True)
    what = (f"microbatches of {config.microbatch}"
            if config.experiment == "microbatch" else
            f"{config.classes_per_batch} classes x "
            f"{config.batch_size // config.classes_per_batch} examples")
    progress(f"{args.experiment}: model {config.model}, {config.seeds} "
             f"seed(s) x 2 variants x {config.steps} steps, batches of "
             f"{config.batch_size} ({what})")
    with deterministic():
        result = reproduce.run(config, progress=progress)
    prefix = os.path.join(args.out, args.experiment.replace("-", "_"))
    files = write_experiment(result, prefix)
    paper = result["paper"]
    seeds = config.seeds
    print(f"this run: {args.experiment}, model {config.model}, "
          f"{config.steps} steps, batches of {config.batch_size} ({what}), "
          f"{seeds} seed{'s' if seeds > 1 else ''}")
    print(f"the paper: ImageNet, Inception-v2 style network, {paper['setup']}")
    spread = "mean ± std" if seeds > 1 else "one seed"
    print(f"{'':14}{'this run (' + spread + ')':>24}{'paper':>12}")
    for variant in ("batch norm", "batch renorm"):
        f = result["final"][variant]
        value = (f"{f['mean']:.2f} ± {f['std']:.2f}%" if seeds > 1
                 else f"{f['mean']:.2f}%")
        print(f"{variant:14}{value:>24}{paper[variant]:>11.1f}%")
    d = result["final"]["renorm minus norm, paired by seed"]
    print(f"renorm - norm, paired by seed: {d['mean']:+.2f} points, renorm "
          f"ahead in {d['wins']} of {d['seeds']} seed(s) (paper: "
          f"{paper['batch renorm'] - paper['batch norm']:+.1f})")
    print("wrote " + ", ".join(files))
    return EXIT_OK
