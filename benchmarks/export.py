"""ONNX export on PyTorch against TensorFlow: the same model exported on
each backend (`rc.export_onnx`: the dynamo exporter on PyTorch, tf2onnx on
TensorFlow, then the same clean-up), the files' node counts, and
onnxruntime's latency of the PyTorch file as a ratio of the TensorFlow
file's, measured in paired, interleaved rounds in one run.

It needs a Python where TensorFlow, tf2onnx, PyTorch and onnxscript are all
installed (the project's venvs have one backend each; a scratch venv with
both, e.g. `pip install -e ".[tensorflow,torch]"`).

The models
----------
The two reference models (renorm_convert/reference/) and three
keras.applications models (weights=None, 10 classes, no final softmax):
MobileNetV2 at 96x96, ResNet50 at 64x64, EfficientNetB0 at 64x64. Each is
converted (`rc.convert`) and made to look fine-tuned: every normalization
layer's statistics, gamma and beta and every bias random (seeded). A child
process on TensorFlow builds them once and saves each as .keras; every
export reads those files, so both backends export the same weights.

1. Export: one child process per backend (KERAS_BACKEND set) loads each
   file and exports it, verified against Keras on that backend on random
   inputs; it reports the seconds, the nodes, the op counts and the
   parity.
2. Latency: this process runs both files of a model in onnxruntime (CPU,
   its default graph optimizations, --threads intra-op threads), at batch
   1 and 32: after a warm-up, --rounds rounds, each timing a block of
   --calls calls of each file in an order that alternates from round to
   round, with a pause before each block (onnxruntime's threads spin for a
   while after a run; on 2 cores they would slow the next block). Reported:
   each file's median over rounds of its block medians, and the paired
   ratio PyTorch / TensorFlow: the median over rounds of the ratio within a
   round. `--clock cpu` times instead the CPU time of the thread running a
   1-thread session (thread spinning off), which other processes' load
   hardly moves.

Targets (PASS / FAIL): the PyTorch file has no more nodes than the
TensorFlow file plus one Transpose per input and output; its latency is
within 1.05x of the TensorFlow file's (paired ratio), at both batch sizes.

Examples::

    python benchmarks/export.py                     # about 10 min on 2 cores
    python benchmarks/export.py --quick             # the reference models
    python benchmarks/export.py --models resnet_fmnist --rounds 40
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import _common as common

APPLICATIONS = {  # name: (keras.applications class, input shape)
    "MobileNetV2": ("MobileNetV2", (96, 96, 3)),
    "ResNet50": ("ResNet50", (64, 64, 3)),
    "EfficientNetB0": ("EfficientNetB0", (64, 64, 3)),
}
MODELS = common.REFERENCE_MODELS + tuple(APPLICATIONS)
BACKENDS = ("tensorflow", "torch")
TARGET_LATENCY = 1.05
SEED = 1234


# --- the child processes ---------------------------------------------------------

def build(name, path):
    """The converted, fine-tuned-looking model `name`, saved to `path`."""
    import keras
    import numpy as np

    import renorm_convert as rc

    keras.utils.set_random_seed(SEED)
    if name in APPLICATIONS:
        app, shape = APPLICATIONS[name]
        model = getattr(keras.applications, app)(
            weights=None, input_shape=shape, classes=10,
            classifier_activation=None)
    else:
        model = common.load_reference(name)
    model = rc.convert(model)
    rng = np.random.default_rng(SEED)
    for layer in rc.iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            for v in layer.weights:
                low, high = ((0.5, 1.5) if v.path.endswith(
                    ("gamma", "variance", "stddev")) else (-0.2, 0.2))
                if not v.path.endswith(("r_max", "d_max")):
                    v.assign(rng.uniform(low, high, v.shape).astype(
                        "float32"))
    for v in model.weights:
        if v.path.endswith("/bias"):
            v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    model.save(path)


def export(path, out):
    """Exports the .keras file `path` on this process's backend; the
    result as a dict."""
    import keras

    import renorm_convert as rc

    model = keras.models.load_model(path)
    start = time.perf_counter()
    report = rc.export_onnx(model, out)
    return {"seconds": time.perf_counter() - start,
            "nodes": sum(report.op_counts.values()),
            "ops": report.op_counts, "exporter": report.exporter,
            "relative_diff": report.relative_diff,
            "inputs": len(report.input_names),
            "outputs": len(report.output_names),
            "graph": vars(report.graph)}


def child(job, names, work):
    if job == "build":
        for name in names:
            build(name, os.path.join(work, f"{name}.keras"))
        print("RESULT {}", flush=True)
        return
    results = {name: export(os.path.join(work, f"{name}.keras"),
                            os.path.join(work, f"{name}.{job}.onnx"))
               for name in names}
    import keras

    results["versions"] = common.versions()
    results["backend"] = keras.backend.backend()
    print("RESULT " + json.dumps(results), flush=True)


def run_child(job, backend, names, work):
    env = dict(os.environ, KERAS_BACKEND=backend)
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", job,
           work, *names]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{job} on {backend} failed (exit {out.returncode})"
                       f":\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


# --- latency -------------------------------------------------------------------------

def latency(files, batch, args):
    """{backend: [per-round block median, ms]} of both files of a model:
    wall time, or with `--clock cpu` the CPU time of the one thread that
    runs a 1-thread session (other processes' load hardly moves it)."""
    import numpy as np

    cpu = args.clock == "cpu"
    clock = time.thread_time if cpu else time.perf_counter
    runs = common.ort_sessions(files, 1 if cpu else args.threads,
                              spinning=not cpu)
    feeds = {}
    for backend, session in runs.items():
        first = session.get_inputs()[0]
        shape = [batch] + [int(d) for d in first.shape[1:]]
        x = np.random.default_rng(0).normal(size=shape).astype("float32")
        feeds[backend] = {first.name: x}
    for backend, session in runs.items():  # warm-up
        for _ in range(3):
            session.run(None, feeds[backend])
    times = {backend: [] for backend in runs}
    for _, order in common.round_robin(runs, args.rounds):
        for backend in order:
            session, feed = runs[backend], feeds[backend]
            time.sleep(args.pause)
            block = []
            for _ in range(args.calls):
                start = clock()
                session.run(None, feed)
                block.append(clock() - start)
            times[backend].append(1000 * float(np.median(block)))
    return times


# --- report -------------------------------------------------------------------------

def print_exports(names, exported):
    common.print_rule()
    print("1. Export (each file verified against Keras on its backend)")
    header = (f"{'model':<17}{'backend':<12}{'nodes':>6}{'Transpose':>10}"
              f"{'Mul':>5}{'Add':>5}{'Conv':>5}{'export s':>9}"
              f"{'rel. diff':>11}")
    common.print_header(header)
    verdicts = []
    for name in names:
        for backend in BACKENDS:
            r = exported[backend][name]
            ops = r["ops"]
            print(f"{name:<17}{backend:<12}{r['nodes']:>6}"
                  f"{ops.get('Transpose', 0):>10}{ops.get('Mul', 0):>5}"
                  f"{ops.get('Add', 0):>5}{ops.get('Conv', 0):>5}"
                  f"{r['seconds']:>9.1f}{r['relative_diff']:>11.1e}")
        tf, pt = exported["tensorflow"][name], exported["torch"][name]
        allowed = tf["nodes"] + pt["inputs"] + pt["outputs"]
        ok = pt["nodes"] <= allowed and pt["ops"].get("Transpose", 0) <= (
            pt["inputs"] + pt["outputs"])
        verdicts.append(ok)
        condition = (f"PyTorch nodes {pt['nodes']} <= TensorFlow "
                     f"{tf['nodes']} + {allowed - tf['nodes']} Transposes")
        print(f"  {common.verdict(ok, condition)}")
        print(f"  PyTorch clean-up: {pt['graph']}")
    return verdicts


def print_latency(names, timed, args):
    import numpy as np

    common.print_rule()
    what = ("CPU time of a 1-thread session" if args.clock == "cpu" else
            f"wall time, {args.threads} threads")
    print(f"2. onnxruntime latency, ms per call (CPU, {what}; median over "
          f"{args.rounds} rounds of {args.calls} calls), PyTorch file / "
          "TensorFlow file")
    print("   (paired: the median over rounds of the ratio within a round, "
          "and its spread: the 25th - 75th percentile)")
    header = (f"{'model':<17}{'batch':>6}{'TensorFlow':>12}{'PyTorch':>10}"
              f"{'ratio':>8}{'paired':>8}{'[p25 - p75]':>17}")
    common.print_header(header)
    verdicts = []
    for name in names:
        for batch in args.batches:
            t = timed[(name, batch)]
            tf, pt = (float(np.median(t[b])) for b in BACKENDS)
            per_round = np.asarray(t["torch"]) / np.asarray(t["tensorflow"])
            paired = float(np.median(per_round))
            p25, p75 = np.percentile(per_round, [25, 75])
            ok = paired <= TARGET_LATENCY
            verdicts.append(ok)
            print(f"{name:<17}{batch:>6}{tf:>12.3f}{pt:>10.3f}"
                  f"{pt / tf:>8.3f}{paired:>8.3f}"
                  f"{f'[{p25:.3f} - {p75:.3f}]':>17}  "
                  f"{'PASS' if ok else 'FAIL'}")
            print(f"RATIO export_latency {name} batch{batch} {paired:.3f}")
    print(f"load average (1, 5, 15 min) at the end: "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} on "
          f"{os.cpu_count()} CPUs")
    return verdicts


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=MODELS,
                        default=list(MODELS))
    common.add_quick(parser, "the reference models only, 10 rounds")
    common.add_rounds(parser, "latency rounds (default 20, quick 10)")
    parser.add_argument("--calls", type=int, default=10,
                        help="timed calls per file per round")
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds before each block (thread spinning)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=2,
                        help="onnxruntime intra_op_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the CPU time of a 1-thread "
                             "session without spinning (steadier on a "
                             "machine other jobs share)")
    parser.add_argument("--keep", metavar="DIR",
                        help="write the models and files here and keep them")
    parser.add_argument("--_child", nargs="+", help=argparse_suppress())
    args = parser.parse_args(argv)
    if args._child:
        job, work, *names = args._child
        child(job, names, work)
        return 0
    names = list(common.REFERENCE_MODELS) if args.quick else args.models
    args.rounds = args.rounds or (10 if args.quick else 20)
    log = common.stopwatch()
    with tempfile.TemporaryDirectory(prefix="renorm-export-bench-") as work:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            work = args.keep
        run_child("build", "tensorflow", names, work)
        log(f"built {', '.join(names)}")
        exported = {}
        for backend in BACKENDS:
            exported[backend] = run_child(backend, backend, names, work)
            log(f"exported on {backend}: {exported[backend]['versions']}")
        timed = {}
        for name in names:
            files = {b: os.path.join(work, f"{name}.{b}.onnx")
                     for b in BACKENDS}
            for batch in args.batches:
                timed[(name, batch)] = latency(files, batch, args)
            log(f"timed {name}")
    verdicts = print_exports(names, exported)
    verdicts += print_latency(names, timed, args)
    print(f"\n{common.overall(verdicts)}")
    return 0


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
