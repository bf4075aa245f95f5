"""Layers written the way model-zoo libraries write them: a block that
makes its sublayers in `build()` from an argument its config leaves out,
and a block called with a list of tensors next to other keyword arguments.
convert, revert and fold must keep their outputs without relying on
`get_config()` describing them; export too where TensorFlow is."""

import threading

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import max_rel_diff, numpy, randomize_statistics, sample_inputs


class Pyramid(keras.layers.Layer):
    """Spatial-pyramid pooling as a segmentation library writes it: one
    Conv + BatchNormalization branch per level, made in `build()`; its
    config does not record `levels`, so a copy made from
    the config has 2 branches where the original has `levels`."""

    def __init__(self, levels=2, **kwargs):
        super().__init__(**kwargs)
        self.levels = levels

    def build(self, shape):
        channels = shape[-1]
        self.convs = [keras.layers.Conv2D(channels, 1, use_bias=False)
                      for _ in range(self.levels)]
        self.bns = [keras.layers.BatchNormalization()
                    for _ in range(self.levels)]
        for conv, bn in zip(self.convs, self.bns):
            conv.build(shape)
            bn.build(shape)

    def get_config(self):  # as the library's: no `levels`
        return super().get_config()

    def call(self, x):
        branches = [bn(conv(keras.ops.average_pool(x, 2 ** i, 1, "same")))
                    for i, (conv, bn) in enumerate(zip(self.convs, self.bns))]
        return keras.ops.concatenate([x] + branches, axis=-1)


class Fuse(keras.layers.Layer):
    """A detection neck's fusion block: its call takes a list of tensors
    and a float by keyword, and joins them through its own normalization."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, skips=None, scale=1.0):
        return self.bn(x + sum(skips)) * scale


class PyramidPooling(keras.layers.Layer):
    """Atrous spatial pyramid pooling as a segmentation library's DeepLabV3
    writes it: one Sequential of Conv2D, BatchNormalization and ReLU per
    dilation rate, a pooled branch and a projection, all made in `build()`.
    With `record_rates=False` its config leaves the rates out, as some
    libraries' configs leave arguments out: a copy made from the config
    then has other branches."""

    def __init__(self, dilation_rates=(2, 3), channels=4, record_rates=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.dilation_rates = tuple(dilation_rates)
        self.channels = channels
        self.record_rates = record_rates

    def _branch(self, kernel, rate=1, pool=False):
        return keras.Sequential(
            ([keras.layers.GlobalAveragePooling2D(keepdims=True)] if pool
             else []) + [
                keras.layers.Conv2D(self.channels, kernel, padding="same",
                                    dilation_rate=rate, use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.Activation("relu")])

    def build(self, shape):
        self.branches = [self._branch(1)] + [
            self._branch(3, rate) for rate in self.dilation_rates]
        self.pool = self._branch(1, pool=True)
        for branch in self.branches + [self.pool]:
            branch.build(shape)
        self.projection = self._branch(1)
        self.projection.build(tuple(shape[:-1]) + (
            (len(self.branches) + 1) * self.channels,))

    def call(self, x, training=None):
        outputs = [branch(x, training=training) for branch in self.branches]
        pooled = self.pool(x, training=training)
        outputs.append(keras.ops.broadcast_to(pooled,
                                              keras.ops.shape(outputs[0])))
        return self.projection(keras.ops.concatenate(outputs, axis=-1),
                               training=training)

    def get_config(self):
        config = {**super().get_config(), "channels": self.channels,
                  "record_rates": self.record_rates}
        if self.record_rates:
            config["dilation_rates"] = list(self.dilation_rates)
        return config


def segmentation_model(record_rates=True):
    """A DeepLabV3-style head: a stem, the pyramid, a classifier; 6
    normalization layers, 5 of them inside the pyramid's Sequentials."""
    inputs = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = PyramidPooling(record_rates=record_rates, name="aspp")(x)
    return keras.Model(inputs, keras.layers.Conv2D(3, 1, name="classes")(x))


def _normalization(model):
    return [layer for layer in rc.iter_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("record_rates", [True, False])
def test_every_transform_reaches_every_normalization_layer(record_rates):
    """convert swaps all six, inside the pyramid's Sequentials too; revert
    swaps all six back, fold folds all six (the five in the pyramid into
    their Conv2D) whether or not the config describes the pyramid."""
    model = segmentation_model(record_rates)
    randomize_statistics(model, seed=9)
    x = sample_inputs(model, 3)
    expected = model(x, training=False)
    plan = rc.convert_plan(model)
    assert len(plan) == 6 and plan.swapped[0] == "stem_bn"
    assert all(path.startswith("aspp/") for path in plan.swapped[1:])

    converted = rc.convert(model)
    assert rc.revert_plan(converted).swapped == plan.swapped
    assert len(_normalization(converted)) == 6
    assert all(isinstance(n, rc.BatchRenormalization)
               for n in _normalization(converted))
    assert max_rel_diff(expected, converted(x, training=False)) <= 1e-6

    reverted = rc.revert(converted)
    assert rc.renorm_layers(reverted) == []
    assert rc.convert_plan(reverted).swapped == plan.swapped
    assert max_rel_diff(expected, reverted(x, training=False)) <= 1e-6

    fold_plan = rc.fold_plan(converted)
    assert sorted(e.path for e in fold_plan) == sorted(plan.swapped)
    assert sorted(fold_plan.folded) == sorted(plan.swapped)
    folded = rc.fold(converted)
    assert _normalization(folded) == []
    assert not any(isinstance(layer, rc.ChannelAffine)
                   for layer in rc.iter_layers(folded))
    assert max_rel_diff(expected, folded(x)) <= 1e-5
    for copy in (rc.copy_model(converted), rc.recast(converted, "float32")):
        assert len(rc.renorm_layers(copy)) == 6
        assert max_rel_diff(expected, copy(x, training=False)) <= 1e-6


def test_pyramid_of_sequentials_saves_and_loads_converted(tmp_path):
    """The converted pyramid (config intact, branches made in build())
    round-trips through .keras with its renorm statistics."""
    model = segmentation_model()
    randomize_statistics(model, seed=10)
    x = sample_inputs(model, 3)
    converted = rc.convert(model)
    path = tmp_path / "aspp.keras"
    converted.save(path)
    loaded = keras.models.load_model(
        path, custom_objects={"PyramidPooling": PyramidPooling})
    assert len(rc.renorm_layers(loaded)) == 6
    assert max_rel_diff(model(x, training=False),
                        loaded(x, training=False)) <= 1e-6


def library_model():
    inputs = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    p = Pyramid(levels=3, name="pyramid")(x)
    p = keras.layers.Conv2D(4, 1, name="reduce")(p)
    side = keras.layers.Conv2D(4, 1, name="side")(x)
    y = Fuse(name="fuse")(p, skips=[side, x], scale=0.5)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(y))


def test_config_does_not_recreate_the_pyramid():
    """The premise: a copy from the config has other weights."""
    layer = library_model().get_layer("pyramid")
    copy = Pyramid.from_config(layer.get_config())
    copy.build((None, 8, 8, 4))
    assert len(copy.weights) != len(layer.weights)


def test_convert_revert_fold_keep_outputs():
    model = library_model()
    randomize_statistics(model, seed=3)
    x = sample_inputs(model, 3)
    expected = model(x, training=False)
    report = rc.convert_plan(model)
    converted = rc.convert(model)
    # 1 + 3 in the pyramid + 1 in the fusion block, all swapped.
    assert len(report) == 5
    assert sum(isinstance(l, rc.BatchRenormalization)
               for l in rc.iter_layers(converted)) == 5
    assert max_rel_diff(expected, converted(x, training=False)) <= 1e-6
    reverted = rc.revert(converted)
    assert not any(isinstance(l, rc.BatchRenormalization)
                   for l in rc.iter_layers(reverted))
    assert max_rel_diff(expected, reverted(x, training=False)) <= 1e-6
    folded = rc.fold(converted)
    assert not any(isinstance(l, keras.layers.BatchNormalization)
                   for l in rc.iter_layers(folded))
    assert max_rel_diff(expected, folded(x)) <= 1e-5


def test_copies_do_not_share_variables_with_the_original():
    model = library_model()
    randomize_statistics(model, seed=4)
    converted = rc.convert(model)
    old = model.get_layer("pyramid")
    new = converted.get_layer("pyramid")
    new = getattr(new, "layer", new)  # the block inside its SwappedBlock
    assert isinstance(new.bns[2], rc.BatchRenormalization)
    assert type(old.bns[2]) is keras.layers.BatchNormalization
    before = numpy(old.convs[2].kernel)
    np.testing.assert_array_equal(numpy(new.convs[2].kernel), before)
    new.convs[2].kernel.assign(np.zeros_like(before))
    np.testing.assert_array_equal(numpy(old.convs[2].kernel), before)


def test_training_the_converted_model_leaves_the_original():
    model = library_model()
    randomize_statistics(model, seed=5)
    x = sample_inputs(model, 8)
    expected = numpy(model(x, training=False))
    converted = rc.convert(model)
    converted.compile("sgd", "mse")
    converted.fit(x, np.zeros((8, 4), "float32"), epochs=1, verbose=0)
    np.testing.assert_array_equal(numpy(model(x, training=False)), expected)
    assert max_rel_diff(expected, converted(x, training=False)) > 1e-4


class LockedPyramid(Pyramid):
    """The pyramid with a lock guarding a cache, as some library layers
    keep: a lock cannot be copied (nor pickled)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._cache_lock = threading.Lock()


def test_a_layer_holding_a_lock_is_copied_sharing_only_the_lock():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    model = keras.Model(inputs, LockedPyramid(levels=3, name="pyramid")(x))
    randomize_statistics(model, seed=8)
    x = sample_inputs(model, 3)
    expected = model(x, training=False)
    converted = rc.convert(model)
    assert max_rel_diff(expected, converted(x, training=False)) <= 1e-6
    assert max_rel_diff(expected, rc.fold(converted)(x)) <= 1e-5
    old = model.get_layer("pyramid")
    new = converted.get_layer("pyramid")
    new = getattr(new, "layer", new)
    assert new._cache_lock is old._cache_lock
    assert new.convs[0].kernel is not old.convs[0].kernel
    assert isinstance(new.bns[0], rc.BatchRenormalization)


def test_fused_block_saves_and_loads(tmp_path):
    """The fusion block (config intact) round-trips through .keras with its
    renorm statistics."""
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 1)(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    model = keras.Model(inputs, Fuse(name="fuse")(a, skips=[b, a], scale=2.0))
    randomize_statistics(model, seed=6)
    x = sample_inputs(model, 3)
    converted = rc.convert(model)
    path = tmp_path / "fuse.keras"
    converted.save(path)
    loaded = keras.models.load_model(path, custom_objects={"Fuse": Fuse})
    assert isinstance(loaded.get_layer("fuse").bn, rc.BatchRenormalization)
    assert max_rel_diff(model(x, training=False),
                        loaded(x, training=False)) <= 1e-6


@pytest.mark.tensorflow
def test_export_folds_and_matches(tmp_path):
    from onnx_helpers import run_onnx

    model = library_model()
    randomize_statistics(model, seed=7)
    x = sample_inputs(model, 3)
    converted = rc.convert(model)
    report = rc.export_onnx(converted, tmp_path / "lib.onnx")
    assert report.relative_diff <= 1e-5
    assert "BatchNormalization" not in report.op_counts
    got = run_onnx(str(tmp_path / "lib.onnx"), [x])[0]
    assert max_rel_diff(model(x, training=False), got) <= 1e-5
