"""Every kind of node a real functional graph holds: raw operations, Keras 2
TF-op layers, captured constants, one layer with several outputs."""

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf

import renorm_convert as rc
from helpers import max_rel_diff, randomize_statistics, sample_inputs
from renorm_convert.export import run_onnx
from renorm_convert.io import load


def _onnx(path, x):
    outputs = run_onnx(str(path), x if isinstance(x, list) else [x])
    return outputs[0] if len(outputs) == 1 else outputs


def ops_model():
    """Raw operations between layers, as MobileNetV3, pre-activation ResNets
    and CSP blocks write them."""
    inputs = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    x = keras.layers.BatchNormalization(name="bn_after_pad")(x)
    x = x * (keras.ops.relu6(x + 3.0) / 6.0)  # hard-swish
    a, b = keras.ops.split(x, 2, axis=-1)
    a = keras.layers.Conv2D(4, 1, name="conv_a")(a)
    a = keras.layers.BatchNormalization(name="bn_a")(a)
    x = keras.layers.Concatenate(name="cat")([a, b * 2.0])
    x = x[:, 1:, :, :]
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, x, name="ops")


def _check_all(model, tmp_path, unfolded):
    """convert, revert, save / load, fold and export_onnx all keep the
    model's outputs."""
    randomize_statistics(model, seed=1)
    x = sample_inputs(model, batch=3)
    expected = model(x, training=False)
    converted = rc.convert(model)
    assert max_rel_diff(expected, converted(x, training=False)) <= 1e-6
    assert max_rel_diff(expected, rc.revert(converted)(x)) <= 1e-6
    converted.save(tmp_path / "c.keras")
    loaded = keras.models.load_model(tmp_path / "c.keras")
    assert max_rel_diff(expected, loaded(x, training=False)) <= 1e-6
    folded = rc.fold(converted)
    assert folded.unfolded.keys() == set(unfolded)
    for name, kind in unfolded.items():
        assert kind in folded.unfolded[name]
    assert max_rel_diff(expected, folded(x)) <= 1e-5
    report = rc.export_onnx(converted, tmp_path / "c.onnx")
    assert report.max_abs_diff / report.output_scale <= 1e-5
    onnx_out = _onnx(tmp_path / "c.onnx", x)
    assert max_rel_diff(expected, onnx_out) <= 1e-5
    return converted, report


def test_raw_operations_everywhere(tmp_path):
    model = ops_model()
    graph = rc.model_graph(model)
    kinds = {graph.nodes[n]["class_name"] for n in graph}
    assert {"Pad", "Add", "Split", "GetItem", "Multiply"} <= kinds
    converted, report = _check_all(model, tmp_path,
                                   {"bn_after_pad": "Pad"})
    assert converted.renorm_converted == ["bn_after_pad", "bn_a"]


def test_hard_swish_export_keeps_layout_transposes_out(tmp_path):
    """tf2onnx's transpose optimizer crashed on the scalar of `x + 3.0`
    after a Conv and then left a Transpose pair around every layer."""
    inputs = keras.Input((8, 8, 3), name="img")
    x = inputs
    for i in range(3):
        x = keras.layers.Conv2D(4, 3, padding="same", name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = x * (keras.ops.relu6(x + 3.0) / 6.0)
        # A squeeze-excite gate: a Conv without bias, then `+ 3.0`.
        gate = keras.layers.Conv2D(4, 1, use_bias=False, name=f"se{i}")(x)
        x = x * (keras.ops.relu6(gate + 3.0) / 6.0)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    randomize_statistics(model, seed=4)
    report = rc.export_onnx(model, tmp_path / "m.onnx")
    assert report.folded == 3
    assert report.op_counts.get("Transpose", 0) <= 1, report.op_counts
    assert report.max_abs_diff / report.output_scale <= 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_keras2_h5_with_tf_op_layers(tmp_path):
    """Keras 2 records `x + 3.0`, `tf.nn.relu6`, `x * y` (a tensor passed by
    keyword) and slicing as TFOpLambda / SlicingOpLambda layers."""
    import tf_keras

    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = tf_keras.layers.BatchNormalization(name="bn1")(x)
    x = x * (tf.nn.relu6(x + 3.0) / 6.0)
    x = x[:, 1:, :, :]
    x = tf_keras.layers.Conv2D(4, 1)(x)
    x = tf_keras.layers.BatchNormalization(name="bn2")(x)
    outputs = tf_keras.layers.GlobalAveragePooling2D()(x)
    old = tf_keras.Model(inputs, outputs)
    classes = {type(l).__name__ for l in old.layers}
    assert {"TFOpLambda", "SlicingOpLambda"} <= classes
    rng = np.random.default_rng(0)
    for name in ("bn1", "bn2"):
        old.get_layer(name).set_weights(
            [rng.uniform(0.5, 2, 4).astype("float32"),
             rng.uniform(-1, 1, 4).astype("float32"),
             rng.uniform(-1, 1, 4).astype("float32"),
             rng.uniform(0.5, 2, 4).astype("float32")])
    path = tmp_path / "keras2.h5"
    old.save(path)
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    expected = old.predict(x, verbose=0)

    loaded = load(path)
    assert max_rel_diff(expected, loaded(x)) <= 1e-6
    converted = rc.convert(loaded)
    assert converted.renorm_converted == ["bn1", "bn2"]
    converted.save(tmp_path / "c.keras")
    reloaded = keras.models.load_model(tmp_path / "c.keras")
    assert max_rel_diff(expected, reloaded(x, training=False)) <= 1e-6
    folded = rc.fold(converted)
    assert sorted(folded.folded) == ["bn1", "bn2"]
    assert max_rel_diff(expected, folded(x)) <= 1e-5
    report = rc.export_onnx(converted, tmp_path / "c.onnx")
    assert max_rel_diff(expected, _onnx(tmp_path / "c.onnx", x)) <= 1e-5
    assert report.folded == 2


class AddConstant(keras.layers.Layer):
    """Holds an eager tf.constant made in build, as some model code does."""

    def build(self, shape):
        self.offset = tf.constant(np.linspace(-1, 1, shape[-1]), tf.float32)

    def call(self, x):
        return x + self.offset


def test_captured_constant_is_embedded(tmp_path):
    inputs = keras.Input((6, 6, 3), name="img")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, AddConstant(name="offset")(x))
    randomize_statistics(model, seed=2)
    report = rc.export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["img"] == report.input_names
    x = sample_inputs(model)
    assert max_rel_diff(model(x), _onnx(tmp_path / "m.onnx", x)) <= 1e-5


class ThreeMaps(keras.layers.Layer):
    def call(self, x):
        return [x[..., :2], x[..., 2:4] * 2.0, x[..., 4:]]


def test_one_layer_with_several_outputs_gets_unique_names(tmp_path):
    """A feature-pyramid backbone returns several maps of one layer."""
    inputs = keras.Input((8, 8, 3), name="img")
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    parts = ThreeMaps(name="fpn")(x)
    model = keras.Model(inputs, [parts[0], parts[1], parts[2]])
    assert len(set(model.output_names)) < 3  # what Keras itself gives
    randomize_statistics(model, seed=3)
    report = rc.export_onnx(rc.convert(model), tmp_path / "m.onnx")
    assert len(set(report.output_names)) == 3
    assert all(n.startswith("fpn") for n in report.output_names)
    x = sample_inputs(model)
    assert max_rel_diff(model(x), _onnx(tmp_path / "m.onnx", x)) <= 1e-5


def test_unique_names():
    from renorm_convert.export import unique_names

    assert unique_names(["a", "a", "b", "a_1", "a"]) == [
        "a", "a_2", "b", "a_1", "a_3"]
