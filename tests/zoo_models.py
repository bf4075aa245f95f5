"""The keras.applications zoo as the converter meets it: every constructor
with BatchNormalization, built without weights at a small input, its moving
statistics calibrated so activations stay in range, and the whole path
(convert, revert, save / load, fold, ONNX export) checked against the
original's inference output.

Shared by tests/test_zoo.py (assertions) and benchmarks/zoo.py (the README
table with times).
"""

import gc
import os
import time

import keras
import numpy as np

import renorm_convert as rc
from helpers import max_rel_diff, sample_inputs
from onnx_helpers import run_onnx

# The smallest input each family accepts without weights; 32x32 elsewhere.
INPUT_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}

# Constructors without BatchNormalization (LayerNorm or none).
WITHOUT_BN = ("ConvNeXt", "VGG")

ZOO = sorted(
    name for name in dir(keras.applications)
    if name[0].isupper() and callable(getattr(keras.applications, name))
    and not name.startswith(WITHOUT_BN)
)

# A fold rounds every weight it rewrites once in float32 (relative change
# about 6e-8), so its output change is what a random relative perturbation
# of 1e-7 of every weight causes. A tolerance of 10x that measured
# sensitivity (and never below 1e-5) holds exact folds and fails wrong ones,
# which move outputs by whole percents.
PERTURBATION = 1e-7
SENSITIVITY_FACTOR = 10.0
TOLERANCE_FLOOR = 1e-5


def build(name):
    size = INPUT_SIZE.get(name, 32)
    return getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10,
        classifier_activation=None)


def count_bn(model):
    return sum(isinstance(layer, keras.layers.BatchNormalization)
               for layer in rc.iter_layers(model))


def calibrate(model, x):
    """Moving statistics := the statistics of one training-mode pass, so
    that inference activations stay in range in a randomly initialized deep
    network (else they overflow or vanish and parity compares nothing)."""
    layers = [layer for layer in rc.iter_layers(model)
              if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum


def sensitivity(model, x, reference):
    """Relative output change from a random relative change of
    PERTURBATION in every weight."""
    rng = np.random.default_rng(1)
    saved = [v.numpy() for v in model.weights]
    for v, value in zip(model.weights, saved):
        noise = rng.standard_normal(value.shape).astype("float32")
        v.assign(value * (1 + PERTURBATION * noise))
    try:
        return max_rel_diff(reference, model(x, training=False))
    finally:
        for v, value in zip(model.weights, saved):
            v.assign(value)


def check(name, workdir, export=True):
    """Runs the whole path on one zoo model; returns the measurements."""
    model = build(name)
    # 64 examples: with fewer, the batch variances of deep layers whose maps
    # are 1x1 at this input size are near zero for some channels, and the
    # calibrated network turns chaotic (EfficientNetB4 at 8 examples: a 1e-7
    # weight change moves its output by 38 %; at 64: by 1e-5).
    calibration = sample_inputs(model, 64, uniform=(0, 255))
    calibrate(model, calibration)
    x = calibration[:8]
    reference = np.asarray(model(x, training=False))
    result = {"model": name, "bn": count_bn(model)}
    result["sensitivity"] = sensitivity(model, x, reference)
    result["tolerance"] = max(TOLERANCE_FLOOR,
                              SENSITIVITY_FACTOR * result["sensitivity"])

    start = time.perf_counter()
    keras.models.clone_model(model)
    result["clone_s"] = time.perf_counter() - start
    start = time.perf_counter()
    conversion = rc.convert_plan(model)
    converted = rc.convert(model)
    result["convert_s"] = time.perf_counter() - start
    result["converted"] = len(conversion)
    result["convert"] = max_rel_diff(reference, converted(x, training=False))
    result["revert"] = max_rel_diff(reference, rc.revert(converted)(x))

    path = os.path.join(workdir, f"{name}.keras")
    converted.save(path)
    result["load"] = max_rel_diff(
        reference, keras.models.load_model(path)(x, training=False))
    os.remove(path)

    plan = rc.fold_plan(converted)
    folded = rc.fold(converted, plan)
    result["folded"] = len(plan.folded)
    result["unfolded"] = dict(plan.unfolded)
    result["fold"] = max_rel_diff(reference, folded(x))
    # Only `converted` is needed from here: the export's peak memory (tf2onnx
    # freezing and optimizing the graph) comes on top of what is alive.
    del folded, model
    gc.collect()
    if export:
        path = os.path.join(workdir, f"{name}.onnx")
        start = time.perf_counter()
        report = rc.export_onnx(converted, path, verify=False)
        result["export_s"] = time.perf_counter() - start
        result["exported_folded"] = report.folded
        result["onnx"] = max_rel_diff(reference, run_onnx(
            path, x, optimize=True)[0])
        os.remove(path)
    return result
