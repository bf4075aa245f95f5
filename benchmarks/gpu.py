"""Training cost of batch renorm against batch norm on a GPU.

What is measured
----------------
1. Step time. A model from ``keras.applications`` (``--step-model``, default
   ResNet50, ``weights=None``, 224x224x3, 10 classes) is built once per
   setting, converted with ``rc.convert`` (and with ``rc.convert(...,
   microbatch_size=4)``), and each copy is compiled with
   ``model.compile(optimizer="sgd", loss=SparseCategoricalCrossentropy(),
   jit_compile=...)`` and timed with ``model.train_on_batch`` on one fixed
   batch of random data (``--batch``, default 64): one full training step,
   forward, backward, update and statistics. Variants:

     bn       the original model, keras.layers.BatchNormalization (baseline)
     rc       rc.convert(bn): rc.BatchRenormalization
     rc_mb4   rc.convert(bn, microbatch_size=4)

   Settings: ``float32``, ``mixed_float16`` (the global Keras policy when the
   model is built; Keras then wraps the optimizer in a LossScaleOptimizer),
   ``xla`` (float32, ``jit_compile=True``) and ``mixed_float16+xla``.

2. Images per second of ``rc.fine_tune`` on ResNet50 and InceptionV3
   (``weights=None``, 224x224 and 299x299, 10 classes): ``bn`` is
   ``rc.fine_tune(bn_model, ...)``, ``rc`` is ``rc.fine_tune(rc.convert(bn_model),
   ...)`` with the default "auto" schedule, ``rc_mb4`` as rc with
   ``microbatch_size=4``; all with ``mixed_precision="float16",
   jit_compile=True`` (``--fine-tune-precision`` / ``--fine-tune-jit``
   change that), one epoch of ``--batches`` batches of random images. A
   Keras callback records the end of every batch; the first ``--warmup``
   batches of every call (copy, compile, XLA compilation) are not timed.

Every number is a ratio against ``bn`` measured in the same run: the variants
run round-robin (``--rounds``), the order rotating from round to round, and
the ratio is of the medians of all timed steps ("vs BN"); "paired" is the
median over rounds of the per-round ratios, a noise cross-check.

Goals (printed as PASS / FAIL where a GPU ran them, from the issue): renorm
at most 1.03x the BN step time with XLA and mixed precision, microbatches of
4 at most 1.10x.

Without a GPU the script says so, runs a tiny smoke version on the CPU (a
small ResNet-style model at 32x32, batch 8, a few steps; its ratios mean
nothing) and exits 0.

Examples::

    python benchmarks/gpu.py                 # on a GPU: ~10 min
    python benchmarks/gpu.py --quick         # on a GPU: ~3 min
    python benchmarks/gpu.py --settings mixed_float16+xla --no-fine-tune
"""

import gc
import sys
import time

import numpy as np

import _common as common

SETTINGS = {
    "float32": ("float32", False),
    "mixed_float16": ("mixed_float16", False),
    "xla": ("float32", True),
    "mixed_float16+xla": ("mixed_float16", True),
}
VARIANTS = ("bn", "rc", "rc_mb4")
BASELINE = "bn"
TARGETS = {"rc": 1.03, "rc_mb4": 1.10}  # step time vs bn
TARGET_SETTING = "mixed_float16+xla"
MODELS = {  # name: (builder name in keras.applications, input size)
    "resnet50": ("ResNet50", 224),
    "inceptionv3": ("InceptionV3", 299),
}
SEED = 1234


def gpu_names():
    import tensorflow as tf

    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return names


def build(name, size):
    """(model, its outputs are probabilities)."""
    import keras

    keras.utils.set_random_seed(SEED)
    if name == "tiny":
        # train_step.py's ResNet-style model (32x32, logits).
        return common.build_resnet(keras.layers.BatchNormalization,
                                   name="resnet_keras_bn"), False
    builder = getattr(keras.applications, MODELS[name][0])
    return builder(weights=None, input_shape=(size, size, 3), classes=10), True


def random_batch(size, batch, seed=SEED):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, batch).astype("int32")
    return x, y


# --- 1. step time -----------------------------------------------------------

def step_models(name, size, policy, jit):
    import keras
    import renorm_convert as rc

    keras.mixed_precision.set_global_policy(policy)
    try:
        bn, probabilities = build(name, size)
        models = {"bn": bn, "rc": rc.convert(bn),
                  "rc_mb4": rc.convert(bn, microbatch_size=4)}
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for model in models.values():
        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=not probabilities),
            jit_compile=jit)
    return models


def bench_steps(args, name, size, log):
    import tensorflow as tf

    x_np, y_np = random_batch(size, args.batch)
    x, y = tf.constant(x_np), tf.constant(y_np)
    results = {}
    for setting in args.settings:
        policy, jit = SETTINGS[setting]
        models = step_models(name, size, policy, jit)
        for v, model in models.items():
            seconds = sum(common.time_calls(  # the first compiles
                lambda: model.train_on_batch(x, y), 1 + args.warmup))
            log(f"{setting:<18} {v:<7} compiled and warmed in "
                f"{seconds:6.1f}s")
        times = {v: [] for v in models}
        per_round = {v: [] for v in models}
        for _, order in common.round_robin(models, args.rounds):
            for v in order:
                block = common.time_calls(  # numpy logs: synchronous
                    lambda: models[v].train_on_batch(x, y), args.steps)
                times[v] += block
                per_round[v].append(float(np.median(block)))
        results[setting] = {
            v: (float(np.median(times[v])) * 1e3,
                common.paired(per_round[v], per_round[BASELINE]),
                len(times[v]))
            for v in models}
        del models
        gc.collect()
        import keras

        keras.backend.clear_session()
    return results


# --- 2. fine_tune images/s --------------------------------------------------

def bench_fine_tune(args, name, size, log):
    import keras
    import tensorflow as tf
    import renorm_convert as rc

    bn, _ = build(name, size)
    models = {"bn": bn, "rc": rc.convert(bn)}
    # A few distinct batches, repeated: fine_tune needs a known length.
    x, y = random_batch(size, args.batch * 4)
    data = (tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch)
            .repeat(-(-args.batches // 4)).take(args.batches))
    times = {v: [] for v in VARIANTS}
    per_round = {v: [] for v in VARIANTS}
    for r, order in common.round_robin(VARIANTS, args.rounds):
        for v in order:
            cb = common.batch_times_callback()
            t0 = time.perf_counter()
            history = rc.fine_tune(
                models["bn" if v == "bn" else "rc"], data, epochs=1,
                mixed_precision=args.fine_tune_precision,
                jit_compile=args.fine_tune_jit,
                microbatch_size=4 if v == "rc_mb4" else None,
                callbacks=[cb], verbose=0)
            if not np.isfinite(history.history["loss"]).all():
                raise RuntimeError(f"{name}/{v}: loss not finite")
            del history
            dt = np.diff(np.asarray(cb.ends))[args.fine_tune_warmup - 1:]
            times[v] += dt.tolist()
            per_round[v].append(float(np.median(dt)))
            log(f"round {r + 1}/{args.rounds} {name:<12} {v:<7} "
                f"{args.batch / np.median(dt):8.1f} img/s (call "
                f"{time.perf_counter() - t0:5.1f}s)")
            gc.collect()
    del models
    keras.backend.clear_session()
    # img/s is the inverse of a time: the paired ratio is bn's over v's.
    return {v: (args.batch / float(np.median(times[v])),
                common.paired(per_round[BASELINE], per_round[v]),
                len(times[v]))
            for v in VARIANTS}


# --- report -----------------------------------------------------------------

def verdict(setting, variant, ratio, on_gpu):
    if not on_gpu or setting != TARGET_SETTING or variant not in TARGETS:
        return ""
    target = TARGETS[variant]
    return common.verdict(ratio <= target, f"<= {target:.2f}x")


def print_steps(name, size, batch, results, on_gpu):
    print(f"\nstep time: {name} {size}x{size}, batch {batch}")
    hdr = (f"{'setting':<19}{'variant':<9}{'ms/step':>9}{'vs BN':>8}"
           f"{'paired':>8}{'steps':>7}  goal")
    common.print_header(hdr)
    for setting, res in results.items():
        base = res[BASELINE][0]
        for v, (ms, paired, n) in res.items():
            ratio = ms / base
            print(f"{setting:<19}{v:<9}{ms:9.2f}{ratio:7.3f}x{paired:7.3f}x"
                  f"{n:7d}  {verdict(setting, v, ratio, on_gpu)}")


def print_fine_tune(name, size, batch, res, args):
    print(f"\nrc.fine_tune: {name} {size}x{size}, batch {batch}, "
          f"mixed_precision={args.fine_tune_precision}, "
          f"jit_compile={args.fine_tune_jit}")
    hdr = f"{'variant':<9}{'img/s':>9}{'vs BN':>8}{'paired':>8}{'batches':>9}"
    common.print_header(hdr)
    base = res[BASELINE][0]
    for v, (ips, paired, n) in res.items():
        print(f"{v:<9}{ips:9.1f}{ips / base:7.3f}x{paired:7.3f}x{n:9d}")


def main(argv=None):
    parser = common.parser(__doc__)
    common.add_quick(parser, "fewer rounds and steps, only mixed_float16+xla "
                             "for step time, ResNet50 only for fine_tune")
    common.add_rounds(parser, "round-robin rounds (default 5, quick 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant per round (default "
                             "10, quick 5)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps after compilation")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                        default=None, help="step-time settings (default: all)")
    parser.add_argument("--step-model", choices=list(MODELS),
                        default="resnet50")
    parser.add_argument("--fine-tune-models", nargs="*",
                        choices=list(MODELS), default=None,
                        help="models for fine_tune images/s (default: both; "
                             "none to skip)")
    parser.add_argument("--no-fine-tune", action="store_true")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches per fine_tune call (default 40, "
                             "quick 25)")
    parser.add_argument("--fine-tune-warmup", type=int, default=10,
                        help="untimed first batches of every fine_tune call")
    parser.add_argument("--fine-tune-precision", default="float16",
                        help="fine_tune(mixed_precision=...); 'none' for "
                             "float32")
    parser.add_argument("--fine-tune-jit", type=int, choices=(0, 1),
                        default=1, help="fine_tune(jit_compile=...)")
    args = parser.parse_args(argv)

    names = gpu_names()
    on_gpu = bool(names)
    print(common.versions())
    if on_gpu:
        print(f"GPU: {', '.join(names)}")
        q = args.quick
        args.rounds = args.rounds or (2 if q else 5)
        args.steps = args.steps or (5 if q else 10)
        args.batches = args.batches or (25 if q else 40)
        args.settings = args.settings or (
            [TARGET_SETTING] if q else list(SETTINGS))
        if args.fine_tune_models is None:
            args.fine_tune_models = ["resnet50"] if q else list(MODELS)
        step_model, step_size = args.step_model, MODELS[args.step_model][1]
        sizes = {m: MODELS[m][1] for m in args.fine_tune_models}
    else:
        print("No GPU: tf.config.list_physical_devices('GPU') is empty. "
              "Running a tiny CPU smoke version instead (a small ResNet-style "
              "model at 32x32, batch 8); its ratios say nothing about a GPU.")
        args.rounds, args.steps, args.warmup = 2, 2, 1
        args.batch, args.batches, args.fine_tune_warmup = 8, 6, 3
        args.settings = ["float32", "xla"]
        args.fine_tune_precision, args.fine_tune_jit = "none", 0
        args.fine_tune_models = ["tiny"]
        step_model, step_size = "tiny", 32
        sizes = {"tiny": 32}
    if args.no_fine_tune:
        args.fine_tune_models = []
    if args.fine_tune_precision == "none":
        args.fine_tune_precision = None
    args.fine_tune_jit = bool(args.fine_tune_jit)
    if not 1 <= args.fine_tune_warmup <= args.batches - 2:
        parser.error("--fine-tune-warmup must be >= 1 (the first batch "
                     "compiles) and leave at least two timed batches")

    log = common.stopwatch()
    print(f"rounds={args.rounds} steps/round={args.steps} warmup="
          f"{args.warmup} batch={args.batch} settings={args.settings}")
    steps = bench_steps(args, step_model, step_size, log)
    tuned = {m: bench_fine_tune(args, m, sizes[m], log)
             for m in args.fine_tune_models}
    log("done")

    common.print_rule(72)
    print("ms/step and img/s: from the medians of all timed steps; vs BN: "
          "ratio against bn in the\nsame run; paired: median over rounds of "
          "the per-round ratios (step time: variant / bn;\nimg/s: variant / "
          "bn)")
    if on_gpu:
        print(f"GPU: {', '.join(names)}")
    print_steps(step_model, step_size, args.batch, steps, on_gpu)
    for m, res in tuned.items():
        print_fine_tune(m, sizes[m], args.batch, res, args)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
