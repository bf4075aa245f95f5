"""What the benchmarks share: their common flags, TensorFlow's thread
pools, interleaved rounds, timing, memory, layer counts, the reference
models, and the arithmetic and wording of their reports.

Every benchmark measures ratios against a baseline run in the same process
and the same rounds, so that the slow phases of a shared machine fall on
every variant alike; the pieces here are the one copy of how that is done.

Importing this module quiets TensorFlow's C++ start-up logs and picks
Keras's TensorFlow backend, so a benchmark imports it before NumPy,
TensorFlow or Keras.
"""

import argparse
import os
import platform
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, "renorm_convert", "reference")
# The reference models models/build.py trains into the package (Fashion-MNIST, 28x28x1).
REFERENCE_MODELS = ("inception_fmnist", "resnet_fmnist")
THREADS_HELP = "TF intra- and inter-op threads (0: TF default)"


# --- flags ------------------------------------------------------------------

def parser(doc):
    """An argument parser whose --help is the benchmark's docstring."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_quick(parser, help):
    parser.add_argument("--quick", action="store_true", help=help)


def add_rounds(parser, help):
    parser.add_argument("--rounds", type=int, default=None, help=help)


def add_threads(parser, help=THREADS_HELP):
    parser.add_argument("--threads", type=int, default=0, help=help)


def set_threads(threads):
    """TensorFlow's intra- and inter-op pools to `threads` each; 0 leaves
    TensorFlow's default. Call it before TensorFlow runs anything."""
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


# --- rounds and timing ---------------------------------------------------------

def round_robin(items, rounds):
    """Yields (round, items in that round's order): every round runs every
    item once, and the order rotates from round to round, so a slow phase
    of the machine does not always fall on the same item."""
    items = tuple(items)
    for r in range(rounds):
        k = r % len(items)
        yield r, items[k:] + items[:k]


def time_calls(call, n):
    """Seconds of each of `n` calls of `call()` (its result must be
    computed when it returns: NumPy, not a lazy tensor)."""
    seconds = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def stopwatch():
    """A `log(message)` that prints the seconds since this call first."""
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    return log


def batch_times_callback():
    """A Keras callback recording perf_counter at fit start (`start`) and at
    every batch end (`ends`), and the process's CPU time at every batch end
    (`cpu`)."""
    import keras

    class BatchTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.start = None
            self.ends = []
            self.cpu = []

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())

    return BatchTimes()


# --- memory and child processes --------------------------------------------------

def max_rss_bytes():
    """The peak resident set size of this process so far."""
    scale = 1 if platform.system() == "Darwin" else 1024  # Linux: KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child_result(script, args, tag):
    """Runs `script` with `args` in a fresh Python process (so that its
    peak memory is its own) and returns the fields after `tag` on the line
    of its output that starts with `tag`."""
    cmd = [sys.executable, os.path.abspath(script), *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith(f"{tag} "):
            return line.split()[1:]
    raise RuntimeError(f"{' '.join(cmd[1:])} failed (exit {out.returncode}), "
                       f"no {tag} line:\n{out.stdout}\n{out.stderr[-3000:]}")


# --- models -------------------------------------------------------------------

def count_layers(model, cls):
    """Layers of class `cls` in `model` at any depth."""
    import renorm_convert as rc

    return sum(isinstance(layer, cls) for layer in rc.iter_layers(model))


def count_bn(model):
    """Normalization layers at any depth: BatchNormalization and its
    subclasses, BatchRenormalization among them."""
    import keras

    return count_layers(model, keras.layers.BatchNormalization)


def load_reference(name):
    """A reference model from renorm_convert/reference/ (models/README.md)."""
    import keras

    return keras.models.load_model(os.path.join(MODELS_DIR, f"{name}.keras"))


def build_resnet(norm, name="resnet"):
    """A small ResNet-style model: 32x32x3 inputs, a stem Conv2D and four
    residual blocks (two with a projection shortcut), 11 normalization
    layers made by `norm()`, global average pooling, a 10-way Dense head
    (logits)."""
    import keras
    from keras import layers

    def conv_bn(x, filters, strides=1, relu=True):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same",
                          use_bias=False)(x)
        x = norm()(x)
        return layers.ReLU()(x) if relu else x

    def block(x, filters, strides=1):
        shortcut = x
        y = conv_bn(x, filters, strides)
        y = conv_bn(y, filters, relu=False)
        if strides != 1 or x.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, strides=strides,
                                     use_bias=False)(x)
            shortcut = norm()(shortcut)
        return layers.ReLU()(layers.Add()([y, shortcut]))

    inputs = keras.Input((32, 32, 3))
    x = conv_bn(inputs, 16)                  # 1 BN
    x = block(x, 16)                         # 2 BN
    x = block(x, 32, strides=2)              # 3 BN
    x = block(x, 32)                         # 2 BN
    x = block(x, 64, strides=2)              # 3 BN
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10)(x)
    return keras.Model(inputs, outputs, name=name)


# --- reports ------------------------------------------------------------------

def versions(*extra):
    """'TF …, Keras …, <extra…>, renorm_convert …, python …, N CPUs' (JAX
    … or PyTorch … first on those backends)."""
    import importlib

    import keras

    import renorm_convert as rc

    backend = keras.backend.backend()
    label = {"tensorflow": "TF", "jax": "JAX", "torch": "PyTorch"}.get(
        backend, backend)
    version = getattr(importlib.import_module(backend), "__version__", "?")
    return ", ".join([f"{label} {version}", f"Keras {keras.__version__}",
                      *extra, f"renorm_convert {rc.__version__}",
                      f"python {platform.python_version()}",
                      f"{os.cpu_count()} CPUs"])


def ort_sessions(files, threads, spinning=True, profile_dir=None):
    """{name: onnxruntime CPU session} of `files` ({name: path}), each with
    `threads` intra-op threads and one inter-op thread; `spinning=False`
    keeps idle workers from spinning, `profile_dir` writes onnxruntime's
    profile of each there."""
    import onnxruntime as ort

    out = {}
    for name, path in files.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        if not spinning:
            options.add_session_config_entry(
                "session.intra_op.allow_spinning", "0")
        if profile_dir:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(
                profile_dir, name.replace(" ", "_"))
        out[name] = ort.InferenceSession(path, options,
                                         providers=["CPUExecutionProvider"])
    return out


def print_rule(width=78):
    """The double rule between a benchmark's log and its tables."""
    print("\n" + "=" * width)


def print_header(header):
    """A table's column header, underlined to its width."""
    print(header)
    print("-" * len(header))


def median_iqr(values):
    """(median, 25th percentile, 75th percentile) of `values`."""
    values = np.asarray(values, float)
    p25, p75 = np.percentile(values, [25, 75])
    return float(np.median(values)), float(p25), float(p75)


def paired(values, base):
    """Median over rounds of values[r] / base[r]: a ratio that cancels load
    swings between rounds, the cross-check of a ratio of medians."""
    return float(np.median(np.asarray(values, float)
                           / np.asarray(base, float)))


def verdict(ok, condition):
    """'PASS (condition)' or 'FAIL (condition)'."""
    return f"{'PASS' if ok else 'FAIL'} ({condition})"


def overall(verdicts, what="targets met"):
    """The closing line: 'Overall: PASS (3/3 targets met)'."""
    return (f"Overall: {'PASS' if all(verdicts) else 'FAIL'} "
            f"({sum(verdicts)}/{len(verdicts)} {what})")
