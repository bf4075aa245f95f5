"""Training-step cost of `rc.BatchRenormalization` against Keras's BatchNormalization,
on the Keras backend KERAS_BACKEND picks (TensorFlow, JAX or PyTorch).

What is measured
----------------
Two model families, each built five times with only the normalization layer
changed (same seed, so every Conv2D / Dense starts from the same weights):

* ``resnet``: 32x32x3 inputs, a stem Conv2D and four residual blocks
  (Conv2D -> BN -> ReLU, two with a projection shortcut), 11 BN layers,
  global average pooling and a 10-way Dense head.
* ``mlp``: 784 inputs, four Dense(512) -> BN -> ReLU layers, a 10-way head.

Variants of the normalization layer:

  keras_bn     keras.layers.BatchNormalization()                 (baseline)
  keras_renorm keras.layers.BatchNormalization(renorm=True,
                   renorm_clipping={"rmax": 3, "rmin": 1/3, "dmax": 5})
  rc           rc.BatchRenormalization()
  rc_mb4       rc.BatchRenormalization(microbatch_size=4)
  rc_mb2       rc.BatchRenormalization(microbatch_size=2)

Each model is compiled with ``model.compile(optimizer="sgd",
loss=SparseCategoricalCrossentropy(from_logits=True), jit_compile=...)``
(``--jit auto`` is Keras's default; on a CPU-only TensorFlow machine Keras
resolves it to *no* XLA, on JAX to jax.jit, on PyTorch to eager; the
resolved value is printed) and timed with ``model.train_on_batch`` on
one fixed batch of random data, so the time is one full training step: the
forward pass, the backward pass, the SGD update and the moving-statistic
updates, plus the (identical) Python overhead of ``train_on_batch``.

After a warm-up (tracing / compilation plus a few steps), the variants are
run round-robin: in every round each variant runs ``--steps`` timed steps
(default 4 for the ResNet, 10 for the cheaper MLP), and
the order of the variants rotates from round to round, so slow phases of a
shared, noisy machine fall on all variants alike. The reported time is the
median of all timed steps of a variant; ratios ("vs BN") are ratios of these
medians against the Keras BN baseline of the same family and batch size,
measured in the same run, and decide PASS / FAIL. As a noise cross-check the
"paired" column is the median over rounds of (variant's median in that round /
baseline's median in the same round), which cancels slow load swings.

Peak memory
-----------
``--memory allocator`` (default): TensorFlow's CPU allocator statistics
(``tf.config.experimental.reset_memory_stats`` / ``get_memory_info("CPU:0")``)
around one training step; the reported number is the step's peak allocation
above what was live before it (activations, gradients, temporaries; the
weights of all models are resident and excluded). The script checks that the
allocator reports non-zero numbers and otherwise falls back to:
``--memory rss``: every variant in a fresh subprocess; the max RSS
(``resource.getrusage``) after warm-up and timed steps, minus the max RSS
after the model was built (the tracing / compilation cost is in both).
The allocator is TensorFlow's: on JAX and PyTorch the default is rss.
``--memory none`` measures no memory (no subprocesses: quicker).

Targets (printed as PASS / FAIL): without microbatches ``rc`` at most 1.03x
the Keras BN step time; with microbatches at most 1.10x.

Examples::

    python benchmarks/train_step.py            # full run, ~4-5 min on 2 cores
    python benchmarks/train_step.py --quick    # ~30 s smoke run
    python benchmarks/train_step.py --rounds 20 --batch-sizes 32 64
"""

import argparse
import sys
import time

import numpy as np

import _common as common

VARIANTS = ("keras_bn", "keras_renorm", "rc", "rc_mb4", "rc_mb2")
FAMILIES = ("resnet", "mlp")
TARGET_PLAIN = 1.03
TARGET_MB = 1.10
SEED = 1234


# --- models ---------------------------------------------------------------

def make_norm(variant):
    import keras
    import renorm_convert as rc

    if variant == "keras_bn":
        return keras.layers.BatchNormalization()
    if variant == "keras_renorm":
        return keras.layers.BatchNormalization(
            renorm=True,
            renorm_clipping={"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0},
        )
    if variant == "rc":
        return rc.BatchRenormalization()
    if variant.startswith("rc_mb"):
        return rc.BatchRenormalization(microbatch_size=int(variant[5:]))
    raise ValueError(f"unknown variant {variant!r}")


def build_resnet(variant):
    return common.build_resnet(lambda: make_norm(variant),
                               name=f"resnet_{variant}")


def build_mlp(variant):
    import keras
    from keras import layers

    inputs = keras.Input((784,))
    x = inputs
    for _ in range(4):
        x = layers.Dense(512, use_bias=False)(x)
        x = make_norm(variant)(x)
        x = layers.ReLU()(x)
    outputs = layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name=f"mlp_{variant}")


BUILDERS = {"resnet": build_resnet, "mlp": build_mlp}


def make_data(family, batch):
    rng = np.random.default_rng(SEED)
    shape = (batch, 32, 32, 3) if family == "resnet" else (batch, 784)
    x = rng.standard_normal(shape).astype("float32")
    y = rng.integers(0, 10, size=(batch,)).astype("int32")
    return x, y


def make_model(family, variant, jit):
    import keras

    keras.utils.set_random_seed(SEED)  # same Conv2D / Dense weights for all
    model = BUILDERS[family](variant)
    jit_compile = {"auto": "auto", "on": True, "off": False}[jit]
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


# --- memory ---------------------------------------------------------------

def allocator_peak_step(model, x, y):
    """Peak CPU-allocator bytes above the pre-step level during one step
    (TensorFlow only)."""
    import tensorflow as tf

    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    model.train_on_batch(x, y)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return max(peak - before, 0)


def rss_child(family, variant, batch, jit, steps):
    """Runs in a fresh process; prints 'RSS <built> <peak>' in bytes."""
    x, y = on_device(*make_data(family, batch))
    model = make_model(family, variant, jit)
    built = common.max_rss_bytes()
    for _ in range(steps):
        model.train_on_batch(x, y)
    print(f"RSS {built} {common.max_rss_bytes()}", flush=True)


def rss_in_subprocess(family, variant, batch, jit, steps):
    built, peak = map(int, common.child_result(
        __file__, ["--_rss-child", family, variant, batch, jit, steps],
        "RSS"))
    return peak - built


# --- timing ---------------------------------------------------------------

def on_device(*arrays):
    """The arrays as the backend's tensors (made once: the steps time the
    step, not the copy)."""
    import keras

    return [keras.ops.convert_to_tensor(a) for a in arrays]


def bench_family(family, batch, variants, args, log):
    x, y = on_device(*make_data(family, batch))
    models = {}
    for v in variants:
        t0 = time.perf_counter()
        models[v] = make_model(family, v, args.jit)
        models[v].train_on_batch(x, y)   # trace / compile
        for _ in range(args.warmup):
            models[v].train_on_batch(x, y)
        log(f" built+warmed {family}/b{batch}/{v} "
            f"(jit_compile={models[v].jit_compile}, "
            f"{common.count_bn(models[v])} BN layers) in "
            f"{time.perf_counter() - t0:.1f}s")

    steps = args.steps or {"resnet": 2 if args.quick else 4,
                           "mlp": 5 if args.quick else 10}[family]
    times = {v: [] for v in variants}
    per_round = {v: [] for v in variants}
    for _, order in common.round_robin(variants, args.rounds):
        for v in order:
            block = common.time_calls(  # returns numpy: synchronous
                lambda: models[v].train_on_batch(x, y), steps)
            times[v].extend(block)
            per_round[v].append(np.median(block))
    paired = {v: common.paired(per_round[v], per_round["keras_bn"])
              for v in variants}

    mem = {}
    if args.memory == "allocator":
        for v in variants:
            # median over a few steps: the executor's op order (and so the
            # peak) varies a little from step to step
            mem[v] = float(np.median([allocator_peak_step(models[v], x, y)
                                      for _ in range(5)]))
    del models
    if args.memory == "rss":
        for v in variants:
            mem[v] = rss_in_subprocess(family, v, batch, args.jit,
                                       args.warmup + 3)
    return {v: (*(1e3 * t for t in common.median_iqr(times[v])),
                mem.get(v), paired[v], len(times[v])) for v in variants}


def allocator_works():
    import keras

    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        a = tf.random.normal([256, 1024])
        b = tf.matmul(a, a, transpose_b=True)
        info = tf.config.experimental.get_memory_info("CPU:0")
        del a, b
        return info["peak"] > 0
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


# --- report ---------------------------------------------------------------

def verdict(variant, ratio):
    if variant == "rc":
        target = TARGET_PLAIN
    elif variant.startswith("rc_mb"):
        target = TARGET_MB
    else:
        return ""
    return common.verdict(ratio <= target, f"<= {target:.2f}x")


def fmt_mem(b):
    return "n/a" if b is None else f"{b / 2**20:8.2f}"


def print_table(family, batch, res, mem_label):
    base_t = res["keras_bn"][0]
    base_m = res["keras_bn"][3]
    n = res["keras_bn"][5]
    print(f"\n{family}  batch={batch}   ({n} timed steps per variant)")
    hdr = (f"{'variant':<13}{'ms/step':>9} {'[p25 - p75]':>16}{'vs BN':>8}"
           f"{'paired':>8}{'peak MiB':>10}{'vs BN':>8}  target (time vs BN)")
    common.print_header(hdr)
    for v, (t, p25, p75, m, pr, _) in res.items():
        mratio = (f"{m / base_m:7.2f}x" if m is not None and base_m
                  else "    n/a")
        print(f"{v:<13}{t:9.2f} {f'[{p25:.2f} - {p75:.2f}]':>16}"
              f"{t / base_t:7.3f}x{pr:7.3f}x{fmt_mem(m):>10}{mratio}  "
              f"{verdict(v, t / base_t)}")
    if "keras_renorm" in res and "rc" in res:
        import keras

        ratio = res["rc"][0] / res["keras_renorm"][0]
        print(f"rc vs keras_renorm (step time): {ratio:.3f}x")
        print(f"RATIO backend={keras.backend.backend()} family={family} "
              f"batch={batch} rc/keras_renorm={ratio:.3f} "
              f"rc/keras_bn={res['rc'][0] / base_t:.3f}")


def main(argv=None):
    parser = common.parser(__doc__)
    common.add_quick(parser, "short smoke run: 4 rounds, batch 32 only")
    common.add_rounds(parser, "round-robin rounds (default 50, quick 4)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant per round (default: "
                             "resnet 4, mlp 10; quick: resnet 2, mlp 5)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after compilation (default 10, "
                             "quick 3)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes (default 32 64, quick 32)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES,
                        default=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=list(VARIANTS),
                        help="keras_bn is always included (the baseline)")
    parser.add_argument("--jit", choices=("auto", "on", "off"), default="auto",
                        help="model.compile(jit_compile=...): auto (Keras's "
                             "default; XLA on TF when all layers support it), "
                             "on, off")
    parser.add_argument("--memory", choices=("allocator", "rss", "none"),
                        default="allocator",
                        help="how to measure peak memory (see above)")
    common.add_threads(parser)
    parser.add_argument("--_rss-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._rss_child:
        fam, var, batch, jit, steps = args._rss_child
        rss_child(fam, var, int(batch), jit, int(steps))
        return 0

    q = args.quick
    args.rounds = args.rounds or (4 if q else 50)
    args.warmup = args.warmup if args.warmup is not None else (3 if q else 10)
    args.batch_sizes = args.batch_sizes or ([32] if q else [32, 64])
    variants = ["keras_bn"] + [v for v in args.variants if v != "keras_bn"]
    variants = [v for v in VARIANTS if v in variants]

    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        common.set_threads(args.threads)
    elif args.threads:
        print(f"--threads sets TensorFlow's pools; ignored on {backend}")
        args.threads = 0
    if args.memory == "allocator" and not allocator_works():
        print("TF CPU allocator reports no usage" if backend == "tensorflow"
              else f"no allocator statistics on {backend}", end="")
        print("; falling back to --memory rss")
        args.memory = "rss"
    mem_label = {"allocator": "TF CPU allocator peak during one step, "
                              "above pre-step level",
                 "rss": "max RSS growth after model build, fresh subprocess",
                 "none": "not measured (--memory none)"}[args.memory]

    log = common.stopwatch()
    print(f"{common.versions()}, jit_compile={args.jit}, "
          f"threads={args.threads or 'default'}")
    print(f"rounds={args.rounds} steps/round={args.steps or 'per family'} "
          f"warmup={args.warmup} batch sizes={args.batch_sizes} "
          f"memory={args.memory}")
    results = {}
    for family in args.families:
        for batch in args.batch_sizes:
            log(f"{family} batch {batch}")
            results[(family, batch)] = bench_family(
                family, batch, variants, args, log)
    log("done")

    common.print_rule()
    print("ms/step: median [p25 - p75] of all timed steps; vs BN: ratio of "
          "medians;\npaired: median over rounds of per-round ratios; "
          f"peak MiB: {mem_label}")
    for (family, batch), res in results.items():
        print_table(family, batch, res, mem_label)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
