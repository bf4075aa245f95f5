"""Training throughput of `rc.fine_tune` on a converted model against the
original BatchNormalization model.

What is measured
----------------
Images per second of Keras ``fit`` on the two reference models shipped in
``renorm_convert/reference/`` (``inception_fmnist.keras``: 19 BN layers; ``resnet_fmnist.keras``:
9 BN layers; both 28x28x1 inputs, softmax heads), trained on real
Fashion-MNIST images (``data.load_fashion_mnist().subset(train=N)``, N =
``--batches`` x ``--batch-size``). Variants per model:

  bn         ``rc.fine_tune(bn_model, split, ...)``                  (baseline)
  rc         ``rc.fine_tune(rc.convert(bn_model), split, ...)`` with the
             default "auto" renorm schedule (RenormSchedule callback)
  rc_mb4     as rc, with ``microbatch_size=4``

and two optional ones (``--variants``, not run by default: every variant
costs a model copy, a compile and a trace per round):

  bn_fit     the BN model: a copy compiled like fine_tune compiles (Adam
             1e-3, SparseCategoricalCrossentropy, accuracy, jit_compile=False)
             and trained with plain ``model.fit`` on
             ``data.training_dataset(split, shape, batch, epochs=1, seed=0)``
             (shows fine_tune's own overhead: its StepLog / NanGuard
             callbacks)
  rc_nosched as rc, with ``schedule=None`` (splits the schedule callback's
             cost from the layer's own cost)

fine_tune is called with ``epochs=1, batch_size=--batch-size, verbose=0``
and the same data, seed and pipeline for every variant (fine_tune builds the
same ``data.training_dataset`` internally). No validation runs: the split's
validation part is replaced by an empty one for ``validation=`` (fine_tune
then evaluates nothing; ``subset(val=0)`` itself cannot be used, fine_tune
takes the max of the split's validation labels).

Timing: a Keras callback, appended after fine_tune's own callbacks, records
``time.perf_counter()`` at every ``on_train_batch_end``; the time of batch k
is the interval since the end of batch k - 1, i.e. everything ``fit`` does
per batch (data fetch, the train step, every callback). The first
``--warmup`` batches of every run (tracing, first steps) are not timed; each
fine_tune call copies and compiles the model afresh, so every run traces
again and its warm-up is skipped again. The time before the first batch ends
(model copy, compile, tracing, first step) is reported as "1st batch s";
"call s" is the wall time of the whole call (copy, compile, fit).

The variants are run round-robin: in every round each model runs every
variant once (one fit of ``--batches`` batches), and the order of the
variants rotates from round to round, so slow phases of a shared, noisy
machine fall on all variants alike. Reported: images/s = batch size / median
of all timed batch times of a variant ([p25 - p75] of the per-batch images/s);
"vs BN" is the ratio of these against ``bn`` of the same model measured in the
same run; "paired" is the median over rounds of (variant's images/s in that
round / bn's images/s in the same round), a noise cross-check. On a shared
machine the per-batch times switch between an unloaded and a loaded level
(often 2x apart) as other jobs come and go, which moves the wall-clock
medians by more than the effect measured here. "CPU img/s" (batch size /
median CPU time of this process, ``time.process_time()``, per batch; all
threads, tf.data's included) and its ratio are a second cross-check that
other jobs on the machine barely move; it does not see a loss of
parallelism (serial work costs the same CPU time but more wall time). The
verdict uses the wall-clock medians, as the target is about images/s.

Target (printed as PASS / FAIL): ``rc`` at least 0.95x the images/s of ``bn``
on every model. Microbatches (``rc_mb4``) and the other variants are reported
without a target.

Examples::

    python benchmarks/finetune.py            # full run, ~4-6 min on 2 cores
    python benchmarks/finetune.py --quick    # ~1 min smoke run
    python benchmarks/finetune.py --variants bn_fit bn rc rc_mb4 rc_nosched
"""

import dataclasses
import gc
import sys
import time

import numpy as np

import _common as common

MODELS = common.REFERENCE_MODELS
VARIANTS = ("bn_fit", "bn", "rc", "rc_mb4", "rc_nosched")
DEFAULT_VARIANTS = ("bn", "rc", "rc_mb4")
BASELINE = "bn"
TARGET = 0.95  # rc images/s at least this times bn's
SEED = 0


# --- one run ----------------------------------------------------------------

def run_variant(variant, bn_model, rc_model, split, noval, batch):
    """Trains one variant for one epoch of `split`; returns (callback,
    wall seconds of the whole call)."""
    import keras
    import renorm_convert as rc
    from renorm_convert import data

    cb = common.batch_times_callback()
    t0 = time.perf_counter()
    if variant == "bn_fit":
        keras.utils.set_random_seed(SEED)
        model = keras.models.clone_model(bn_model)
        model.set_weights(bn_model.get_weights())
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
            metrics=["accuracy"], jit_compile=False)
        ds, steps = data.training_dataset(
            split, data.model_image_shape(model), batch, epochs=1, seed=SEED)
        model.fit(ds, epochs=1, steps_per_epoch=steps, callbacks=[cb],
                  verbose=0, shuffle=False)
    else:
        kwargs = dict(validation=noval, epochs=1, batch_size=batch, verbose=0,
                      seed=SEED, callbacks=[cb])
        source = bn_model if variant == "bn" else rc_model
        if variant == "rc_mb4":
            kwargs["microbatch_size"] = 4
        elif variant == "rc_nosched":
            kwargs["schedule"] = None
        history = rc.fine_tune(source, split, **kwargs)
        del history
    wall = time.perf_counter() - t0
    gc.collect()  # untimed: the copy of this run is not charged to the next
    return cb, wall


def bench(args, variants, log):
    import renorm_convert as rc
    from renorm_convert import data

    n_train = args.batches * args.batch_size
    full = data.load_fashion_mnist()
    split = full.subset(train=n_train, val=1, seed=SEED)
    noval = dataclasses.replace(split, x_val=split.x_val[:0],
                                y_val=split.y_val[:0])
    models = {}
    for name in args.models:
        bn_model = common.load_reference(name)
        t0 = time.perf_counter()
        rc_model = rc.convert(bn_model)
        n_bn = (common.count_bn(bn_model)
                - common.count_layers(bn_model, rc.BatchRenormalization))
        n_rc = common.count_layers(rc_model, rc.BatchRenormalization)
        models[name] = (bn_model, rc_model)
        log(f"loaded {name}: input {data.model_image_shape(bn_model)}, "
            f"{bn_model.count_params():,} params, {n_bn} BN -> {n_rc} "
            f"BatchRenormalization (convert {time.perf_counter() - t0:.1f}s)")

    step_times = {(m, v): [] for m in args.models for v in variants}
    cpu_times = {(m, v): [] for m in args.models for v in variants}
    per_round = {(m, v): [] for m in args.models for v in variants}
    first = {(m, v): [] for m in args.models for v in variants}
    walls = {(m, v): [] for m in args.models for v in variants}
    for r, order in common.round_robin(variants, args.rounds):
        for name in args.models:
            bn_model, rc_model = models[name]
            for v in order:
                cb, wall = run_variant(v, bn_model, rc_model, split, noval,
                                       args.batch_size)
                ends = np.asarray(cb.ends)
                if len(ends) != args.batches:
                    raise RuntimeError(f"{name}/{v}: {len(ends)} batches, "
                                       f"expected {args.batches}")
                dt = np.diff(ends)[args.warmup - 1:]
                step_times[(name, v)].extend(dt.tolist())
                cpu_times[(name, v)].extend(
                    np.diff(cb.cpu)[args.warmup - 1:].tolist())
                per_round[(name, v)].append(float(np.median(dt)))
                first[(name, v)].append(ends[0] - cb.start)
                walls[(name, v)].append(wall)
                log(f"round {r + 1}/{args.rounds} {name:<16} {v:<10} "
                    f"{args.batch_size / np.median(dt):7.1f} img/s  "
                    f"(1st batch {ends[0] - cb.start:5.1f}s, call "
                    f"{wall:5.1f}s)")
    return step_times, cpu_times, per_round, first, walls


# --- report -----------------------------------------------------------------

def main(argv=None):
    parser = common.parser(__doc__)
    common.add_quick(parser, "smoke run: 1 round of 24 batches, warm-up 4")
    common.add_rounds(parser, "round-robin rounds (default 3: every "
                              "variant once in every position; quick 1)")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches per fit (default 48, quick 24)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed first batches of every fit (default 4)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", nargs="+", choices=MODELS,
                        default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=list(DEFAULT_VARIANTS),
                        help=f"{BASELINE} is always included (the baseline)")
    common.add_threads(parser)
    args = parser.parse_args(argv)

    q = args.quick
    args.rounds = args.rounds or (1 if q else 3)
    args.batches = args.batches or (24 if q else 48)
    if args.warmup is None:
        args.warmup = 4
    if not 1 <= args.warmup < args.batches - 1:
        parser.error("--warmup must be >= 1 (the first batch traces) and "
                     "leave at least two timed batches")
    variants = [v for v in VARIANTS
                if v in set(args.variants) | {BASELINE}]

    common.set_threads(args.threads)
    log = common.stopwatch()
    print(f"{common.versions()}, threads={args.threads or 'TF default'}")
    print(f"rounds={args.rounds} batches/fit={args.batches} "
          f"(warm-up {args.warmup} untimed) batch size={args.batch_size} "
          f"variants={variants}")
    step_times, cpu_times, per_round, first, walls = bench(args, variants,
                                                           log)
    log("done")

    b = args.batch_size
    common.print_rule()
    print("img/s: batch size / median of all timed batch times "
          "([p25 - p75] of per-batch img/s);\nvs BN: ratio against "
          f"'{BASELINE}' (rc.fine_tune of the BN model); paired: median over "
          "rounds of\nper-round ratios; CPU img/s: batch size / median CPU "
          "time (process_time) per\nbatch, and its ratio; 1st batch s: "
          "median time from fit start to the end of\nbatch 1 (tracing); "
          "call s: median wall time of the whole call")
    verdicts = []
    for name in args.models:
        n = len(step_times[(name, BASELINE)])
        print(f"\n{name}  batch={b}   ({n} timed batches per variant, "
              f"{args.rounds} rounds)")
        hdr = (f"{'variant':<12}{'img/s':>8} {'[p25 - p75]':>16}{'vs BN':>8}"
               f"{'paired':>8}{'CPU img/s':>10}{'vs BN':>8}"
               f"{'1st batch s':>12}{'call s':>8}  target")
        common.print_header(hdr)
        base = b / np.median(step_times[(name, BASELINE)])
        base_cpu = b / np.median(cpu_times[(name, BASELINE)])
        base_r = per_round[(name, BASELINE)]
        for v in variants:
            t = np.asarray(step_times[(name, v)])
            ips = b / np.median(t)
            cpu = b / np.median(cpu_times[(name, v)])
            _, p25, p75 = common.median_iqr(b / t)
            # img/s is the inverse of a time: the paired ratio is bn's
            # batch time over v's.
            paired = common.paired(base_r, per_round[(name, v)])
            ratio = ips / base
            target = ""
            if v == "rc":
                ok = ratio >= TARGET
                verdicts.append(ok)
                target = common.verdict(ok, f">= {TARGET:.2f}x")
            print(f"{v:<12}{ips:8.1f} {f'[{p25:.1f} - {p75:.1f}]':>16}"
                  f"{ratio:7.3f}x{paired:7.3f}x{cpu:10.1f}"
                  f"{cpu / base_cpu:7.3f}x"
                  f"{np.median(first[(name, v)]):12.1f}"
                  f"{np.median(walls[(name, v)]):8.1f}  {target}")
        if "bn_fit" in variants:
            fit = b / np.median(step_times[(name, "bn_fit")])
            print(f"fine_tune overhead on the BN model (bn vs plain fit): "
                  f"{base / fit:.3f}x img/s")

    if verdicts:
        print("\n" + common.overall(
            verdicts, f"models: rc >= {TARGET:.2f}x bn images/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
