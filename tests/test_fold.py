"""fold on every backend: the weight maths against NumPy, each producer,
forward folding, plans, and parity (no ONNX: tests/test_export.py)."""

import dataclasses
import json

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import (flipped_model, max_rel_diff, nested_model, numpy,
                     randomize_statistics, sample_inputs, weight_order,
                     weights_snapshot)
from renorm_convert.transform.folding import (
    FoldEntry, FoldPlan, fold_forward_weights, fold_plan, fold_weights,
    scale_offset)


def test_fold_weights_matches_numpy_dense_then_batchnorm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5))
    kernel, bias = rng.normal(size=(5, 3)), rng.normal(size=3)
    mean, var = rng.normal(size=3), rng.uniform(0.1, 2, 3)
    gamma, beta, eps = rng.normal(size=3), rng.normal(size=3), 1e-3
    reference = (x @ kernel + bias - mean) / np.sqrt(var + eps) * gamma + beta
    k, b = fold_weights(kernel, bias, mean, var, eps, gamma, beta)
    np.testing.assert_allclose(x @ k + b, reference, rtol=1e-5, atol=1e-5)
    # Missing gamma / beta / bias are ones / zeros.
    reference = (x @ kernel - mean) / np.sqrt(var + eps)
    k, b = fold_weights(kernel, None, mean, var, eps)
    np.testing.assert_allclose(x @ k + b, reference, rtol=1e-5, atol=1e-5)
    s, o = scale_offset(mean, var, eps, None, beta)
    np.testing.assert_allclose(x[:, :3] * s + o,
                               (x[:, :3] - mean) / np.sqrt(var + eps) + beta,
                               rtol=1e-5, atol=1e-6)


def test_fold_weights_transposed_axis():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 4, 2))  # (..., out, in)
    mean, var = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    k, _ = fold_weights(kernel, None, mean, var, 1e-3, channel_axis=-2)
    expected = kernel / np.sqrt(var + 1e-3)[None, None, :, None]
    np.testing.assert_allclose(k, expected, rtol=1e-6)


def _producer_model(producer, shape, axis=-1, center=True, scale=True):
    inputs = keras.Input(shape)
    x = producer(inputs)
    x = keras.layers.BatchNormalization(axis=axis, center=center,
                                        scale=scale)(x)
    return keras.Model(inputs, keras.layers.Activation("relu")(x))


PRODUCERS = [
    (lambda: keras.layers.Dense(6), (5,), -1),
    (lambda: keras.layers.Dense(6, use_bias=False), (4, 5), -1),
    (lambda: keras.layers.Conv1D(6, 3), (9, 2), -1),
    (lambda: keras.layers.Conv2D(6, 3), (8, 8, 2), -1),
    # Output width 7 != 6 channels: Keras 3.15's ops.add takes a (1, C, 1, 1)
    # bias for channels-last when the last size equals C (its BiasAdd
    # shortcut), which breaks channels-first Conv biases in Keras itself.
    pytest.param(lambda: keras.layers.Conv2D(6, 3,
                                             data_format="channels_first"),
                 (2, 9, 9), 1, marks=pytest.mark.channels_first),
    (lambda: keras.layers.Conv3D(4, 2), (5, 5, 5, 2), -1),
    (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (8, 8, 3), -1),
    (lambda: keras.layers.DepthwiseConv1D(3, use_bias=False), (9, 3), -1),
    (lambda: keras.layers.SeparableConv1D(5, 3), (9, 3), -1),
    (lambda: keras.layers.SeparableConv2D(5, 3, depth_multiplier=2),
     (8, 8, 3), -1),
    (lambda: keras.layers.Conv2DTranspose(4, 3, strides=2), (5, 5, 3), -1),
    (lambda: keras.layers.Conv1DTranspose(4, 3), (6, 3), -1),
]


@pytest.mark.parametrize("make,shape,axis", PRODUCERS)
@pytest.mark.parametrize("renorm", [False, True])
def test_fold_each_producer(make, shape, axis, renorm):
    model = _producer_model(make(), shape, axis)
    if renorm:
        model = rc.convert(model)
    randomize_statistics(model, seed=3)
    plan = fold_plan(model)
    assert len(plan.folded) == 1 and plan.unfolded == {}
    assert [e.into for e in plan] == ["producer"]
    folded = rc.fold(model, plan)
    assert not any(isinstance(l, (keras.layers.BatchNormalization,
                                  rc.ChannelAffine)) for l in folded.layers)
    x = sample_inputs(model, batch=3)
    assert max_rel_diff(model(x, training=False), folded(x)) <= 1e-5


@pytest.mark.parametrize("center,scale", [(False, True), (True, False),
                                          (False, False)])
def test_fold_without_gamma_or_beta(center, scale):
    model = _producer_model(keras.layers.Conv2D(4, 3, use_bias=False),
                            (6, 6, 2), center=center, scale=scale)
    randomize_statistics(model, seed=4)
    assert len(fold_plan(model).folded) == 1
    folded = rc.fold(model)
    x = sample_inputs(model)
    assert max_rel_diff(model(x, training=False), folded(x)) <= 1e-5


def test_unfoldable_cases_become_channel_affine():
    inputs = keras.Input((6, 6, 3))
    a = keras.layers.BatchNormalization(name="bn_input")(inputs)
    # "same" padding everywhere: nothing folds forward either.
    c = keras.layers.Conv2D(4, 3, padding="same", name="conv_shared_out")(a)
    b1 = keras.layers.BatchNormalization(name="bn_two_consumers")(c)
    side = keras.layers.ReLU(name="side")(c)
    r = keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            name="conv_relu")(b1)
    b2 = keras.layers.BatchNormalization(name="bn_after_relu_conv")(r)
    side = keras.layers.Conv2D(4, 3, padding="same", name="side_conv")(side)
    cat = keras.layers.Concatenate(name="cat")([b2, side])
    b3 = keras.layers.BatchNormalization(name="bn_after_concat")(cat)
    model = keras.Model(inputs, b3)
    randomize_statistics(model, seed=5)
    converted = rc.convert(model)
    plan = fold_plan(converted)
    folded = rc.fold(converted)
    assert plan.folded == []
    unfolded = plan.unfolded
    assert set(unfolded) == {"bn_input", "bn_two_consumers",
                             "bn_after_relu_conv", "bn_after_concat"}
    assert "model input" in unfolded["bn_input"]
    assert "other consumers" in unfolded["bn_two_consumers"]
    assert "non-linear activation" in unfolded["bn_after_relu_conv"]
    assert "Concatenate" in unfolded["bn_after_concat"]
    assert sum(isinstance(l, rc.ChannelAffine) for l in folded.layers) == 4
    x = sample_inputs(model)
    assert max_rel_diff(model(x, training=False), folded(x)) <= 1e-5


def test_fold_moves_weights_by_name():
    """A leaf layer whose copy creates its weights in the other order keeps
    their values through fold (a custom block with sublayers is copied as it
    is in memory, its order kept); every weight keeps its value by name."""
    model = flipped_model()
    x = sample_inputs(model, batch=4)
    folded = rc.fold(model)
    assert weight_order(folded.get_layer("flipped")) != weight_order(
        model.get_layer("flipped")), "the copy must reverse the order"
    for name in ("flipped", "flipped_block"):
        old = {v.name: numpy(v) for v in model.get_layer(name).weights}
        new = {v.name: numpy(v) for v in folded.get_layer(name).weights}
        assert len(old) == len(model.get_layer(name).weights)
        np.testing.assert_equal(new, old)
    assert fold_plan(model).folded == ["bn"]
    assert max_rel_diff(model(x, training=False), folded(x)) <= 1e-5


@pytest.mark.channels_first
def test_fold_nested_shared_model():
    model = rc.convert(nested_model(channels_first=True))
    randomize_statistics(model, seed=6)
    folded = rc.fold(model)
    # inner_bn folds in both calls of the inner model; seq's two BN fold.
    assert sorted(fold_plan(model).folded) == ["inner/inner_bn", "seq/seq_bn",
                                               "seq/seq_bn2"]
    x = sample_inputs(model)
    assert max_rel_diff(model(x, training=False), folded(x)) <= 1e-5
    assert [t._keras_history.operation.name for t in folded.inputs] == [
        "image_a", "image_b"]


def test_fold_forward_into_valid_consumers():
    """A normalization after Concatenate / Add folds exactly into consumers
    that are Dense or padding="valid" Conv (several, and one that is itself
    followed by a normalization folded backward); "same" padding does not."""
    inputs = keras.Input((9, 9, 3), name="img")
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    b = keras.layers.Conv2D(4, 1, activation="relu")(inputs)
    cat = keras.layers.Concatenate()([a, b])
    bn_cat = keras.layers.BatchNormalization(name="bn_cat")(cat)
    c1 = keras.layers.Conv2D(5, 3, name="c1")(bn_cat)            # valid
    c2 = keras.layers.Conv2D(5, 3, use_bias=False, name="c2")(bn_cat)
    c2 = keras.layers.BatchNormalization(name="bn_c2")(c2)        # backward
    added = keras.layers.Add()([c1, c2])
    bn_add = keras.layers.BatchNormalization(name="bn_add")(added)
    same = keras.layers.Conv2D(3, 3, padding="same", name="same")(bn_add)
    pooled = keras.layers.GlobalAveragePooling2D()(same)
    bn_vec = keras.layers.BatchNormalization(name="bn_vec")(pooled)
    out = keras.layers.Dense(2, name="head")(bn_vec)
    model = keras.Model(inputs, out)
    randomize_statistics(model, seed=7)
    converted = rc.convert(model)
    plan = fold_plan(converted)
    folded = rc.fold(converted, plan)
    assert sorted(plan.folded) == ["bn_c2", "bn_cat", "bn_vec"]
    assert list(plan.unfolded) == ["bn_add"]
    entries = {e.path: e for e in plan}
    assert entries["bn_cat"].into == "consumers"
    assert sorted(entries["bn_cat"].consumers) == ["c1", "c2"]
    assert entries["bn_c2"].into == "producer"
    assert entries["bn_c2"].producer == "c2"
    assert entries["bn_vec"].into == "consumers"
    assert entries["bn_vec"].consumers == ["head"]
    assert entries["bn_add"].into is None and entries["bn_add"].reason
    x = sample_inputs(model, batch=3)
    assert max_rel_diff(model(x, training=False), folded(x)) <= 1e-5


def test_fold_forward_weights_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 5, 3))
    kernel = rng.normal(size=(3, 3, 3, 4))
    bias = rng.normal(size=4)
    scale, offset = rng.uniform(0.5, 2, 3), rng.normal(size=3)

    def conv_valid(x, k, b):  # plain loops: the reference
        out = np.zeros((x.shape[0], 3, 3, k.shape[-1]))
        for i in range(3):
            for j in range(3):
                out[:, i, j] = np.einsum("nhwc,hwco->no",
                                         x[:, i:i + 3, j:j + 3], k) + b
        return out

    expected = conv_valid(x * scale + offset, kernel, bias)
    k2, b2 = fold_forward_weights(kernel, bias, scale, offset)
    np.testing.assert_allclose(conv_valid(x, k2, b2), expected, rtol=1e-5,
                               atol=1e-5)


def test_fold_plan_is_data_and_fold_leaves_the_model_alone():
    """The plan is a dataclass of entries (nothing is stuck onto a model);
    `fold` takes it or makes it, changes nothing in its input, and writes
    the weights NumPy's maths give."""
    model = rc.convert(nested_model())
    randomize_statistics(model, seed=12)
    before = weights_snapshot(model)
    attributes = set(vars(model))
    plan = fold_plan(model)
    assert isinstance(plan, FoldPlan) and dataclasses.is_dataclass(plan)
    assert all(isinstance(e, FoldEntry) for e in plan) and len(plan) == 5
    assert sorted(plan.folded) == ["inner/inner_bn", "seq/seq_bn",
                                   "seq/seq_bn2"]
    assert sorted(plan.unfolded) == ["join_bn", "shared_bn"]
    assert "Concatenate" in plan.unfolded["join_bn"]
    rows = json.loads(json.dumps([e.as_dict() for e in plan]))
    assert {r["path"]: r["foldable"] for r in rows} == {
        e.path: e.path in plan.folded for e in plan}
    assert {r["path"]: r["reason"] for r in rows if not r["foldable"]} == (
        plan.unfolded)

    folded = rc.fold(model, plan)
    again = rc.fold(model)
    for name in ("folded", "unfolded", "fold_plan", "renorm_converted"):
        assert not hasattr(folded, name), name
    assert set(vars(model)) == attributes
    after = weights_snapshot(model)
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    # The same plan, given or made: the same weights, bit for bit.
    np.testing.assert_equal(weights_snapshot(folded), weights_snapshot(again))

    # Against NumPy: Dense -> BN(center=False) folds to
    # (W, b) -> (W s, (b - mean) s) with s = gamma / sqrt(var + eps).
    dense, bn = model.get_layer("seq").get_layer("seq_dense"), \
        model.get_layer("seq").get_layer("seq_bn")
    s = numpy(bn.gamma) / np.sqrt(numpy(bn.moving_variance) + bn.epsilon)
    new = folded.get_layer("seq_dense")
    np.testing.assert_allclose(numpy(new.kernel), numpy(dense.kernel) * s,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        numpy(new.bias), (numpy(dense.bias) - numpy(bn.moving_mean)) * s,
        rtol=1e-6, atol=1e-6)
    # An unfolded one is y = x * scale + offset with NumPy's scale / offset.
    join = model.get_layer("join_bn")
    affine = folded.get_layer("join_bn")
    assert isinstance(affine, rc.ChannelAffine)
    scale = numpy(join.gamma) / np.sqrt(numpy(join.moving_variance)
                                        + join.epsilon)
    np.testing.assert_allclose(numpy(affine.scale), scale, rtol=1e-6)
    np.testing.assert_allclose(
        numpy(affine.offset),
        numpy(join.beta) - numpy(join.moving_mean) * scale,
        rtol=1e-6, atol=1e-6)
    x = sample_inputs(model, batch=3)
    assert max_rel_diff(model(x, training=False), folded(x)) <= 1e-5
