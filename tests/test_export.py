"""export_onnx: parity with onnxruntime, op counts, names, verification,
and the tf2onnx patches scoped to the export."""

import os
import re

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import (max_rel_diff, nested_model, numpy, randomize_statistics,
                     sample_inputs)
from renorm_convert._internal import keras_hooks as internals
from renorm_convert.onnx.export import op_counts, run_onnx, to_onnx
import renorm_convert.transform.folding as folding_module


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
    assert "BatchNormalization" not in report.op_counts
    assert report.unfolded == {}
    assert report.relative_diff <= 1e-4
    assert report.folded == report.folded_keras == len(conversion) > 0
    # Once convolutions have biases (any training gives them), a plain
    # export keeps a Mul and an Add per normalization; ours does not change.
    randomize_statistics(converted, seed=8)
    plain = op_counts(to_onnx(converted))
    assert plain.get("Mul", 0) > 0 == report.op_counts.get("Mul", 0)
    again = rc.export_onnx(converted, tmp_path / "m2.onnx")
    assert _compute_ops(again.op_counts) == _compute_ops(report.op_counts)
    assert again.relative_diff <= 1e-4


def test_export_names_dynamic_batch_and_several_outputs(tmp_path):
    model = rc.convert(nested_model())
    randomize_statistics(model, seed=9)
    path = tmp_path / "nested.onnx"
    report = rc.export_onnx(model, path)
    assert report.input_names == ["image_a", "image_b"]
    assert report.output_names == ["probs", "score"]
    assert report.relative_diff <= 1e-4
    assert report.file_size == os.path.getsize(path)
    # The batch dimension is dynamic: run at another batch size.
    xs = sample_inputs(model, batch=7, seed=2)
    got = run_onnx(str(path), xs)
    assert max_rel_diff(model(xs, training=False), got) <= 1e-4
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


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
    # The model given is not changed.
    assert mixed.get_layer(index=1).compute_dtype == "float16"


def test_export_to_missing_directory_leaves_nothing(tmp_path):
    model = _conv_net()
    with pytest.raises(OSError):
        rc.export_onnx(model, tmp_path / "missing" / "m.onnx")
    assert os.listdir(tmp_path) == []


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


def test_verification_catches_a_wrong_fold(tmp_path, monkeypatch):
    model = rc.convert(_saturating_classifier())
    right = rc.export_onnx(model, tmp_path / "right.onnx")
    assert right.logits_relative_diff <= 1e-5
    assert right.top1_agreement == 1.0
    assert right.tolerance == 1e-3 and "random" in right.verified_on

    exact = folding_module.scale_offset

    def gamma_off_by_one_percent(mean, variance, epsilon, gamma=None,
                                 beta=None):
        return exact(mean, variance, epsilon,
                     None if gamma is None else np.asarray(gamma) * 1.01, beta)

    monkeypatch.setattr(folding_module, "scale_offset",
                        gamma_off_by_one_percent)
    # The probabilities alone (what verification compared before) barely
    # move: they are saturated.
    folded = rc.fold(model)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    probabilities = np.abs(np.asarray(folded(x)) - np.asarray(
        model(x, training=False))).max()
    assert probabilities < 1e-3
    # The logits do, and the file is refused.
    with pytest.raises(rc.ExportError, match="logits before the final"):
        rc.export_onnx(model, tmp_path / "wrong.onnx")
    assert not (tmp_path / "wrong.onnx").exists()


def test_verification_on_given_inputs(tmp_path):
    model = rc.convert(_saturating_classifier())
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype(
        "float32")
    report = rc.export_onnx(model, tmp_path / "m.onnx", verify=x)
    assert report.verified_on == "16 given inputs"
    assert report.logits_relative_diff <= 1e-5
    with pytest.raises(rc.ExportError, match="do not fit"):
        rc.export_onnx(model, tmp_path / "bad.onnx", verify=x[:, :4])
    assert not (tmp_path / "bad.onnx").exists()


def test_fixed_batch_dimension(tmp_path):
    import onnx
    model = rc.convert(_saturating_classifier())
    report = rc.export_onnx(model, tmp_path / "b8.onnx", batch_size=8)
    dims = onnx.load(str(tmp_path / "b8.onnx")).graph.input[0].type.\
        tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [8, 8, 8, 3]
    assert report.logits_relative_diff <= 1e-5
    rc.export_onnx(model, tmp_path / "dyn.onnx")
    dim = onnx.load(str(tmp_path / "dyn.onnx")).graph.input[0].type.\
        tensor_type.shape.dim[0]
    assert dim.dim_value == 0 and dim.dim_param  # symbolic: any batch
    with pytest.raises(rc.ExportError, match="batch_size=0"):
        rc.export_onnx(model, tmp_path / "z.onnx", batch_size=0)


def _max_abs(a, b):
    return float(np.abs(np.asarray(a, np.float64)
                        - np.asarray(b, np.float64)).max())


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
    assert report.output_scale == pytest.approx(
        float(np.abs(keras_out).max()), rel=1e-6)
    # The end-to-end difference is within the two steps' (triangle
    # inequality), and each is float32 rounding, not a wrong fold.
    assert report.max_abs_diff <= (report.fold_max_abs_diff
                                   + report.onnx_max_abs_diff + 1e-9)
    scale = report.output_scale
    assert report.fold_max_abs_diff <= 1e-5 * scale
    assert report.onnx_max_abs_diff <= 1e-5 * scale
    as_dict = report.as_dict()
    assert not [k for k in as_dict if "latency" in k or k.endswith("_ms")]
    assert as_dict["fold_max_abs_diff"] == report.fold_max_abs_diff


def test_failed_verification_blames_the_fold_not_the_conversion(
        tmp_path, monkeypatch):
    """A wrong fold: the refusal gives folding alone as the difference
    measured here between the model and its (wrong) fold, and the
    conversion alone as float32 rounding."""
    model = rc.convert(_conv_net())
    randomize_statistics(model, seed=14)
    exact = folding_module.scale_offset

    def gamma_off_by_five_percent(mean, variance, epsilon, gamma=None,
                                  beta=None):
        return exact(mean, variance, epsilon,
                     None if gamma is None else np.asarray(gamma) * 1.05,
                     beta)

    monkeypatch.setattr(folding_module, "scale_offset",
                        gamma_off_by_five_percent)
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


def _tf2onnx_hooks():
    """What `tf2onnx_optimizers_fixed` and `grouped_conv_as_plain_op`
    replace while they hold."""
    from keras.src.backend.tensorflow import nn as tf_nn
    from tf2onnx.graph import Node
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer

    return {"_add_handler": TransposeOptimizer._add_handler,
            "update_proto": Node.update_proto, "conv": tf_nn.conv}


def test_tf2onnx_patches_hold_only_during_the_export(tmp_path, monkeypatch):
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


def test_tf2onnx_patches_are_undone_after_an_error(tmp_path, monkeypatch):
    shipped = _tf2onnx_hooks()

    # Directly: an exception inside the block.
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
