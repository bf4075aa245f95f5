"""convert / revert: inference parity on real architectures and custom models."""

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import (flipped_model, numpy, max_rel_diff, nested_model,
                     randomize_statistics, sample_inputs, weight_order,
                     weights_snapshot)
from renorm_convert.transform.conversion import copy_model, recast

TOL = 1e-5

APPS = [
    ("InceptionV3", (75, 75, 3), 94),
    ("ResNet50", (32, 32, 3), 53),
    ("MobileNetV2", (32, 32, 3), 52),
    pytest.param("DenseNet121", (32, 32, 3), 121, marks=pytest.mark.slow),
    pytest.param("EfficientNetB0", (32, 32, 3), 49, marks=pytest.mark.slow),
    pytest.param("NASNetMobile", (32, 32, 3), 192, marks=[
        pytest.mark.slow, pytest.mark.skipif(
            keras.backend.backend() == "torch",
            reason="Keras refuses NASNetMobile on the torch backend")]),
]


def _count(model, cls):
    return sum(type(l) is cls for l in rc.iter_layers(model))


def _check_parity(model, expected_converted=None, x=None, **options):
    randomize_statistics(model, seed=1)
    x = sample_inputs(model) if x is None else x
    before = weights_snapshot(model)
    reference = model(x, training=False)
    report = rc.convert_plan(model)
    converted = rc.convert(model, **options)
    assert max_rel_diff(reference, converted(x, training=False)) <= TOL
    bn = keras.layers.BatchNormalization
    assert _count(converted, bn) == 0
    n = _count(converted, rc.BatchRenormalization)
    assert n == len(report.swapped) == _count(model, bn)
    # Every layer the plan names, and no other, was swapped.
    assert report.swapped == rc.revert_plan(converted).swapped
    if expected_converted is not None:
        assert n == expected_converted
    reverted = rc.revert(converted)
    assert _count(reverted, rc.BatchRenormalization) == 0
    assert max_rel_diff(reference, reverted(x, training=False)) <= TOL
    # The input model is untouched: same weights, same layer classes.
    after = weights_snapshot(model)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    assert _count(model, rc.BatchRenormalization) == 0
    return converted, x, report


@pytest.mark.parametrize("name,shape,n_bn", APPS)
def test_keras_applications_parity(name, shape, n_bn):
    model = getattr(keras.applications, name)(weights=None, input_shape=shape,
                                              classes=10)
    converted, _, _ = _check_parity(model, n_bn)
    def names(m):
        return [t._keras_history.operation.name for t in m.inputs]

    assert names(converted) == names(model) == names(rc.revert(converted))
    # Each swap adds the renorm statistics (3) and the r_max / d_max bounds
    # (2, variables so a schedule can move them under jit).
    assert len(converted.weights) == len(model.weights) + 5 * n_bn
    assert len(converted.trainable_weights) == len(model.trainable_weights)


@pytest.mark.parametrize("channels_first", [
    False, pytest.param(True, marks=pytest.mark.channels_first)])
def test_nested_shared_multi_io_parity(channels_first):
    model = nested_model(channels_first)
    converted, x, report = _check_parity(model)
    # 5 BN calls of 5 layers: the shared one stays one shared layer.
    assert sorted(report.swapped) == [
        "inner/inner_bn", "join_bn", "seq/seq_bn", "seq/seq_bn2", "shared_bn"]
    shared = converted.get_layer("shared_bn")
    assert isinstance(shared, rc.BatchRenormalization)
    assert len(shared._inbound_nodes) == 2
    assert [t.name for t in converted.inputs] == ["image_a", "image_b"]
    assert converted.output_names == model.output_names
    assert not converted.get_layer("frozen_dense").trainable
    seq_bn = converted.get_layer("seq").get_layer("seq_bn")
    assert not seq_bn.center and seq_bn.scale
    assert seq_bn.axis == model.get_layer("seq").get_layer("seq_bn").axis
    assert converted.get_layer("inner").get_layer("inner_bn").axis == (
        1 if channels_first else -1)


def test_training_mode_with_r_max_1_d_max_0_is_the_original():
    model = nested_model()
    randomize_statistics(model, seed=2)
    x = sample_inputs(model, batch=8)
    converted = rc.convert(model, r_max=1.0, d_max=0.0)
    clone = rc.revert(rc.convert(model))  # a copy of the original
    for _ in range(3):
        ours = converted(x, training=True)
        theirs = clone(x, training=True)
        assert max_rel_diff(theirs, ours) <= 1e-5
    # The moving means were updated alike (renorm, as Keras's, averages the
    # stddev rather than the variance, so moving_variance differs slightly).
    bn = clone.get_layer("join_bn")
    rn = converted.get_layer("join_bn")
    np.testing.assert_allclose(rn.moving_mean, bn.moving_mean, rtol=1e-5,
                               atol=1e-6)


def test_convert_twice_changes_nothing():
    model = nested_model()
    randomize_statistics(model)
    once = rc.convert(model, r_max=2.0)
    report = rc.convert_plan(once)
    twice = rc.convert(once)
    assert report.swapped == [] and len(report) == 0
    assert _count(twice, rc.BatchRenormalization) == 5
    a, b = weights_snapshot(once), weights_snapshot(twice)
    assert sorted(v.shape for v in a.values()) == sorted(
        v.shape for v in b.values())
    for va, vb in zip(once.weights, twice.weights):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert twice.get_layer("join_bn").r_max == 2.0


def test_include_exclude_and_options():
    model = nested_model()
    randomize_statistics(model)
    only = rc.convert(model, include=r"^(join|shared)_bn$",
                      microbatch_size=2, renorm_momentum=0.9, r_max=1.5,
                      d_max=0.5)
    only_report = rc.convert_plan(model, include=r"^(join|shared)_bn$")
    assert sorted(only_report.swapped) == ["join_bn", "shared_bn"]
    assert rc.revert_plan(only).swapped == only_report.swapped
    layer = only.get_layer("join_bn")
    assert (layer.microbatch_size, layer.renorm_momentum, layer.r_max,
            layer.d_max) == (2, 0.9, 1.5, 0.5)
    assert type(only.get_layer("inner").get_layer("inner_bn")) is (
        keras.layers.BatchNormalization)
    rest_report = rc.convert_plan(model, exclude="seq")
    assert sorted(rest_report.swapped) == ["inner/inner_bn", "join_bn",
                                           "shared_bn"]
    assert rc.revert_plan(rc.convert(model, exclude="seq")).swapped == (
        rest_report.swapped)
    with pytest.raises(ValueError, match="include"):
        rc.convert(model, include="(")
    with pytest.raises(ValueError, match="r_max=0.5"):
        rc.convert(model, r_max=0.5)


def test_keras_renorm_is_kept():
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="bn")(inputs)
    x = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
        name="keras_renorm")(x)
    model = keras.Model(inputs, x)
    randomize_statistics(model)
    converted, _, _ = _check_parity(model)
    native = converted.get_layer("keras_renorm")
    assert (native.r_max, native.d_max) == (2.0, 1.0)
    np.testing.assert_array_equal(
        numpy(native.renorm_stddev),
        numpy(model.get_layer("keras_renorm").renorm_stddev))


@pytest.mark.tensorflow
def test_synchronized_is_kept():
    """Keras allows synchronized=True on TensorFlow only."""
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization(synchronized=True, name="sync")(inputs)
    model = keras.Model(inputs, x)
    randomize_statistics(model)
    converted, _, _ = _check_parity(model)
    assert converted.get_layer("sync").synchronized


def test_sequential_model():
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(3),
    ])
    converted, _, _ = _check_parity(model, 1)
    assert isinstance(converted, keras.Sequential)


class Block(keras.layers.Layer):
    """A custom layer owning BatchNormalization sublayers."""

    def __init__(self, units=6, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units)
        self.norms = [keras.layers.BatchNormalization(),
                      keras.layers.BatchNormalization(center=False)]

    def call(self, x, training=None):
        x = self.norms[0](self.dense(x), training=training)
        return self.norms[1](x, training=training)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = Block(8)
        self.bn = keras.layers.BatchNormalization()
        self.head = keras.layers.Dense(2)

    def call(self, x, training=None):
        return self.head(self.bn(self.block(x, training=training),
                                 training=training))


def test_custom_layer_with_bn_sublayers_in_functional_model():
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(2)(Block(name="block")(inputs))
    model = keras.Model(inputs, outputs)
    converted, _, _ = _check_parity(model, 2)
    block = converted.get_layer("block")
    assert all(isinstance(n, rc.BatchRenormalization) for n in block.norms)
    assert len(converted.trainable_weights) == len(model.trainable_weights)


def test_subclassed_model():
    model = Subclassed()
    model(np.zeros((2, 5), "float32"))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    converted, _, _ = _check_parity(model, 3, x=x)
    assert type(converted) is Subclassed
    assert isinstance(converted.bn, rc.BatchRenormalization)
    assert isinstance(converted.block.norms[1], rc.BatchRenormalization)


def test_weights_move_by_name_not_position():
    """A leaf layer whose copy (from its config) creates its weights in the
    other order keeps its values: weights move by name. A custom block is
    copied as it is in memory: the same order, the same values."""
    model = flipped_model()
    x = sample_inputs(model, batch=4)
    reference = model(x, training=False)
    for copy in (rc.convert(model), rc.revert(rc.convert(model)),
                 copy_model(model), recast(model, "float32")):
        assert weight_order(copy.get_layer("flipped")) != weight_order(
            model.get_layer("flipped")), "the copy must reverse the order"
        for name in ("flipped", "flipped_block"):
            ours = {v.name: numpy(v) for v in copy.get_layer(name).weights}
            theirs = {v.name: numpy(v) for v in model.get_layer(name).weights}
            assert ours.keys() == theirs.keys()
            for key in ours:
                np.testing.assert_array_equal(ours[key], theirs[key])
        assert max_rel_diff(reference, copy(x, training=False)) <= TOL


class RenamedWeight(keras.layers.Layer):
    """Names its weight after a build counter: a copy's has another name."""

    builds = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2)

    def build(self, input_shape):
        self.dense.build(input_shape)
        RenamedWeight.builds += 1
        self.w = self.add_weight(name=f"w{RenamedWeight.builds}",
                                 shape=(2,))

    def call(self, x):
        return self.dense(x) * self.w


def test_layer_whose_copy_names_its_weight_anew_is_copied_live():
    """A copy from the config would name its weight differently: the layer
    is copied as it is in memory instead, with its own new variables."""
    inputs = keras.Input((3,))
    x = RenamedWeight(name="renamed")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x))
    randomize_statistics(model)
    model.get_layer("renamed").w.assign([0.5, -2.0])
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    assert rc.convert_plan(model).swapped == ["bn"]
    converted = rc.convert(model)
    assert max_rel_diff(model(x, training=False),
                        converted(x, training=False)) <= TOL
    new, old = converted.get_layer("renamed"), model.get_layer("renamed")
    assert new is not old and new.w is not old.w
    new.w.assign([1.0, 1.0])
    np.testing.assert_array_equal(numpy(old.w), [0.5, -2.0])


class UnnamedWeights(keras.layers.Layer):
    """Two `add_weight` calls without `name=`, as much model-zoo code
    writes them: Keras names them "variable_N" from a global counter."""

    def build(self, shape):
        self.scale = self.add_weight(shape=(shape[-1],), initializer="ones")
        self.shift = self.add_weight(shape=(shape[-1],), initializer="zeros")

    def call(self, x):
        return x * self.scale + self.shift


class BlockWithUnnamed(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization()
        self.affine = UnnamedWeights()

    def call(self, x, training=None):
        return self.affine(self.bn(x, training=training))


class HoldsUnnamed(keras.Model):
    """A subclassed model (copied from its config, weights moved by name)
    holding a layer with unnamed weights."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4)
        self.bn = keras.layers.BatchNormalization()
        self.custom = UnnamedWeights()

    def call(self, x, training=None):
        return self.custom(self.bn(self.dense(x), training=training))


def _functional_with(layer):
    inputs = keras.Input((4,))
    x = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))
    return keras.Model(inputs, layer(name="custom")(x))


@pytest.mark.parametrize("make, renamed", [
    (lambda: _functional_with(UnnamedWeights), False),
    (lambda: _functional_with(BlockWithUnnamed), False),
    (HoldsUnnamed, True)])
def test_unnamed_weights_pair_in_creation_order(make, renamed):
    """In a graph these layers are copied as they are in memory (the same
    names); in a subclassed model, made anew from its config, Keras names
    unnamed weights anew, and they are paired in creation order."""
    model = make()
    model(np.zeros((1, 4), "float32"))
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(rng.uniform(0.5, 1.5, v.shape))
    names = [v.name for layer in rc.iter_layers(model)
             if isinstance(layer, UnnamedWeights) for v in layer.weights]
    x = rng.normal(size=(3, 4)).astype("float32")
    reference = model(x, training=False)
    for copy in (rc.convert(model), rc.revert(rc.convert(model)),
                 copy_model(model)):
        new_names = [v.name for layer in rc.iter_layers(copy)
                     if isinstance(layer, UnnamedWeights)
                     for v in layer.weights]
        assert (new_names != names) == renamed
        assert max_rel_diff(reference, copy(x, training=False)) <= TOL
        # scale and shift are not swapped.
        def unnamed(m):
            return [v.numpy() for layer in rc.iter_layers(m)
                    if isinstance(layer, UnnamedWeights)
                    for v in layer.weights]

        for new, old in zip(unnamed(copy), unnamed(model), strict=True):
            np.testing.assert_array_equal(new, old)


class Opaque(keras.Model):
    """No get_config: cannot be recreated."""

    def __init__(self, width):
        super().__init__()
        self.bn = keras.layers.BatchNormalization()
        self.dense = keras.layers.Dense(width)

    def call(self, x):
        return self.dense(self.bn(x))


def test_subclassed_model_that_cannot_be_copied_says_why():
    model = Opaque(3)
    model(np.zeros((2, 4), "float32"))
    with pytest.raises(rc.RenormConvertError,
                       match=r"'opaque'.*\(Opaque\).*get_config"):
        rc.convert(model)


def test_unbuilt_model_says_so():
    model = keras.Sequential([keras.layers.Dense(2),
                              keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="not built"):
        rc.convert(model)


@pytest.mark.tensorflow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_keras2_h5_model_converts(tmp_path):
    import tf_keras

    inputs = tf_keras.Input((6, 6, 2))
    x = tf_keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = tf_keras.layers.BatchNormalization(name="bn", scale=False)(x)
    x = tf_keras.layers.Activation("relu")(x)
    x = tf_keras.layers.Flatten()(x)
    outputs = tf_keras.layers.Dense(3, name="dense")(x)
    old = tf_keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    bn = old.get_layer("bn")
    bn.set_weights([rng.uniform(-1, 1, 4).astype("float32"),
                    rng.uniform(-1, 1, 4).astype("float32"),
                    rng.uniform(0.5, 2, 4).astype("float32")])
    path = tmp_path / "keras2.h5"
    old.save(path)
    x = rng.normal(size=(3, 6, 6, 2)).astype("float32")
    expected = old.predict(x, verbose=0)
    loaded = keras.models.load_model(path, compile=False)
    assert rc.convert_plan(loaded).swapped == ["bn"]
    converted = rc.convert(loaded)
    assert max_rel_diff(expected, converted(x, training=False)) <= TOL


def test_recast_to_mixed_float16_compiles_with_loss_scaling():
    """The recast model (and a nested one) carries the policy, so Keras's
    `compile` wraps the optimizer in a LossScaleOptimizer; the layers
    compute in float16 and keep float32 variables."""
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization()],
                             name="inner")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2)(inner(inputs))
    model = rc.convert(keras.Model(inputs, outputs))
    mixed = recast(model, "mixed_float16")
    assert mixed.dtype_policy.name == "mixed_float16"
    assert mixed.get_layer("inner").dtype_policy.name == "mixed_float16"
    assert model.dtype_policy.name == "float32"  # the input is untouched
    mixed.compile(optimizer="sgd", loss="mse")
    assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
    assert all(layer.compute_dtype == "float16"
               for layer in rc.iter_layers(mixed)
               if not isinstance(layer, keras.layers.InputLayer))
    assert all(v.dtype == "float32" for v in mixed.variables)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    mixed.fit(x, x[:, :2], epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(numpy(mixed(x))).all()
    back = recast(mixed, "float32")
    back.compile(optimizer="sgd", loss="mse")
    assert not isinstance(back.optimizer,
                          keras.optimizers.LossScaleOptimizer)
