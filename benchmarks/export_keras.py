"""ONNX export of a converted model on TensorFlow: `rc.export_onnx` against
Keras's own `model.export(path, format="onnx")`, their time and memory, and
the exported files' inference speed (benchmarks/export.py compares the
PyTorch exporter's files with tf2onnx's).

The model
---------
``--model mobilenetv2`` (default): keras.applications.MobileNetV2(weights=None,
input_shape=(96, 96, 3), classes=10, classifier_activation=None), 52 BN.
``--model resnet50``: keras.applications.ResNet50(weights=None,
input_shape=(64, 64, 3), classes=10, classifier_activation=None), 53 BN
(its export takes ~20 s and 7-9 GB of memory).

Every Conv2D / DepthwiseConv2D without a bias is rebuilt with one (random
normal biases, stddev 0.1), and every BatchNormalization gets random moving
statistics, gamma and beta, so the model looks trained: tf2onnx (which both
exporters use) folds a normalization into a Conv only while that Conv has no
bias, so Keras's plain export keeps a Mul and an Add per normalization. The
model is then converted with ``rc.convert`` and both exporters work on that
same converted model. Everything is seeded, so every process builds the same
weights (checked below: both files are compared with the Keras output).

1. Export time and peak memory
------------------------------
Variants:

  keras_export     converted.export(path, format="onnx")           (baseline)
  rc_export        rc.export_onnx(converted, path)  (folds, converts,
                   verifies with onnxruntime: the default)
  rc_noverify      rc.export_onnx(converted, path, verify=False)

Each export runs in a fresh subprocess (``--reps`` per variant, interleaved
with rotating order): the child builds and converts the model, runs one Keras
inference, reads ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the peak
resident set size so far), runs the timed export ("cold": the first export in
the process, imports of tf2onnx / onnx / onnxruntime included), reads
ru_maxrss again, then times ``--warm-exports`` more exports in the same
process ("warm"). Peak memory is reported as the growth of max RSS during
the cold export (and the absolute max RSS). tracemalloc is not used: it sees
only Python allocations, not TensorFlow's, tf2onnx's graph protobufs or
onnxruntime's, which are the bulk of an export.

2. Op counts of both files: BatchNormalization, Mul, Add, Conv, all nodes.

3. Inference latency
--------------------
onnxruntime (CPUExecutionProvider) sessions of both files with graph
optimizations on (``ORT_ENABLE_ALL``, onnxruntime's default) and off
(``ORT_DISABLE_ALL``), and a ``tf.function``-wrapped Keras call of the
converted model (``model(x, training=False)``), at batch 1 and 32. After a
warm-up, the five variants run round-robin for ``--rounds`` rounds (each
runs ``--iters`` calls per round; the order rotates from round to round);
reported is the median over all calls, and ratios of medians measured in the
same run; "paired" is the median over rounds of the per-round ratio of our
file to the plain one (a noise cross-check). All outputs are fetched as
NumPy arrays.

Targets (printed as PASS / FAIL), at both batch sizes:

* optimizations off: our file faster than the plain export (ratio < 1.0);
* optimizations on: our file no slower than the plain export (<= 1.05x);
* onnxruntime (our file, optimizations on) faster than the Keras call.

Examples::

    python benchmarks/export_keras.py            # MobileNetV2, ~4-6 min
    python benchmarks/export_keras.py --quick    # ~2 min smoke run
    python benchmarks/export_keras.py --model resnet50 --reps 2
    python benchmarks/export_keras.py --threads 1  # less thread contention
                                              # on a small, shared machine
"""

import argparse
import collections
import os
import sys
import tempfile
import time

import numpy as np

import _common as common

EXPORTS = ("keras_export", "rc_export", "rc_noverify")
LATENCY = ("ours_opt", "plain_opt", "ours_noopt", "plain_noopt", "keras_tf")
MODELS = {
    "mobilenetv2": ("MobileNetV2", (96, 96, 3)),
    "resnet50": ("ResNet50", (64, 64, 3)),
}
TARGET_OFF = 1.0
TARGET_ON = 1.05
SEED = 1234


# --- model ----------------------------------------------------------------

def build_converted(name):
    """The seeded, 'trained-looking', converted model."""
    import keras
    import renorm_convert as rc

    app, shape = MODELS[name]
    keras.utils.set_random_seed(SEED)
    base = getattr(keras.applications, app)(
        weights=None, input_shape=shape, classes=10,
        classifier_activation=None)

    def with_bias(layer):
        config = layer.get_config()
        if (isinstance(layer, (keras.layers.Conv2D,
                               keras.layers.DepthwiseConv2D))
                and not config["use_bias"]):
            config["use_bias"] = True
            config["bias_initializer"] = keras.initializers.RandomNormal(
                stddev=0.1, seed=SEED)
        return layer.__class__.from_config(config)

    keras.utils.set_random_seed(SEED)
    model = keras.models.clone_model(base, clone_function=with_bias)
    rng = np.random.default_rng(SEED)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, c).astype("float32"))
            layer.moving_variance.assign(
                rng.uniform(0.5, 2.0, c).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.1, c).astype("float32"))
    return rc.convert(model)


def sample_input(model, batch, seed=0):
    """Standard-normal inputs of the model's input shape, float32."""
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# --- 1. export time and memory ------------------------------------------------

def do_export(variant, model, path):
    import renorm_convert as rc

    if variant == "keras_export":
        model.export(path, format="onnx", verbose=False)
    elif variant == "rc_export":
        rc.export_onnx(model, path)
    elif variant == "rc_noverify":
        rc.export_onnx(model, path, verify=False)
    else:
        raise ValueError(variant)


def export_child(variant, name, path, warm):
    """Runs in a fresh process; prints 'RESULT cold warm rss0 rss1'."""
    model = build_converted(name)
    model(sample_input(model, 2), training=False)
    rss0 = common.max_rss_bytes()
    t0 = time.perf_counter()
    do_export(variant, model, path)
    cold = time.perf_counter() - t0
    rss1 = common.max_rss_bytes()
    warm_times = []
    for i in range(warm):
        t0 = time.perf_counter()
        do_export(variant, model, f"{path}.warm{i}.onnx")
        warm_times.append(time.perf_counter() - t0)
        os.unlink(f"{path}.warm{i}.onnx")
    w = float(np.median(warm_times)) if warm_times else float("nan")
    print(f"RESULT {cold} {w} {rss0} {rss1}", flush=True)


def export_in_subprocess(variant, name, path, warm):
    cold, w, rss0, rss1 = common.child_result(
        __file__, ["--_export-child", variant, name, path, warm], "RESULT")
    return float(cold), float(w), int(rss0), int(rss1)


# --- 2. op counts -----------------------------------------------------------

def op_counts(path):
    import onnx

    graph = onnx.load(path).graph
    return collections.Counter(n.op_type for n in graph.node)


# --- 3. latency -------------------------------------------------------------

def ort_session(path, optimize, threads=0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(path, options,
                                providers=["CPUExecutionProvider"])


def make_runners(model, paths, xs_np, threads=0):
    """variant -> callable(batch) returning NumPy outputs."""
    import tensorflow as tf

    runners = {}
    for tag, path in paths.items():
        for optimize in (True, False):
            sess = ort_session(path, optimize, threads)
            in_name = sess.get_inputs()[0].name
            feeds = {b: {in_name: x} for b, x in xs_np.items()}
            key = f"{tag}_{'opt' if optimize else 'noopt'}"
            runners[key] = (lambda b, s=sess, f=feeds: s.run(None, f[b]))

    fn = tf.function(lambda x: model(x, training=False))
    xs_tf = {b: tf.constant(x) for b, x in xs_np.items()}
    runners["keras_tf"] = lambda b: fn(xs_tf[b]).numpy()
    return runners


def bench_latency(runners, batches, rounds, iters, warmup, log):
    times = {(v, b): [] for v in LATENCY for b in batches}
    per_round = {(v, b): [] for v in LATENCY for b in batches}
    for b in batches:
        for v in LATENCY:
            for _ in range(warmup):
                runners[v](b)
    log("latency warm-up done")
    for r, order in common.round_robin(LATENCY, rounds):
        for b in batches:
            for v in order:
                block = common.time_calls(lambda: runners[v](b), iters[b])
                times[(v, b)].extend(block)
                per_round[(v, b)].append(float(np.median(block)))
        if (r + 1) % max(1, rounds // 4) == 0:
            log(f"latency round {r + 1}/{rounds}")
    return times, per_round


# --- report -----------------------------------------------------------------

def mib(b):
    return b / 2**20


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--model", choices=sorted(MODELS),
                        default="mobilenetv2")
    common.add_quick(parser, "smoke run: 1 export per variant, no warm "
                             "exports, 6 latency rounds")
    parser.add_argument("--reps", type=int, default=None,
                        help="export subprocesses per variant (default 3, "
                             "quick 1)")
    parser.add_argument("--warm-exports", type=int, default=None,
                        help="extra exports timed in each child after the "
                             "cold one (default 1, quick 0)")
    common.add_rounds(parser, "latency round-robin rounds (default 30, "
                              "quick 6)")
    parser.add_argument("--iters", type=int, nargs=2, default=None,
                        metavar=("B1", "B32"),
                        help="calls per variant per round at batch 1 and 32 "
                             "(default mobilenetv2: 20 3, resnet50: 10 2)")
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=(1, 32),
                        help=argparse.SUPPRESS)
    common.add_threads(parser, "latency only: onnxruntime intra-op threads "
                               "and TF intra- / inter-op threads (0: each "
                               "library's default)")
    parser.add_argument("--_export-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._export_child:
        variant, name, path, warm = args._export_child
        export_child(variant, name, path, int(warm))
        return 0

    q = args.quick
    args.reps = args.reps or (1 if q else 3)
    if args.warm_exports is None:
        args.warm_exports = 0 if q else 1
    args.rounds = args.rounds or (6 if q else 30)
    batches = tuple(args.batch_sizes)
    default_iters = (20, 3) if args.model == "mobilenetv2" else (10, 2)
    iters = dict(zip(batches, args.iters or default_iters))

    import onnxruntime as ort
    import tf2onnx

    import renorm_convert as rc

    common.set_threads(args.threads)
    log = common.stopwatch()
    print(common.versions(f"tf2onnx {tf2onnx.__version__}",
                          f"onnxruntime {ort.__version__}"))
    app, shape = MODELS[args.model]
    print(f"model={app} input={shape} export reps={args.reps} warm exports="
          f"{args.warm_exports} latency rounds={args.rounds} "
          f"iters/round={iters} threads={args.threads or 'library default'}")

    tmp = tempfile.mkdtemp(prefix="rc_export_bench_")
    paths = {v: os.path.join(tmp, f"{v}.onnx") for v in EXPORTS}

    # --- 1. export time and memory, one fresh process per export
    res = {v: [] for v in EXPORTS}
    for r in range(args.reps):
        k = r % len(EXPORTS)
        for v in EXPORTS[k:] + EXPORTS[:k]:
            res[v].append(export_in_subprocess(v, args.model, paths[v],
                                               args.warm_exports))
            log(f"export {v} rep {r + 1}/{args.reps}: cold "
                f"{res[v][-1][0]:.2f}s, max RSS +"
                f"{mib(res[v][-1][3] - res[v][-1][2]):.0f} MiB")

    # --- the model in this process, and a correctness check of both files
    model = build_converted(args.model)
    n_bn = common.count_bn(model)
    n_rc = common.count_layers(model, rc.BatchRenormalization)
    x4 = sample_input(model, 4)
    expected = np.asarray(model(x4, training=False))
    scale = float(np.abs(expected).max())
    diffs = {}
    for tag, v in (("ours", "rc_export"), ("plain", "keras_export")):
        session = ort_session(paths[v], optimize=True)
        got = session.run(None, {session.get_inputs()[0].name: x4})[0]
        diffs[tag] = float(np.abs(got - expected).max())
    log(f"model built in parent: {n_bn} BN layers ({n_rc} "
        f"BatchRenormalization), {model.count_params():,} params")

    # --- 3. latency
    xs_np = {b: sample_input(model, b, seed=1) for b in batches}
    runners = make_runners(
        model, {"ours": paths["rc_export"], "plain": paths["keras_export"]},
        xs_np, args.threads)
    times, per_round = bench_latency(runners, batches, args.rounds, iters,
                          warmup=3, log=log)
    log("done")

    # --- report
    common.print_rule()
    print(f"1. Export time and peak memory ({args.reps} fresh subprocesses per "
          "variant;\n   seconds: median [min - max]; cold = first export in "
          "the process;\n   RSS: growth of max RSS (getrusage ru_maxrss) "
          "during the cold export, and\n   the absolute max RSS after it)")
    hdr = (f"{'variant':<14}{'cold s':>8} {'[min - max]':>16}{'vs keras':>9}"
           f"{'warm s':>8}{'vs keras':>9}{'RSS +MiB':>10}{'vs keras':>9}"
           f"{'max RSS MiB':>12}")
    common.print_header(hdr)
    base = {}
    for v in EXPORTS:
        a = np.asarray(res[v], float)
        cold, warm = float(np.median(a[:, 0])), float(np.median(a[:, 1]))
        grow = float(np.median(a[:, 3] - a[:, 2]))
        peak = float(np.median(a[:, 3]))
        if v == "keras_export":
            base = {"cold": cold, "warm": warm, "grow": grow}
        wr = (f"{warm:8.2f}{warm / base['warm']:8.2f}x"
              if np.isfinite(warm) else f"{'n/a':>8}{'n/a':>9}")
        print(f"{v:<14}{cold:8.2f} "
              f"{f'[{a[:, 0].min():.2f} - {a[:, 0].max():.2f}]':>16}"
              f"{cold / base['cold']:8.2f}x{wr}"
              f"{mib(grow):10.0f}{grow / max(base['grow'], 1):8.2f}x"
              f"{mib(peak):12.0f}")

    print("\n2. Op counts")
    counts = {"ours (rc_export)": op_counts(paths["rc_export"]),
              "plain (keras_export)": op_counts(paths["keras_export"])}
    cols = ("BatchNormalization", "Mul", "Add", "Conv")
    print(f"{'file':<22}" + "".join(f"{c:>20}" for c in cols)
          + f"{'all nodes':>11}{'MiB':>7}")
    for (tag, c), v in zip(counts.items(), ("rc_export", "keras_export")):
        print(f"{tag:<22}" + "".join(f"{c.get(o, 0):>20}" for o in cols)
              + f"{sum(c.values()):>11}{mib(os.path.getsize(paths[v])):7.2f}")
    print(f"max |ONNX - Keras| at batch 4: ours {diffs['ours']:.2e}, plain "
          f"{diffs['plain']:.2e} (max |Keras output| {scale:.3g})")

    print(f"\n3. Latency, ms per call: median [p25 - p75] over "
          f"{args.rounds} rounds x iters calls; onnxruntime CPU "
          f"(threads: {args.threads or 'default'}), Keras: tf.function(model(x, training=False))")
    verdicts = []
    for b in batches:
        med = {v: float(np.median(times[(v, b)])) * 1e3 for v in LATENCY}
        print(f"\nbatch {b}   ({len(times[(LATENCY[0], b)])} calls per "
              "variant)")
        hdr = (f"{'variant':<13}{'ms':>9} {'[p25 - p75]':>18}"
               f"{'vs plain same opt':>19}{'paired':>8}{'vs keras_tf':>13}")
        common.print_header(hdr)
        for v in LATENCY:
            _, p25, p75 = common.median_iqr(np.asarray(times[(v, b)]) * 1e3)
            if v.startswith("ours"):
                other = v.replace("ours", "plain")
                paired = common.paired(per_round[(v, b)],
                                       per_round[(other, b)])
                vs_plain = (f"{med[v] / med[other]:18.3f}x"
                            f"{paired:7.3f}x")
            else:
                vs_plain = " " * 27
            print(f"{v:<13}{med[v]:9.3f} "
                  f"{f'[{p25:.3f} - {p75:.3f}]':>18}"
                  f"{vs_plain}{med[v] / med['keras_tf']:12.3f}x")
        checks = [
            ("opt off: ours faster than plain",
             med["ours_noopt"] / med["plain_noopt"], TARGET_OFF, "<"),
            ("opt on: ours no slower than plain",
             med["ours_opt"] / med["plain_opt"], TARGET_ON, "<="),
            ("onnxruntime (ours, opt on) faster than Keras",
             med["ours_opt"] / med["keras_tf"], 1.0, "<"),
        ]
        for label, ratio, target, op in checks:
            ok = ratio < target if op == "<" else ratio <= target
            verdicts.append(ok)
            print(f"  {'PASS' if ok else 'FAIL'}  {label}: {ratio:.3f}x "
                  f"(target {op} {target:.2f}x)")

    print(f"\n{common.overall(verdicts)}; files in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
