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

Clock and threads
-----------------
``--clock wall`` (default) times steps by the wall clock. ``--clock cpu``
times them by the CPU time of the whole process (``time.process_time``):
on a machine other jobs share, the time slices they take are not counted;
with ``--threads 1`` it is the time of the one thread doing the work (with
more threads, idle workers spinning count too). ``--threads`` sets
TensorFlow's pools, PyTorch's ``torch.set_num_threads`` or, on JAX, XLA's
CPU thread pool (through XLA_FLAGS, before JAX starts).

Every backend in one run (``--backends``)
-----------------------------------------
``--backends tensorflow jax torch`` runs the benchmark once per backend, each
in its own process with the interpreter of that backend's environment (the
venvs scripts/test.sh installs: .venv, .venv-jax, .venv-torch; else this
interpreter; ``--python BACKEND=PATH`` names another), with the same
arguments, one after the other. Each child's tables are printed as it runs;
at the end one summary row per backend (and family / batch size): the
ratios to Keras BN of Keras's renorm, ours and ours with microbatches, the
rounds, and the machine's load average (1 minute) before and after that
backend's run, as a text table and as a Markdown table for the README.

Operation counts (``--profile``)
--------------------------------
``--profile`` counts, instead of timing, the operations one training-mode
call of each variant's layer runs, on an input shaped like the ResNet's
first normalization (32x32x32x16) or the MLP's (512 units): on PyTorch the
ATen operations ``torch.profiler`` records in the forward pass and in the
backward pass (top-level operations: the kernels an operation calls inside
are not counted again); on TensorFlow the operations of the traced graph of
the call and of the call with its gradients; on JAX the equations of the
jaxpr of the stateless call and of its gradient. On PyTorch it also
profiles one whole ``train_on_batch`` of each ResNet model and prints the
operations per step and, over Keras BN's, per normalization layer.

Examples::

    python benchmarks/train_step.py            # full run, ~4-5 min on 2 cores
    python benchmarks/train_step.py --quick    # ~30 s smoke run
    python benchmarks/train_step.py --rounds 20 --batch-sizes 32 64
    python benchmarks/train_step.py --backends tensorflow jax torch \
        --families resnet --batch-sizes 32 --rounds 12 --memory none
    KERAS_BACKEND=torch python benchmarks/train_step.py --profile
    KERAS_BACKEND=torch python benchmarks/train_step.py --jit on
"""

import argparse
import collections
import os
import subprocess
import sys
import time

import numpy as np

import _common as common

VARIANTS = ("keras_bn", "keras_renorm", "rc", "rc_mb4", "rc_mb2")
FAMILIES = ("resnet", "mlp")
BACKENDS = ("tensorflow", "jax", "torch")
# Where scripts/test.sh installs each backend.
BACKEND_VENVS = {"tensorflow": ".venv", "jax": ".venv-jax",
                 "torch": ".venv-torch"}
# The input of one normalization layer in --profile: the ResNet's first
# (after the 16-filter stem convolution) and the MLP's.
PROFILE_SHAPES = {"resnet": (32, 32, 32, 16), "mlp": (32, 512)}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
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


def time_steps(call, n, clock):
    """Seconds of each of `n` calls of `call()` by `clock`."""
    seconds = []
    for _ in range(n):
        start = clock()
        call()
        seconds.append(clock() - start)
    return seconds


def build_models(family, batch, keys, args, log, x, y):
    """{(variant, jit): model}, each compiled and warmed up."""
    models = {}
    for v, jit in keys:
        t0 = time.perf_counter()
        model = models[v, jit] = make_model(family, v, jit)
        model.train_on_batch(x, y)   # trace / compile
        for _ in range(args.warmup):
            model.train_on_batch(x, y)
        log(f" built+warmed {family}/b{batch}/{v} "
            f"(jit_compile={model.jit_compile}, "
            f"{common.count_bn(model)} BN layers) in "
            f"{time.perf_counter() - t0:.1f}s")
    return models


def time_rounds(models, family, args, x, y):
    """Interleaved rounds: (every timed step, each round's median) of every
    model."""
    steps = args.steps or {"resnet": 2 if args.quick else 4,
                           "mlp": 5 if args.quick else 10}[family]
    times = {key: [] for key in models}
    per_round = {key: [] for key in models}
    for _, order in common.round_robin(models, args.rounds):
        for key in order:
            block = time_steps(  # returns numpy: synchronous
                lambda model=models[key]: model.train_on_batch(x, y), steps,
                CLOCKS[args.clock])
            times[key].extend(block)
            per_round[key].append(np.median(block))
    return times, per_round


def bench_family(family, batch, args, log):
    """Times every variant under every --jit setting in the same rounds.
    Returns {jit: ({variant: (median ms, p25, p75, peak bytes, paired vs
    BN, steps)}, the setting Keras resolved)} and {jit: {variant: paired
    ratio to the first setting}} for the other settings."""
    x, y = on_device(*make_data(family, batch))
    keys = [(v, jit) for jit in args.jit for v in args.variants]
    models = build_models(family, batch, keys, args, log, x, y)
    times, per_round = time_rounds(models, family, args, x, y)
    labels = {jit: {True: "jit", False: "eager"}.get(
        models["keras_bn", jit].jit_compile,
        str(models["keras_bn", jit].jit_compile)) for jit in args.jit}
    mem = {}
    if args.memory == "allocator":
        for key, model in models.items():
            # median over a few steps: the executor's op order (and so the
            # peak) varies a little from step to step
            mem[key] = float(np.median([allocator_peak_step(model, x, y)
                                        for _ in range(5)]))
    del models
    if args.memory == "rss":
        for v, jit in keys:
            mem[v, jit] = rss_in_subprocess(family, v, batch, jit,
                                            args.warmup + 3)
    results = {jit: ({v: (*(1e3 * t for t in common.median_iqr(
        times[v, jit])), mem.get((v, jit)), common.paired(
            per_round[v, jit], per_round["keras_bn", jit]),
        len(times[v, jit])) for v in args.variants}, labels[jit])
        for jit in args.jit}
    first = args.jit[0]
    across = {jit: {v: common.paired(per_round[v, jit], per_round[v, first])
                    for v in args.variants} for jit in args.jit[1:]}
    return results, across


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


def print_table(family, batch, res, jit_label, rounds):
    import keras

    base_t = res["keras_bn"][0]
    base_m = res["keras_bn"][3]
    n = res["keras_bn"][5]
    print(f"\n{family}  batch={batch}  {jit_label}   ({n} timed steps per "
          "variant)")
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
        ratio = res["rc"][0] / res["keras_renorm"][0]
        print(f"rc vs keras_renorm (step time): {ratio:.3f}x")
        print(f"RATIO backend={keras.backend.backend()} family={family} "
              f"batch={batch} rc/keras_renorm={ratio:.3f} "
              f"rc/keras_bn={res['rc'][0] / base_t:.3f}")
    # One line for --backends to collect: ratio of medians and paired.
    fields = [f"backend={keras.backend.backend()}", f"jit={jit_label}",
              f"family={family}", f"batch={batch}", f"rounds={rounds}",
              f"steps={n}"]
    fields += [f"{v}={r[0] / base_t:.3f},{r[4]:.3f}" for v, r in res.items()
               if v != "keras_bn"]
    print("SUMMARY " + " ".join(fields))


# --- every backend in one run ----------------------------------------------

def backend_python(backend, given):
    """The interpreter for `backend`: --python BACKEND=PATH, else the venv
    scripts/test.sh installs it in, else this one."""
    for item in given:
        name, _, path = item.partition("=")
        if name == backend and path:
            return path
    venv = os.path.join(common.ROOT, BACKEND_VENVS[backend], "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def child_arguments(args):
    """This run's arguments, for a child that runs one backend."""
    argv = ["--rounds", args.rounds, "--warmup", args.warmup,
            "--batch-sizes", *args.batch_sizes, "--families", *args.families,
            "--variants", *args.variants, "--jit", *args.jit,
            "--memory", args.memory, "--clock", args.clock,
            "--threads", args.threads]
    if args.steps:
        argv += ["--steps", args.steps]
    if args.quick:
        argv.append("--quick")
    if args.profile:
        argv.append("--profile")
    return [str(a) for a in argv]


def run_backend(backend, args):
    """Runs this script on `backend` in a child process, echoing its
    output; returns (its SUMMARY fields, load before, load after, exit
    status)."""
    python = backend_python(backend, args.python)
    env = dict(os.environ, KERAS_BACKEND=backend)
    cmd = [python, os.path.abspath(__file__), *child_arguments(args)]
    print(f"\n##### {backend}: {' '.join(cmd)}", flush=True)
    load_before = os.getloadavg()[0]
    rows = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            print(line, end="", flush=True)
            if line.startswith("SUMMARY "):
                rows.append(dict(f.split("=", 1) for f in line.split()[1:]))
    return rows, load_before, os.getloadavg()[0], child.returncode


def run_backends(args):
    print(f"{os.cpu_count()} CPUs; load average (1 min) before the run: "
          f"{os.getloadavg()[0]:.2f}")
    table, status = [], 0
    for backend in args.backends:
        rows, before, after, code = run_backend(backend, args)
        status = status or code
        if code or not rows:
            print(f"##### {backend}: exit status {code}, no summary")
        table += [dict(row, load=f"{before:.1f}-{after:.1f}") for row in rows]
    if not args.profile:
        print_summary(table, args)
    return status


def _ratio(row, variant, paired=False):
    if variant not in row:
        return "-"
    return row[variant].split(",")[1 if paired else 0] + "x"


SUMMARY_COLUMNS = (("ours / BN", "rc"), ("Keras renorm / BN", "keras_renorm"),
                   ("ours, mb 4 / BN", "rc_mb4"),
                   ("ours, mb 2 / BN", "rc_mb2"))


def print_summary(table, args):
    """One row per backend, family and batch: text, then Markdown."""
    common.print_rule()
    print(f"Summary: step time vs Keras BatchNormalization, ratio of medians "
          f"(paired in brackets), {args.rounds} interleaved rounds, "
          f"{args.clock} clock, threads={args.threads or 'default'}, "
          f"{os.cpu_count()} CPUs; load: 1-minute load average before-after "
          "each backend's run")
    header = (f"{'backend':<11}{'step':<7}{'model':<13}"
              + "".join(f"{title:>19}" for title, _ in SUMMARY_COLUMNS)
              + f"{'load':>10}")
    common.print_header(header)
    for row in table:
        model = f"{row['family']} b{row['batch']}"
        cells = "".join(
            f"{_ratio(row, v) + ' (' + _ratio(row, v, True) + ')':>19}"
            for _, v in SUMMARY_COLUMNS)
        print(f"{row['backend']:<11}{row['jit']:<7}{model:<13}{cells}"
              f"{row['load']:>10}")
    print("\nMarkdown:\n")
    print("| backend (training step) | model | "
          + " | ".join(title for title, _ in SUMMARY_COLUMNS)
          + " | load before-after |")
    print("|---|---|" + "---|" * len(SUMMARY_COLUMNS) + "---|")
    for row in table:
        cells = " | ".join(f"{_ratio(row, v)} ({_ratio(row, v, True)})"
                           for _, v in SUMMARY_COLUMNS)
        print(f"| {row['backend']} ({row['jit']}) | {row['family']}, batch "
              f"{row['batch']} | {cells} | {row['load']} |")
    print()


# --- operation counts ----------------------------------------------------------

def _aten_counts(run):
    """ATen operations torch.profiler records while `run()` runs, top-level
    only (an operation's own inner calls are not counted again)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and not (
                parent is not None and parent.name.startswith("aten::")):
            counts[event.name[6:]] += 1
    return counts


def python_calls(run):
    """Python function calls (cProfile's count) while `run()` runs: in
    eager mode the overhead of each Keras operation is mostly these."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(run)
    return pstats.Stats(prof).total_calls - 1


def torch_layer_ops(layer, x):
    import torch

    x = torch.tensor(x, requires_grad=True)
    for _ in range(2):  # first calls build and cache
        layer(x, training=True).sum().backward()
    out = {}
    forward = _aten_counts(lambda: out.setdefault(
        "y", layer(x, training=True)))
    loss = out["y"].sum()
    backward = _aten_counts(loss.backward)
    calls = python_calls(lambda: layer(x, training=True))
    return forward, backward, calls


def tf_layer_ops(layer, x):
    import tensorflow as tf

    def forward(t):
        return layer(t, training=True)

    def with_gradients(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            loss = tf.reduce_sum(layer(t, training=True))
        return tape.gradient(loss, [t] + layer.trainable_weights)

    spec = tf.TensorSpec(x.shape, tf.float32)
    counts = []
    for fn in (forward, with_gradients):
        graph = tf.function(fn).get_concrete_function(spec).graph
        counts.append(collections.Counter(
            op.type for op in graph.get_operations()
            if op.type not in ("Placeholder", "NoOp")))
    both = counts[1]
    both.subtract(counts[0])
    return counts[0], +both, None


def _jaxpr_counts(jaxpr, counts):
    for eqn in jaxpr.eqns:
        inner = [p for p in eqn.params.values() if hasattr(p, "jaxpr")]
        if inner:  # a call (pjit, custom_jvp): count what it runs
            for p in inner:
                _jaxpr_counts(p.jaxpr, counts)
        else:
            counts[eqn.primitive.name] += 1
    return counts


def jax_layer_ops(layer, x):
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(values, t):
        return layer.stateless_call(values, non_trainable, t, training=True)

    def loss(values, t):
        y, updates = forward(values, t)
        return y.sum(), updates

    counts = []
    for fn in (forward, jax.grad(loss, argnums=(0, 1), has_aux=True)):
        counts.append(_jaxpr_counts(
            jax.make_jaxpr(fn)(trainable, x).jaxpr, collections.Counter()))
    both = counts[1]
    both.subtract(counts[0])
    return counts[0], +both, None


def layer_ops(variant, shape):
    """(forward, backward) operation counts of one training call of a
    fresh `variant` layer on a `shape` input (see the docstring), and on
    PyTorch the Python calls of its forward pass (None elsewhere)."""
    import keras

    counter = {"torch": torch_layer_ops, "tensorflow": tf_layer_ops,
               "jax": jax_layer_ops}[keras.backend.backend()]
    layer = make_norm(variant)
    layer.build(shape)
    x = np.random.default_rng(SEED).standard_normal(shape).astype("float32")
    return counter(layer, x)


def torch_step_ops(family, variant, batch):
    """ATen operations of one train_on_batch of the `family` model."""
    x, y = on_device(*make_data(family, batch))
    model = make_model(family, variant, "auto")
    for _ in range(2):
        model.train_on_batch(x, y)
    return sum(_aten_counts(lambda: model.train_on_batch(x, y)).values()), \
        common.count_bn(model)


def _top(counts, base, k=6):
    """The operations `counts` has most more of than `base`."""
    extra = counts.copy()
    extra.subtract(base)
    return ", ".join(f"{name} {n:+d}" for name, n in extra.most_common(k)
                     if n > 0)


def profile(args):
    import keras

    backend = keras.backend.backend()
    unit = {"torch": "ATen ops (torch.profiler)",
            "tensorflow": "graph ops", "jax": "jaxpr equations"}[backend]
    print(f"{common.versions()}: {unit} of one training-mode layer call")
    for family in args.families:
        shape = PROFILE_SHAPES[family]
        print(f"\n{family}: one layer on a {shape} input; extra: the "
              "operations with the most calls over keras_bn's (forward)")
        common.print_header(f"{'variant':<13}{'forward':>8}{'backward':>9}"
                            f"{'py calls':>9}  extra over keras_bn")
        base = None
        for v in args.variants:
            forward, backward, calls = layer_ops(v, shape)
            base = base or forward
            print(f"{v:<13}{sum(forward.values()):>8}"
                  f"{sum(backward.values()):>9}"
                  f"{'-' if calls is None else calls:>9}  "
                  f"{_top(forward, base)}")
        if backend != "torch" or family != "resnet":
            continue
        batch = args.batch_sizes[0]
        print(f"\n{family} model, one train_on_batch (batch {batch}): {unit}")
        common.print_header(f"{'variant':<13}{'per step':>9}"
                            f"{'per norm. layer over keras_bn':>32}")
        steps = {v: torch_step_ops(family, v, batch) for v in args.variants}
        base_ops = steps["keras_bn"][0]
        for v, (ops_, layers) in steps.items():
            print(f"{v:<13}{ops_:>9}{(ops_ - base_ops) / layers:>32.1f}")
    return 0


def parse_args(argv):
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
    parser.add_argument("--jit", choices=("auto", "on", "off"), nargs="+",
                        default=["auto"],
                        help="model.compile(jit_compile=...): auto (Keras's "
                             "default; XLA on TF when all layers support it), "
                             "on, off; several (--jit off on) time every "
                             "variant under each, in the same rounds")
    parser.add_argument("--memory", choices=("allocator", "rss", "none"),
                        default="allocator",
                        help="how to measure peak memory (see above)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall clock, or the process's CPU time (see "
                             "above)")
    common.add_threads(parser, "threads of the backend's CPU pools: "
                               "TensorFlow's intra- and inter-op pools, "
                               "PyTorch's, XLA's on JAX (1 only); 0: the "
                               "backend's default")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        help="run on each of these backends in turn, each "
                             "in its own process, and print a summary row "
                             "per backend (see above)")
    parser.add_argument("--python", action="append", default=[],
                        metavar="BACKEND=PATH",
                        help="with --backends: the interpreter for BACKEND "
                             "(default: the venv scripts/test.sh uses)")
    parser.add_argument("--profile", action="store_true",
                        help="count each variant's operations per layer "
                             "call instead of timing (see above)")
    parser.add_argument("--_rss-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (4 if q else 50)
    args.warmup = args.warmup if args.warmup is not None else (3 if q else 10)
    args.batch_sizes = args.batch_sizes or ([32] if q else [32, 64])
    variants = ["keras_bn"] + [v for v in args.variants if v != "keras_bn"]
    args.variants = [v for v in VARIANTS if v in variants]
    return args


def set_threads(backend, threads):
    """The backend's CPU thread pools to `threads` (0 leaves them); on JAX
    before it is imported. Returns the number in effect (0: default)."""
    if not threads:
        return 0
    if backend == "tensorflow":
        common.set_threads(threads)
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)
    elif threads == 1:
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [
            os.environ.get("XLA_FLAGS"), "--xla_cpu_multi_thread_eigen=false",
            "intra_op_parallelism_threads=1"]))
    else:
        print(f"--threads {threads}: JAX takes 1 only; left at its default")
        return 0
    return threads


def main(argv=None):
    args = parse_args(argv)
    if args._rss_child:
        fam, var, batch, jit, steps = args._rss_child
        rss_child(fam, var, int(batch), jit, int(steps))
        return 0
    if args.backends:
        return run_backends(args)
    args.threads = set_threads(os.environ["KERAS_BACKEND"], args.threads)
    if args.profile:
        return profile(args)
    return run_timing(args)


def run_timing(args):
    import keras

    backend = keras.backend.backend()
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
    print(f"{common.versions()}, jit_compile={' '.join(args.jit)}, "
          f"threads={args.threads or 'default'}, clock={args.clock}")
    print(f"rounds={args.rounds} steps/round={args.steps or 'per family'} "
          f"warmup={args.warmup} batch sizes={args.batch_sizes} "
          f"memory={args.memory}")
    results = {}
    for family in args.families:
        for batch in args.batch_sizes:
            log(f"{family} batch {batch}")
            results[family, batch] = bench_family(family, batch, args, log)
    log("done")

    common.print_rule()
    print(f"ms/step ({args.clock} clock): median [p25 - p75] of all timed "
          "steps; vs BN: ratio of medians (BN with the same jit_compile);"
          "\npaired: median over rounds of per-round ratios; peak MiB: "
          f"{mem_label}")
    for (family, batch), (by_jit, across) in results.items():
        for jit, (res, label) in by_jit.items():
            print_table(family, batch, res, label, args.rounds)
        for jit, ratios in across.items():
            print(f"\n{family} batch={batch}: step time with --jit {jit} / "
                  f"--jit {args.jit[0]} (paired, same variant): " + ", ".join(
                      f"{v} {r:.3f}x" for v, r in ratios.items()))
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
