"""export_onnx on every backend that exports (TensorFlow: tf2onnx, PyTorch:
the dynamo exporter): the guarantees (no normalization left, no per-channel
Mul / Add after a Conv / Gemm / MatMul, the model's output names, a
dynamic batch, parity with Keras on the same backend, verification on real
images), the verification itself, int8 / float16, and what each exporter
adds (tf2onnx's patches, scoped to the export). On JAX: the refusal and
its route, a .keras file exported on another backend."""

import os
import re

import keras
import numpy as np
import onnx
import pytest

import renorm_convert as rc
from helpers import (max_rel_diff, nested_model, numpy, randomize_statistics,
                     sample_inputs)
from renorm_convert.onnx.export import (FLOAT16_TOLERANCE, op_counts,
                                        run_onnx, to_onnx)
from renorm_convert.onnx.exporters import (input_names, output_names,
                                           unique_names)
from renorm_convert.onnx.folding import count_affine_after_linear
import renorm_convert.transform.folding as folding_module

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
exports = pytest.mark.skipif(
    BACKEND == "jax", reason="JAX exports a saved .keras file on PyTorch or "
                             "TensorFlow (test_jax_refuses_with_the_route)")

# Nodes of tf2onnx's file of each reference model, converted, with
# randomized statistics and biases (seed 3): measured on TensorFlow by
# test_reference_models_meet_every_guarantee itself.
TF2ONNX_NODES = {"resnet_fmnist": 25, "inception_fmnist": 52}


def _conv_net(separable=False):
    inputs = keras.Input((16, 16, 3), name="image")
    x = inputs
    for i, filters in enumerate((8, 16)):
        if separable and i:
            x = keras.layers.SeparableConv2D(filters, 3, padding="same")(x)
        else:
            x = keras.layers.Conv2D(filters, 3, padding="same")(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    return keras.Model(inputs, outputs)


def _assert_guarantees(path, model, batch=7):
    """What every exported file holds, on every backend: no normalization,
    no per-channel Mul / Add after a Conv / Gemm / MatMul (onnx.folding's
    counter), unique output names equal to the model's, a dynamic batch
    (it runs at a batch size verification never used) with parity."""
    onnx_model = onnx.load(str(path))
    counts = op_counts(onnx_model)
    assert counts.get("BatchNormalization", 0) == 0
    assert count_affine_after_linear(onnx_model) == 0
    names = [o.name for o in onnx_model.graph.output]
    assert names == unique_names(output_names(model))
    assert len(set(names)) == len(names)
    assert [i.name for i in onnx_model.graph.input] == input_names(model)
    for value in onnx_model.graph.input:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.dim_value
    xs = sample_inputs(model, batch=batch, seed=5)
    got = run_onnx(str(path), xs if isinstance(xs, list) else [xs])
    expected = keras.tree.flatten(model(xs, training=False))
    assert max_rel_diff(expected, got) <= 1e-5
    return onnx_model, counts


@exports
@pytest.mark.parametrize("name", sorted(TF2ONNX_NODES))
def test_reference_models_meet_every_guarantee(tmp_path, name):
    model = rc.convert(keras.models.load_model(rc.reference.path(name)))
    randomize_statistics(model, seed=3)
    path = tmp_path / f"{name}.onnx"
    report = rc.export_onnx(model, path)
    onnx_model, counts = _assert_guarantees(path, model)
    n_norm = sum(isinstance(layer, keras.layers.BatchNormalization)
                 for layer in rc.iter_layers(model))
    assert report.folded == n_norm > 0 and report.unfolded == {}
    assert report.relative_diff <= 1e-5
    assert report.verification.logits_relative_diff <= 1e-5
    assert report.op_counts == counts
    nodes = len(onnx_model.graph.node)
    if BACKEND == "tensorflow":
        assert nodes == TF2ONNX_NODES[name]
    else:
        # No more nodes than tf2onnx's file; one Transpose (NHWC in) where
        # tf2onnx has a Reshape.
        assert nodes <= TF2ONNX_NODES[name]
        assert counts.get("Transpose", 0) <= len(model.inputs) + len(
            model.outputs)
        assert report.graph.transposes > 0 and report.folded_onnx > 0


@exports
def test_names_dynamic_batch_and_several_outputs(tmp_path):
    model = rc.convert(nested_model())
    randomize_statistics(model, seed=9)
    path = tmp_path / "nested.onnx"
    report = rc.export_onnx(model, path)
    assert report.input_names == ["image_a", "image_b"]
    assert report.output_names == ["probs", "score"]
    assert report.relative_diff <= 1e-4
    assert report.file_size == os.path.getsize(path)
    _assert_guarantees(path, model)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


class _Backbone(keras.layers.Layer):
    """A detection backbone as libraries write it: one custom layer whose
    call joins its own Conv2D and BatchNormalization sublayers and returns
    nested tuples ((C3, C4), C5) of feature maps."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.convs = [keras.layers.Conv2D(8, 3, strides=2, padding="same")
                      for _ in range(3)]
        self.norms = [keras.layers.BatchNormalization() for _ in range(3)]

    def call(self, x, training=None):
        maps = []
        for conv, norm in zip(self.convs, self.norms):
            x = keras.activations.relu(norm(conv(x), training=training))
            maps.append(x)
        return (maps[0], maps[1]), maps[2]

    def compute_output_spec(self, x):
        def spec(stride):
            size = x.shape[1] // stride
            return keras.KerasTensor((x.shape[0], size, size, 8))
        return (spec(2), spec(4)), spec(8)


@exports
def test_detection_backbone_with_nested_tuple_outputs(tmp_path):
    """Its normalization cannot be folded in Keras (custom code joins the
    layers): the ONNX graph folds it; the three maps keep unique names."""
    inputs = keras.Input((32, 32, 3), name="image")
    model = keras.Model(inputs, _Backbone(name="backbone")(inputs))
    randomize_statistics(model, seed=4)
    path = tmp_path / "backbone.onnx"
    report = rc.export_onnx(model, path)
    assert report.output_names == ["backbone", "backbone_1", "backbone_2"]
    assert report.folded == 0 and len(report.unfolded) == 3
    assert report.folded_onnx >= 6  # a Mul and an Add per normalization
    onnx_model, counts = _assert_guarantees(path, model)
    assert counts.get("Mul", 0) == 0 and counts.get("Add", 0) == 0
    assert counts.get("Conv") == 3


@exports
def test_a_zoo_model(tmp_path):
    """MobileNetV2 (depthwise convolutions, ReLU6, padding): no more nodes
    than tf2onnx writes for it (116, measured on TensorFlow) and one
    Transpose."""
    model = rc.convert(keras.applications.MobileNetV2(
        weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=5))
    randomize_statistics(model, seed=6)
    path = tmp_path / "mobilenet.onnx"
    report = rc.export_onnx(model, path)
    assert report.folded == 52 and report.relative_diff <= 1e-4
    onnx_model, counts = _assert_guarantees(path, model, batch=3)
    assert len(onnx_model.graph.node) <= 116
    assert counts.get("Transpose", 0) <= 1 and counts.get("Mul", 0) == 0


@exports
def test_export_command_verifies_on_real_images(tmp_path, capsys):
    """`renorm-convert export --data` on this backend: the report verifies
    on the validation images, with their accuracy."""
    from renorm_convert.cli import main

    model = rc.convert(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")
    ]))
    randomize_statistics(model, seed=2)
    path = tmp_path / "m.keras"
    model.save(path)
    code = main(["export", str(path), "-o", str(tmp_path / "m.onnx"),
                 "--data", "digits", "--verify-size", "50"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "folded 1 normalization layers" in out
    assert "onnxruntime vs Keras on 50 given inputs" in out
    assert "logits before the final activation" in out
    assert "same top-1 on 100.0%" in out and "accuracy on them" in out
    assert BACKEND in out or "tf2onnx" in out  # which exporter wrote it
    _assert_guarantees(tmp_path / "m.onnx", model)


def _saturating_classifier():
    """A softmax classifier whose logits are large, as a trained one's are:
    its probabilities are one-hot, so comparing them cannot see a fold's
    error."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs)
    randomize_statistics(model, seed=3)
    dense = model.get_layer("probs")
    dense.kernel.assign(dense.kernel * 300.0)
    return model


def _off_by(factor):
    exact = folding_module.scale_offset

    def wrong(mean, variance, epsilon, gamma=None, beta=None):
        return exact(mean, variance, epsilon,
                     None if gamma is None else np.asarray(gamma) * factor,
                     beta)
    return wrong


@exports
def test_verification_catches_a_wrong_fold(tmp_path, monkeypatch):
    model = rc.convert(_saturating_classifier())
    right = rc.export_onnx(model, tmp_path / "right.onnx")
    v = right.verification
    assert v.logits_relative_diff <= 1e-5 and v.top1_agreement == 1.0
    assert v.tolerance == 1e-3 and "random" in v.inputs
    monkeypatch.setattr(folding_module, "scale_offset", _off_by(1.01))
    # The probabilities alone barely move: they are saturated.
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    probabilities = np.abs(numpy(rc.fold(model)(x)) - numpy(
        model(x, training=False))).max()
    assert probabilities < 1e-3
    # The logits do, and the file is refused.
    with pytest.raises(rc.ExportError, match="logits before the final"):
        rc.export_onnx(model, tmp_path / "wrong.onnx")
    assert not (tmp_path / "wrong.onnx").exists()


@exports
def test_verification_on_given_inputs(tmp_path):
    model = rc.convert(_saturating_classifier())
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype(
        "float32")
    report = rc.export_onnx(model, tmp_path / "m.onnx", verify=x)
    assert report.verification.inputs == "16 given inputs"
    assert report.verification.logits_relative_diff <= 1e-5
    with pytest.raises(rc.ExportError, match="do not fit"):
        rc.export_onnx(model, tmp_path / "bad.onnx", verify=x[:, :4])
    assert not (tmp_path / "bad.onnx").exists()


@exports
def test_fixed_batch_dimension(tmp_path):
    model = rc.convert(_saturating_classifier())
    report = rc.export_onnx(model, tmp_path / "b8.onnx", batch_size=8)
    dims = onnx.load(str(tmp_path / "b8.onnx")).graph.input[0].type.\
        tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [8, 8, 8, 3]
    assert report.verification.logits_relative_diff <= 1e-5
    with pytest.raises(rc.ExportError, match="batch_size=0"):
        rc.export_onnx(model, tmp_path / "z.onnx", batch_size=0)


def _max_abs(a, b):
    return float(np.abs(np.asarray(a, np.float64)
                        - np.asarray(b, np.float64)).max())


@exports
def test_export_report_separates_fold_and_onnx_differences(tmp_path):
    """fold_max_abs_diff is Keras folded against the model, onnx_max_abs_diff
    onnxruntime against Keras folded, max_abs_diff end to end: each as
    measured here with the file written."""
    model = rc.convert(_conv_net())
    randomize_statistics(model, seed=13)
    x = np.random.default_rng(2).normal(size=(6, 16, 16, 3)).astype(
        "float32")
    path = tmp_path / "m.onnx"
    report = rc.export_onnx(model, path, verify=x)
    keras_out = numpy(model(x, training=False))
    folded_out = numpy(rc.fold(model)(x, training=False))
    onnx_out = run_onnx(str(path), [x])[0]
    assert report.fold_max_abs_diff == pytest.approx(
        _max_abs(keras_out, folded_out), rel=1e-3, abs=1e-7)
    assert report.onnx_max_abs_diff == pytest.approx(
        _max_abs(folded_out, onnx_out), rel=1e-3, abs=1e-7)
    assert report.max_abs_diff == pytest.approx(
        _max_abs(keras_out, onnx_out), rel=1e-3, abs=1e-7)
    scale = report.verification.output_scale
    assert scale == pytest.approx(float(np.abs(keras_out).max()), rel=1e-6)
    # The end-to-end difference is within the two steps' (triangle
    # inequality), and each is float32 rounding, not a wrong fold.
    assert report.max_abs_diff <= (report.fold_max_abs_diff
                                   + report.onnx_max_abs_diff + 1e-9)
    assert report.fold_max_abs_diff <= 1e-5 * scale
    assert report.onnx_max_abs_diff <= 1e-5 * scale
    as_dict = report.as_dict()
    assert as_dict["verification"]["relative_diff"] == report.relative_diff
    assert not [k for k in as_dict if "latency" in k or k.endswith("_ms")]


@exports
def test_failed_verification_blames_the_fold_not_the_conversion(
        tmp_path, monkeypatch):
    """A wrong fold: the refusal gives folding alone as the difference
    measured here between the model and its (wrong) fold, and the
    conversion alone as float32 rounding."""
    model = rc.convert(_conv_net())
    randomize_statistics(model, seed=14)
    monkeypatch.setattr(folding_module, "scale_offset", _off_by(1.05))
    x = np.random.default_rng(3).normal(size=(6, 16, 16, 3)).astype(
        "float32")
    wrong = _max_abs(numpy(model(x, training=False)),
                     numpy(rc.fold(model)(x, training=False)))
    with pytest.raises(rc.ExportError) as raised:
        rc.export_onnx(model, tmp_path / "wrong.onnx", verify=x)
    found = re.search(r"folding alone: ([-+.\de]+).*?conversion alone: "
                      r"([-+.\de]+)", str(raised.value))
    assert found, str(raised.value)
    folding_alone, conversion_alone = map(float, found.groups())
    assert folding_alone == pytest.approx(wrong, rel=0.06)  # 2 digits
    assert conversion_alone <= 1e-4 * folding_alone
    assert not (tmp_path / "wrong.onnx").exists()


@exports
def test_a_model_trained_in_mixed_precision_exports_in_float32(tmp_path,
                                                              caplog):
    """Fine-tuned with --mixed-precision, a model computes in float16 but
    keeps float32 weights: its export is the float32 model, verified
    against it (float16's rounding, about 1e-3, would fail verification)."""
    model = rc.convert(_conv_net())
    randomize_statistics(model, seed=12)
    mixed = rc.recast(model, "mixed_float16")
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(
        "float32")
    with caplog.at_level("INFO", logger="renorm_convert"):
        report = rc.export_onnx(mixed, tmp_path / "m.onnx", verify=x)
    assert "computes in mixed_float16" in caplog.text
    assert report.relative_diff <= 1e-5
    expected = numpy(model(x, training=False))
    assert max_rel_diff(expected, run_onnx(str(tmp_path / "m.onnx"),
                                           [x])[0]) <= 1e-5
    assert mixed.get_layer(index=1).compute_dtype == "float16"  # unchanged


@exports
def test_int8_and_float16_on_this_backend(tmp_path, fashion):
    """The precision step is shared: the reference model's int8 file keeps
    the float file's predictions on images calibration never saw, and its
    float16 file stays within its tolerance."""
    from renorm_convert import data

    model = rc.convert(keras.models.load_model(
        rc.reference.path("resnet_fmnist")))
    split = fashion.subset(train=128, val=200, seed=0)
    shape = data.model_image_shape(model)
    calibration = np.asarray(data.adapt(split.x_train, shape))
    x = np.asarray(data.adapt(split.x_val, shape))
    report = rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8",
                            calibration=calibration, verify=x,
                            labels=split.y_val)
    assert report.precision == "int8"
    assert report.int8.top1_agreement >= 0.95
    assert report.int8.int8_accuracy >= report.int8.float_accuracy - 0.02
    assert report.file_size < 0.5 * report.int8.float_file_size
    ops = op_counts(onnx.load(str(tmp_path / "q.onnx")))
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    half = rc.export_onnx(model, tmp_path / "h.onnx", precision="float16",
                          verify=x)
    assert half.precision == "float16"
    assert half.verification.tolerance == FLOAT16_TOLERANCE
    assert half.verification.logits_relative_diff <= FLOAT16_TOLERANCE
    weights = [t for t in onnx.load(str(tmp_path / "h.onnx")).graph.
               initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16
                           for t in weights)


@exports
def test_export_to_missing_directory_leaves_nothing(tmp_path):
    with pytest.raises(OSError):
        rc.export_onnx(_conv_net(), tmp_path / "missing" / "m.onnx")
    assert os.listdir(tmp_path) == []


@exports
def test_a_jax_trained_file_exports_here_with_jax_parity(tmp_path):
    """The JAX route: a .keras file fine-tuned on JAX (tests/data, with its
    outputs as JAX computed them) exports on this backend, and the file
    matches JAX's outputs."""
    fixture = os.path.join(ROOT, "tests", "data", "renorm-0.2-jax")
    model = keras.models.load_model(fixture + ".keras")
    recorded = np.load(fixture + ".npz")
    path = tmp_path / "jax.onnx"
    rc.export_onnx(model, path, verify=recorded["x"])
    assert max_rel_diff(recorded["y"], run_onnx(str(path),
                                                [recorded["x"]])) <= 1e-5
    _assert_guarantees(path, model)


# A Keras 2 (tf_keras 2.21) .h5 file: its model config as tf_keras writes it
# (initializers and other settings Keras 3 does not need left out), and the
# HDF5 layout of its weights.
_KERAS2_CONFIG = {"class_name": "Functional", "config": {
    "name": "k2", "trainable": True, "layers": [
        {"class_name": "InputLayer", "name": "img", "inbound_nodes": [],
         "config": {"batch_input_shape": [None, 6, 6, 2], "dtype": "float32",
                    "sparse": False, "ragged": False, "name": "img"}},
        {"class_name": "Conv2D", "name": "conv",
         "inbound_nodes": [[["img", 0, 0, {}]]],
         "config": {"name": "conv", "trainable": True, "dtype": "float32",
                    "filters": 4, "kernel_size": [3, 3], "strides": [1, 1],
                    "padding": "valid", "data_format": "channels_last",
                    "dilation_rate": [1, 1], "groups": 1,
                    "activation": "linear", "use_bias": True}},
        {"class_name": "BatchNormalization", "name": "bn",
         "inbound_nodes": [[["conv", 0, 0, {}]]],
         "config": {"name": "bn", "trainable": True, "dtype": "float32",
                    "axis": [3], "momentum": 0.99, "epsilon": 0.001,
                    "center": True, "scale": False}},
        {"class_name": "Activation", "name": "act",
         "inbound_nodes": [[["bn", 0, 0, {}]]],
         "config": {"name": "act", "trainable": True, "dtype": "float32",
                    "activation": "relu"}},
        {"class_name": "Flatten", "name": "flat",
         "inbound_nodes": [[["act", 0, 0, {}]]],
         "config": {"name": "flat", "trainable": True, "dtype": "float32",
                    "data_format": "channels_last"}},
        {"class_name": "Dense", "name": "dense",
         "inbound_nodes": [[["flat", 0, 0, {}]]],
         "config": {"name": "dense", "trainable": True, "dtype": "float32",
                    "units": 3, "activation": "linear", "use_bias": True}}],
    "input_layers": [["img", 0, 0]], "output_layers": [["dense", 0, 0]]}}


def _write_keras2_h5(path, weights):
    """The file tf_keras 2.21's `model.save("x.h5")` writes for
    `_KERAS2_CONFIG` with `weights` ({layer: {name: array}})."""
    import json

    import h5py

    names = ["img", "conv", "bn", "act", "flat", "dense"]
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = "tensorflow"
        f.attrs["keras_version"] = "2.21.0"
        f.attrs["model_config"] = json.dumps(_KERAS2_CONFIG)
        group = f.create_group("model_weights")
        group.attrs["backend"] = "tensorflow"
        group.attrs["keras_version"] = "2.21.0"
        group.attrs["layer_names"] = np.array(names, dtype="S")
        for name in names + ["top_level_model_weights"]:
            layer = group.create_group(name)
            own = weights.get(name, {})
            layer.attrs["weight_names"] = np.array(
                [f"{name}/{w}:0" for w in own], dtype="S")
            for w, value in own.items():
                layer.create_dataset(f"{name}/{w}:0", data=value)


def _keras2_numpy(weights, x):
    """What the Keras 2 model computes, in NumPy: a valid 3x3 Conv, the
    normalization (no gamma), ReLU, Flatten, Dense."""
    conv, bn, dense = weights["conv"], weights["bn"], weights["dense"]
    kernel = conv["kernel"].astype(np.float64)
    n, h, w, _ = x.shape
    out = np.zeros((n, h - 2, w - 2, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,co->nhwo", x[:, i:i + h - 2, j:j + w - 2],
                             kernel[i, j])
    out += conv["bias"]
    out = (out - bn["moving_mean"]) / np.sqrt(bn["moving_variance"]
                                              + 0.001) + bn["beta"]
    out = np.maximum(out, 0.0).reshape(n, -1)
    return out @ dense["kernel"] + dense["bias"]


@exports
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_keras2_file_exports(tmp_path):
    """A Keras 2 .h5 file, converted and exported on this backend: every
    guarantee, and the file computes what the Keras 2 model computes
    (NumPy; on TensorFlow also tf_keras itself reading the same file)."""
    rng = np.random.default_rng(0)
    weights = {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)),
                 "bias": rng.normal(size=4)},
        "bn": {"beta": rng.uniform(-1, 1, 4),
               "moving_mean": rng.uniform(-1, 1, 4),
               "moving_variance": rng.uniform(0.5, 2, 4)},
        "dense": {"kernel": rng.normal(size=(64, 3)),
                  "bias": rng.normal(size=3)}}
    weights = {layer: {k: v.astype("float32") for k, v in w.items()}
               for layer, w in weights.items()}
    path = tmp_path / "keras2.h5"
    _write_keras2_h5(path, weights)
    x = rng.normal(size=(5, 6, 6, 2)).astype("float32")
    expected = _keras2_numpy(weights, x)
    if BACKEND == "tensorflow":
        import tf_keras

        peer = tf_keras.models.load_model(path, compile=False)
        assert max_rel_diff(expected, peer.predict(x, verbose=0)) <= 1e-5
    model = rc.convert(keras.models.load_model(path, compile=False))
    report = rc.export_onnx(model, tmp_path / "k2.onnx", verify=x)
    assert report.folded == 1 and report.output_names == ["dense"]
    _assert_guarantees(tmp_path / "k2.onnx", model)
    assert max_rel_diff(expected, run_onnx(str(tmp_path / "k2.onnx"),
                                           [x])) <= 1e-5


@pytest.mark.skipif(BACKEND != "jax", reason="JAX only")
def test_jax_refuses_with_the_route(tmp_path, capsys):
    from renorm_convert.cli import main

    model = rc.convert(_conv_net())
    with pytest.raises(rc.BackendError, match="KERAS_BACKEND=torch"):
        rc.export_onnx(model, tmp_path / "m.onnx")
    path = tmp_path / "m.keras"
    model.save(path)
    code = main(["export", str(path), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "KERAS_BACKEND=torch" in err
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


# --- PyTorch: the dynamo exporter -------------------------------------------

@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch only")
@pytest.mark.filterwarnings("ignore:Converting a tensor")
def test_torch_refusals_in_one_line(tmp_path, monkeypatch):
    """A model torch.export cannot trace (Python control flow on a tensor's
    value) is refused naming the exporter, nothing written; so is an opset
    below what the exporter writes; without onnxscript, export says what
    to install."""
    import importlib.util

    inputs = keras.Input((4,))
    x = keras.layers.Dense(4)(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Lambda(
        lambda t: t if float(keras.ops.sum(t)) > 0 else -t,
        output_shape=(4,), name="branch")(x)
    model = keras.Model(inputs, outputs)
    with pytest.raises(rc.ExportError, match="dynamo exporter could not "
                                             "convert model"):
        rc.export_onnx(model, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []
    # The dynamo exporter writes opset 18 and above (asked for less, it
    # would write 18 anyway): a lower one is refused before any work.
    with pytest.raises(rc.ExportError, match="opset=13: PyTorch's dynamo "
                                             "exporter writes opset 18"):
        rc.export_onnx(_conv_net(), tmp_path / "m.onnx", opset=13)
    assert rc.export_onnx(_conv_net(), tmp_path / "m.onnx",
                          opset=18, verify=False).opset == 18
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "onnxscript" else found(name, *a))
    with pytest.raises(rc.BackendError, match="pip install onnxscript"):
        rc.export_onnx(_conv_net(), tmp_path / "m2.onnx")


# --- TensorFlow: tf2onnx ------------------------------------------------------

def _zero_conv_biases(model):
    for v in model.weights:
        if v.path.endswith("/bias") and not v.path.startswith(
                ("logits", "predictions")):
            v.assign(np.zeros(v.shape, "float32"))


def _assert_no_normalization_left(ours, reference):
    """No normalization op left, the same compute ops as tf2onnx's export of
    the bias-free BN model, and no op type more often than there (tf2onnx
    leaves a Mul / Add after depthwise convolutions, MobileNetV2)."""
    assert "BatchNormalization" not in ours
    assert ours.get("Mul", 0) == 0
    for op in ("Conv", "MatMul", "ConvTranspose", "Gemm"):
        assert ours.get(op, 0) == reference.get(op, 0), op
    # Shape plumbing is left out: tf2onnx's count of Reshape nodes for the
    # same model varies from one export to the next (19 or 20 on
    # InceptionV3, 8 or 9 on ResNet50), normalization or not.
    for op, count in ours.items():
        if op not in ("Reshape", "Squeeze", "Unsqueeze"):
            assert count <= reference.get(op, 0), (op, ours, reference)


def _compute_ops(counts):
    """Op counts without shape plumbing (whose Reshape count tf2onnx varies
    from one export of the same model to the next)."""
    return {op: n for op, n in counts.items()
            if op not in ("Reshape", "Squeeze", "Unsqueeze")}


@pytest.mark.tensorflow
@pytest.mark.parametrize("make", [
    lambda: _conv_net(),
    lambda: _conv_net(separable=True),
    lambda: keras.applications.MobileNetV2(weights=None, alpha=0.35,
                                           input_shape=(32, 32, 3), classes=5),
])
def test_export_matches_plain_export_op_counts(tmp_path, make):
    original = make()
    randomize_statistics(original, seed=7)
    _zero_conv_biases(original)
    # tf2onnx folds BN into bias-free convolutions itself: the reference.
    reference = op_counts(to_onnx(original))
    converted, conversion = rc.convert(original, report=True)
    report = rc.export_onnx(converted, tmp_path / "m.onnx")
    _assert_no_normalization_left(report.op_counts, reference)
    assert report.unfolded == {}
    assert report.relative_diff <= 1e-4
    assert report.folded == len(conversion) > 0
    # Once convolutions have biases (any training gives them), a plain
    # export keeps a Mul and an Add per normalization; ours does not change.
    randomize_statistics(converted, seed=8)
    plain = op_counts(to_onnx(converted))
    assert plain.get("Mul", 0) > 0 == report.op_counts.get("Mul", 0)
    again = rc.export_onnx(converted, tmp_path / "m2.onnx")
    assert _compute_ops(again.op_counts) == _compute_ops(report.op_counts)
    assert again.relative_diff <= 1e-4


@pytest.mark.tensorflow
@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("ResNet50", (32, 32, 3)),
                                        ("InceptionV3", (75, 75, 3))])
def test_export_large_architectures(tmp_path, name, shape):
    original = getattr(keras.applications, name)(weights=None,
                                                 input_shape=shape, classes=5)
    randomize_statistics(original, seed=10)
    _zero_conv_biases(original)
    reference = op_counts(to_onnx(original))
    converted, conversion = rc.convert(original, report=True)
    report = rc.export_onnx(converted, tmp_path / "m.onnx")
    _assert_no_normalization_left(report.op_counts, reference)
    assert report.folded == len(conversion) > 0
    assert report.relative_diff <= 1e-4
    # Trained (non-zero) conv biases: a plain export of ResNet50 keeps a Mul
    # per normalization (InceptionV3's convolutions have no bias); ours is
    # unchanged.
    randomize_statistics(converted, seed=11)
    plain = op_counts(to_onnx(converted))
    if name == "ResNet50":
        assert plain.get("Mul", 0) == 53
        assert plain.get("Add", 0) - report.op_counts.get("Add", 0) >= 53
    again = rc.export_onnx(converted, tmp_path / "m2.onnx")
    assert _compute_ops(again.op_counts) == _compute_ops(report.op_counts)
    assert again.relative_diff <= 1e-4


@pytest.mark.tensorflow
def test_export_of_unconvertible_op_says_which_and_leaves_no_file(tmp_path):
    import tensorflow as tf

    inputs = keras.Input((4,))
    x = keras.layers.Dense(4)(inputs)
    x = keras.layers.BatchNormalization()(x)
    # tf2onnx has no conversion for Igamma and keeps it as an unknown op.
    x = keras.layers.Lambda(lambda t: tf.math.igamma(tf.abs(t) + 1.0, 2.0),
                            output_shape=(4,), name="gamma_fn")(x)
    model = keras.Model(inputs, x)
    path = tmp_path / "igamma.onnx"
    with pytest.raises(rc.ExportError, match="Igamma.*gamma_fn"):
        rc.export_onnx(model, path)
    assert os.listdir(tmp_path) == []


def _tf2onnx_hooks():
    """What `tf2onnx_optimizers_fixed` and `grouped_conv_as_plain_op`
    replace while they hold."""
    from keras.src.backend.tensorflow import nn as tf_nn
    from tf2onnx.graph import Node
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    return {"_add_handler": TransposeOptimizer._add_handler,
            "update_proto": Node.update_proto, "conv": tf_nn.conv}


@pytest.mark.tensorflow
def test_tf2onnx_patches_hold_only_during_the_export(tmp_path, monkeypatch):
    from renorm_convert._internal import keras_hooks as internals

    shipped = _tf2onnx_hooks()
    during = []
    convert = internals.tf2onnx_from_function

    def recording(*args, **kwargs):
        during.append(_tf2onnx_hooks())
        return convert(*args, **kwargs)

    monkeypatch.setattr(internals, "tf2onnx_from_function", recording)
    model = rc.convert(_conv_net())
    randomize_statistics(model, seed=15)
    report = rc.export_onnx(model, tmp_path / "m.onnx")
    assert report.relative_diff <= 1e-4
    assert len(during) == 1
    for name, function in shipped.items():
        assert during[0][name] is not function, f"{name} was not patched"
    assert _tf2onnx_hooks() == shipped


@pytest.mark.tensorflow
def test_tf2onnx_patches_are_undone_after_an_error(tmp_path, monkeypatch):
    from renorm_convert._internal import keras_hooks as internals

    shipped = _tf2onnx_hooks()
    with pytest.raises(KeyError):
        with internals.tf2onnx_optimizers_fixed():
            patched = _tf2onnx_hooks()
            raise KeyError("inside")
    assert patched["_add_handler"] is not shipped["_add_handler"]
    assert patched["update_proto"] is not shipped["update_proto"]
    assert _tf2onnx_hooks() == shipped

    # Through the export: tf2onnx fails mid-conversion.
    def failing(*args, **kwargs):
        assert _tf2onnx_hooks()["update_proto"] is not shipped[
            "update_proto"]
        raise RuntimeError("tf2onnx broke")

    monkeypatch.setattr(internals, "tf2onnx_from_function", failing)
    with pytest.raises(rc.ExportError, match="tf2onnx broke"):
        rc.export_onnx(_conv_net(), tmp_path / "m.onnx")
    assert _tf2onnx_hooks() == shipped
    assert os.listdir(tmp_path) == []
