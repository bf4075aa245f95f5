"""Training-step cost of batch renorm against batch norm, on a GPU, on any
Keras backend (TensorFlow, JAX, PyTorch: KERAS_BACKEND picks it).

What is measured
----------------
One full fine-tuning step (forward, backward, optimizer update and the
statistics' updates) of one model in several variants, with
``model.train_on_batch`` on one fixed batch of random images already on the
device (its NumPy logs make every call synchronous):

  bn            the model as built: keras.layers.BatchNormalization (baseline)
  keras_renorm  the same architecture with Keras's own
                BatchNormalization(renorm=True, renorm_clipping=rmax 3, dmax 5)
  rc            rc.convert(bn): rc.BatchRenormalization
  rc_mb4        rc.convert(bn, microbatch_size=4) (--variants adds it)

The model (``--model``): ``resnet50`` (keras.applications.ResNet50,
``weights=None``, 10 classes, 53 normalization layers) at ``--size`` (default
128: a small resolution keeps the GPU step short, the normalization layers'
share of it large), or ``reference`` (renorm_convert/reference/resnet_fmnist.keras, 28x28x1,
9 layers), or ``tiny`` (the ResNet-style model of train_step.py, 32x32).
Every variant is compiled with ``optimizer="sgd"``, the model's loss and
``jit_compile=--jit`` (default "auto": Keras's choice, XLA on TensorFlow's
GPU and JAX, eager PyTorch).

Settings (``--settings``): ``mixed_float16`` (the global policy while the
models are built and converted; Keras then wraps SGD in a
LossScaleOptimizer), ``float32``, ``mixed_bfloat16``. Defaults: the first
two, mixed first (the goal is stated for it).

Every number is a ratio against a baseline run in the same process and the
same rounds: the variants run round-robin (``--rounds``), the order
rotating from round to round; "vs BN" is the ratio of the medians of all
timed steps, "paired" the median over rounds of the per-round ratios (a
noise cross-check), "vs Keras renorm" the ratio of rc's median to
keras_renorm's. Each setting's table is printed as soon as it is measured,
with one machine-readable ``RATIO`` line, so a run stopped early keeps what
it measured; ``--budget`` seconds (0: none) skips the settings that would
not finish in time (the time a setting took predicts the next).

Goals (PASS / FAIL where a GPU ran them): rc at most 1.03x the BN step time
under mixed_float16, rc_mb4 at most 1.10x.

``--small`` (or no GPU) runs a rehearsal on the CPU instead: the tiny model,
batch 8, two rounds of two steps, float32 and mixed_float16; its ratios say
nothing about a GPU.

Examples::

    KERAS_BACKEND=jax python benchmarks/gpu.py                # on a GPU
    KERAS_BACKEND=torch python benchmarks/gpu.py --budget 90
    KERAS_BACKEND=jax python benchmarks/gpu.py --small        # CPU rehearsal
    python benchmarks/gpu.py --settings mixed_float16 --variants rc rc_mb4
"""

import gc
import sys
import time

import numpy as np

import _common as common

VARIANTS = ("bn", "keras_renorm", "rc", "rc_mb4")
DEFAULT_VARIANTS = ("bn", "keras_renorm", "rc")
BASELINE = "bn"
SETTINGS = ("mixed_float16", "float32", "mixed_bfloat16")
DEFAULT_SETTINGS = ("mixed_float16", "float32")
TARGETS = {"rc": 1.03, "rc_mb4": 1.10}  # step time vs bn
TARGET_SETTING = "mixed_float16"
CLIPPING = {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}
MODELS = ("resnet50", "reference", "tiny")
SEED = 1234


def build(name, size):
    """(model with keras BatchNormalization, its outputs are
    probabilities, input shape) under the current global policy."""
    import keras

    keras.utils.set_random_seed(SEED)
    if name == "tiny":
        return common.build_resnet(keras.layers.BatchNormalization,
                                   name="resnet_keras_bn"), False, (32, 32, 3)
    if name == "reference":
        import renorm_convert as rc

        model = common.load_reference("resnet_fmnist")
        policy = keras.mixed_precision.global_policy().name
        if policy != "float32":
            model = rc.recast(model, policy)
        return model, True, (28, 28, 1)
    return (keras.applications.ResNet50(
        weights=None, input_shape=(size, size, 3), classes=10), True,
        (size, size, 3))


def keras_renorm(model):
    """The same architecture with Keras's BatchNormalization(renorm=True)
    for every BatchNormalization (other weights freshly initialized under
    the same seed)."""
    import keras

    def clone(layer):
        config = layer.get_config()
        if type(layer) is keras.layers.BatchNormalization:
            config.update(renorm=True, renorm_clipping=dict(CLIPPING))
        return layer.__class__.from_config(config)

    keras.utils.set_random_seed(SEED)
    return keras.models.clone_model(model, clone_function=clone)


def variant_models(args, policy):
    import keras

    import renorm_convert as rc

    keras.mixed_precision.set_global_policy(policy)
    try:
        bn, probabilities, shape = build(args.model, args.size)
        makers = {
            "bn": lambda: bn,
            "keras_renorm": lambda: keras_renorm(bn),
            "rc": lambda: rc.convert(bn),
            "rc_mb4": lambda: rc.convert(bn, microbatch_size=4),
        }
        models = {v: makers[v]() for v in args.variants}
        for model in models.values():
            model.compile(
                optimizer="sgd",
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=not probabilities),
                jit_compile={"auto": "auto", "on": True,
                             "off": False}[args.jit])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return models, shape


def random_batch(shape, batch):
    import keras

    rng = np.random.default_rng(SEED)
    x = rng.uniform(0, 1, (batch,) + tuple(shape)).astype("float32")
    y = rng.integers(0, 10, batch).astype("int32")
    # On the device once: the steps time the step, not the copy.
    return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)


def bench_setting(args, setting, log):
    import keras

    models, shape = variant_models(args, setting)
    x, y = random_batch(shape, args.batch)
    for v, model in models.items():
        seconds = common.time_calls(lambda: model.train_on_batch(x, y),
                                    1 + args.warmup)  # the first compiles
        loss = float(np.asarray(model.train_on_batch(x, y)).ravel()[0])
        if not np.isfinite(loss):
            raise RuntimeError(f"{setting}/{v}: loss {loss}")
        log(f"{setting:<15} {v:<13} compiled in {seconds[0]:6.1f}s, warm "
            f"step {1e3 * np.median(seconds[1:] or seconds):8.2f} ms "
            f"(jit_compile={model.jit_compile}, "
            f"{type(model.optimizer).__name__}, "
            f"{common.count_bn(model)} normalization layers)")
    times = {v: [] for v in models}
    per_round = {v: [] for v in models}
    for _, order in common.round_robin(models, args.rounds):
        for v in order:
            block = common.time_calls(  # NumPy logs: synchronous
                lambda: models[v].train_on_batch(x, y), args.steps)
            times[v] += block
            per_round[v].append(float(np.median(block)))
    result = {v: (float(np.median(times[v])) * 1e3,
                  common.paired(per_round[v], per_round[BASELINE]),
                  len(times[v]))
              for v in models}
    del models, x, y
    gc.collect()
    keras.backend.clear_session()
    return result


def verdict(setting, variant, ratio, on_gpu):
    if not on_gpu or setting != TARGET_SETTING or variant not in TARGETS:
        return ""
    target = TARGETS[variant]
    return common.verdict(ratio <= target, f"<= {target:.2f}x")


def print_setting(args, setting, res, on_gpu, backend):
    base = res[BASELINE][0]
    size = f" {args.size}x{args.size}" if args.model == "resnet50" else ""
    print(f"\n{backend}: {args.model}{size}, batch {args.batch}, {setting}")
    hdr = (f"{'variant':<14}{'ms/step':>9}{'vs BN':>8}{'paired':>8}"
           f"{'steps':>7}  goal")
    common.print_header(hdr)
    for v, (ms, paired, n) in res.items():
        ratio = ms / base
        print(f"{v:<14}{ms:9.2f}{ratio:7.3f}x{paired:7.3f}x{n:7d}  "
              f"{verdict(setting, v, ratio, on_gpu)}")
    fields = [f"RATIO backend={backend}", f"device={'gpu' if on_gpu else 'cpu'}",
              f"model={args.model}", f"setting={setting}"]
    for v in res:
        if v != BASELINE:
            fields.append(f"{v}/bn={res[v][0] / base:.3f}")
    if "rc" in res and "keras_renorm" in res:
        fields.append(f"rc/keras_renorm={res['rc'][0] / res['keras_renorm'][0]:.3f}")
        print(f"rc vs Keras renorm (step time): "
              f"{res['rc'][0] / res['keras_renorm'][0]:.3f}x")
    print(" ".join(fields), flush=True)


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--small", action="store_true",
                        help="CPU rehearsal: tiny model, batch 8, few steps")
    common.add_rounds(parser, "round-robin rounds (default 3; small 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant per round (default 5; "
                             "small 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after the compiling one "
                             "(default 2; small 1)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default 64; small 8)")
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="default resnet50; small: tiny")
    parser.add_argument("--size", type=int, default=128,
                        help="ResNet50's input size")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS,
                        default=list(DEFAULT_SETTINGS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=list(DEFAULT_VARIANTS),
                        help="bn is always included (the baseline)")
    parser.add_argument("--jit", choices=("auto", "on", "off"),
                        default="auto", help="model.compile(jit_compile=)")
    parser.add_argument("--budget", type=float, default=0,
                        help="seconds; skip settings that would run past it "
                             "(0: no limit)")
    args = parser.parse_args(argv)

    import keras

    from renorm_convert._internal import backend as _backend

    backend = keras.backend.backend()
    names = _backend.device_names()
    on_gpu = _backend.has_gpu() and not args.small
    print(common.versions(), flush=True)
    if on_gpu:
        print(f"GPU: {', '.join(names)}")
    else:
        print("No GPU in use (" + ("--small" if args.small else
              f"Keras's {backend} backend sees none") + "): a small CPU "
              "rehearsal; its ratios say nothing about a GPU.")
    small = not on_gpu
    args.rounds = args.rounds or (2 if small else 3)
    args.steps = args.steps or (2 if small else 5)
    args.warmup = args.warmup if args.warmup is not None else (
        1 if small else 2)
    args.batch = args.batch or (8 if small else 64)
    args.model = args.model or ("tiny" if small else "resnet50")
    args.variants = [v for v in VARIANTS
                     if v == BASELINE or v in args.variants]

    log = common.stopwatch()
    start = time.perf_counter()
    print(f"rounds={args.rounds} steps/round={args.steps} warmup="
          f"{args.warmup} batch={args.batch} model={args.model} "
          f"settings={args.settings} variants={args.variants} "
          f"jit={args.jit} budget={args.budget or 'none'}", flush=True)
    last = 0.0
    done = []
    for setting in args.settings:
        elapsed = time.perf_counter() - start
        if args.budget and elapsed + last > args.budget:
            print(f"\n{setting}: skipped (the last setting took {last:.0f}s, "
                  f"{args.budget - elapsed:.0f}s of --budget left)")
            continue
        t0 = time.perf_counter()
        res = bench_setting(args, setting, log)
        last = time.perf_counter() - t0
        print_setting(args, setting, res, on_gpu, backend)
        done.append(setting)
    log(f"done: {len(done)}/{len(args.settings)} settings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
