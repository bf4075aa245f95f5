"""Every kind of node a real functional graph holds: raw operations, Keras 2
TF-op layers, captured constants, one layer with several outputs."""

import keras
import numpy as np
import onnx
import pytest
import tensorflow as tf

import renorm_convert as rc
from helpers import max_rel_diff, randomize_statistics, sample_inputs
from onnx_helpers import run_onnx
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
    conversion = rc.convert_plan(model)
    converted = rc.convert(model)
    assert max_rel_diff(expected, converted(x, training=False)) <= 1e-6
    assert max_rel_diff(expected, rc.revert(converted)(x)) <= 1e-6
    converted.save(tmp_path / "c.keras")
    loaded = keras.models.load_model(tmp_path / "c.keras")
    assert max_rel_diff(expected, loaded(x, training=False)) <= 1e-6
    plan = rc.fold_plan(converted)
    if isinstance(unfolded, dict):
        assert plan.unfolded.keys() == set(unfolded)
        for name, kind in unfolded.items():
            assert kind in plan.unfolded[name]
    else:  # (how many, what each reason says)
        assert len(plan.unfolded) == unfolded[0]
        assert all(unfolded[1] in r for r in plan.unfolded.values())
    folded = rc.fold(converted, plan)
    assert max_rel_diff(expected, folded(x)) <= 1e-5
    report = rc.export_onnx(converted, tmp_path / "c.onnx")
    assert report.relative_diff <= 1e-5
    onnx_out = _onnx(tmp_path / "c.onnx", x)
    assert max_rel_diff(expected, onnx_out) <= 1e-5
    return converted, report, conversion


def test_raw_operations_everywhere(tmp_path):
    model = ops_model()
    graph = rc.model_graph(model)
    kinds = {graph.nodes[n]["class_name"] for n in graph}
    assert {"Pad", "Add", "Split", "GetItem", "Multiply"} <= kinds
    converted, report, conversion = _check_all(model, tmp_path,
                                   {"bn_after_pad": "Pad"})
    assert conversion.swapped == ["bn_after_pad", "bn_a"]


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
    assert report.relative_diff <= 1e-5


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
    conversion = rc.convert_plan(loaded)
    converted = rc.convert(loaded)
    assert conversion.swapped == ["bn1", "bn2"]
    converted.save(tmp_path / "c.keras")
    reloaded = keras.models.load_model(tmp_path / "c.keras")
    assert max_rel_diff(expected, reloaded(x, training=False)) <= 1e-6
    assert sorted(rc.fold_plan(converted).folded) == ["bn1", "bn2"]
    folded = rc.fold(converted)
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
    from renorm_convert.onnx.exporters import unique_names

    assert unique_names(["a", "a", "b", "a_1", "a"]) == [
        "a", "a_2", "b", "a_1", "a_3"]


@keras.saving.register_keras_serializable(package="tests")
class ConvBN(keras.layers.Layer):
    """A block as model-zoo libraries write it: sublayers made in __init__,
    a config of constructor arguments only."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same",
                                        use_bias=False)
        self.bn = keras.layers.BatchNormalization()

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.bn.build(self.conv.compute_output_shape(input_shape))

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="tests")
class Stage(keras.layers.Layer):
    """Blocks in a list, one level deeper."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.blocks = [ConvBN(filters), ConvBN(filters)]

    def call(self, x, training=None):
        for block in self.blocks:
            x = block(x, training=training)
        return x

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def blocks_model():
    inputs = keras.Input((8, 8, 3), name="img")
    x = ConvBN(4, name="block")(inputs)
    x = Stage(4, name="stage")(x)
    x = keras.layers.Conv2D(4, 1, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_custom_blocks_owning_normalization(tmp_path):
    model = blocks_model()
    n_norm = 4
    converted, report, conversion = _check_all(model, tmp_path,
                                   (n_norm - 1, "inside custom layer"))
    assert len(conversion.swapped) == n_norm
    block = converted.get_layer("block")
    assert isinstance(block.bn, rc.BatchRenormalization)  # attribute access
    assert isinstance(converted.get_layer("stage").blocks[1].bn,
                      rc.BatchRenormalization)
    # Every normalization layer is folded or listed with its reason.
    assert report.folded == 1 and len(report.unfolded) == n_norm - 1
    assert all("inside custom layer" in r for r in report.unfolded.values())
    onnx_model = onnx.load(str(tmp_path / "c.onnx"))
    assert not any(n.op_type == "BatchNormalization"
                   for n in onnx_model.graph.node)
    # Revert puts plain BatchNormalization back, and the block unwrapped.
    reverted = rc.revert(converted)
    assert type(reverted.get_layer("block")) is ConvBN
    assert type(reverted.get_layer("block").bn) is keras.layers.BatchNormalization


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unconverted_blocks_fold_to_channel_affine():
    model = blocks_model()
    randomize_statistics(model, seed=5)
    plan = rc.fold_plan(model)
    assert plan.folded == ["bn"]
    assert len(plan.unfolded) == 3
    assert sum(p.startswith("stage/") for p in plan.unfolded) == 2
    folded = rc.fold(model, plan)
    layers = list(rc.iter_layers(folded))
    assert not any(isinstance(l, keras.layers.BatchNormalization)
                   for l in layers)
    assert sum(isinstance(l, rc.ChannelAffine) for l in layers) == 3
    x = sample_inputs(model)
    assert max_rel_diff(model(x, training=False), folded(x)) <= 1e-5


def test_grouped_convolutions_export_with_group_attribute(tmp_path):
    inputs = keras.Input((8, 8, 4), name="img")
    x = keras.layers.Conv2D(8, 3, groups=2, name="gconv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(8, 3, groups=4, use_bias=False, padding="same",
                            name="gconv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    model = keras.Model(inputs, x)
    randomize_statistics(model, seed=6)
    report = rc.export_onnx(rc.convert(model), tmp_path / "g.onnx")
    assert report.folded == 2
    groups = sorted(
        a.i for n in onnx.load(str(tmp_path / "g.onnx")).graph.node
        if n.op_type == "Conv" for a in n.attribute if a.name == "group")
    assert groups == [2, 4]
    x = sample_inputs(model)
    assert max_rel_diff(model(x), _onnx(tmp_path / "g.onnx", x)) <= 1e-5


@keras.saving.register_keras_serializable(package="tests")
class FunctionalNet(keras.Model):
    """A functional subclass of keras.Model, as model-zoo libraries write
    backbones: the graph is built in __init__ and handed to keras.Model."""

    def __init__(self, width=4, **kwargs):
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(width, 3, name="stem")(inputs)
        x = keras.layers.BatchNormalization(name="stem_bn")(x)
        x = keras.layers.ReLU()(x)
        head = keras.layers.GlobalAveragePooling2D()(x)
        super().__init__(inputs, {"features": x, "pooled": head}, **kwargs)
        self.width = width

    def get_config(self):
        return {"width": self.width, "name": self.name}


def test_functional_subclass_with_dict_outputs(tmp_path):
    model = FunctionalNet(name="backbone")
    randomize_statistics(model, seed=1)
    x = sample_inputs(model, batch=3)
    expected = model(x, training=False)
    assert set(expected) == {"features", "pooled"}
    conversion = rc.convert_plan(model)
    converted = rc.convert(model)
    assert conversion.swapped == ["stem_bn"]
    for got in (converted(x, training=False), rc.revert(converted)(x),
                rc.fold(converted)(x)):
        assert set(got) == {"features", "pooled"}
        for key in expected:
            assert max_rel_diff(expected[key], got[key]) <= 1e-5
    converted.save(tmp_path / "c.keras")
    loaded = keras.models.load_model(tmp_path / "c.keras")
    assert isinstance(loaded.get_layer("stem_bn"), rc.BatchRenormalization)
    got = loaded(x, training=False)
    for key in expected:
        assert max_rel_diff(expected[key], got[key]) <= 1e-6
    rc.export_onnx(converted, tmp_path / "c.onnx")
    # The ONNX outputs carry the dict's keys.
    import onnx

    names = [o.name for o in onnx.load(str(tmp_path / "c.onnx")).graph.output]
    assert sorted(names) == ["features", "pooled"]
    got = dict(zip(names, run_onnx(tmp_path / "c.onnx", x)))
    for key in expected:
        assert max_rel_diff(expected[key], got[key]) <= 1e-5


def _channel_mean(t):
    """A module-level helper a Keras 2 Lambda calls, as model-zoo libraries
    of the tf.keras years wrote them (`Lambda(expand_dims)`)."""
    return tf.expand_dims(tf.reduce_mean(t, axis=-1), -1)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_keras2_h5_from_model_zoo_libraries(tmp_path):
    """What Keras 2 wrote and Keras 3 refuses: `groups` in a
    DepthwiseConv2D's config, efficientnet's FixedDropout saved by name, a
    Lambda (saved as code) calling a helper of its module."""
    import tf_keras

    @tf_keras.utils.register_keras_serializable(package="efficientnet")
    class FixedDropout(tf_keras.layers.Dropout):
        pass

    layers = tf_keras.layers
    inputs = tf_keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False,
                               name="dw")(inputs)
    x = layers.BatchNormalization(name="dw_bn")(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(4, 1, use_bias=False, name="pw")(x)
    x = layers.BatchNormalization(name="pw_bn")(x)
    gate = layers.Lambda(lambda t: tf.sigmoid(_channel_mean(t)),
                         name="gate")(x)
    x = layers.Multiply()([x, gate])
    x = FixedDropout(0.2, noise_shape=(None, 1, 1, 1), name="drop")(x)
    old = tf_keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    assert old.get_layer("dw").get_config()["groups"] == 1
    rng = np.random.default_rng(0)
    for name in ("dw_bn", "pw_bn"):
        layer = old.get_layer(name)
        layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32")
                           for w in layer.get_weights()])
    path = tmp_path / "zoo.h5"
    old.save(path)
    x = rng.normal(size=(3, 8, 8, 3)).astype("float32")
    expected = old.predict(x, verbose=0)

    # Keras 3 itself refuses the file.
    with pytest.raises(Exception, match="groups"):
        keras.models.load_model(path, compile=False, safe_mode=False)
    # Safe mode still refuses the Lambda's code, in one line.
    with pytest.raises(rc.RenormConvertError, match="Lambda"):
        load(path)
    loaded = load(path, safe_mode=False)
    assert type(loaded.get_layer("drop")) is keras.layers.Dropout
    assert max_rel_diff(expected, loaded(x)) <= 1e-6
    conversion = rc.convert_plan(loaded)
    converted = rc.convert(loaded)
    assert sorted(conversion.swapped) == ["dw_bn", "pw_bn"]
    assert max_rel_diff(expected, converted(x, training=False)) <= 1e-6
    assert max_rel_diff(expected, rc.revert(converted)(x)) <= 1e-6
    plan = rc.fold_plan(converted)
    assert sorted(plan.folded) == ["dw_bn", "pw_bn"]
    assert max_rel_diff(expected, rc.fold(converted, plan)(x)) <= 1e-5
    report = rc.export_onnx(converted, tmp_path / "zoo.onnx")
    assert report.folded == 2
    assert max_rel_diff(expected, _onnx(tmp_path / "zoo.onnx", x)) <= 1e-5
    # The converted model as a .keras file (convert's output, the input of
    # finetune and export) loads again: the Lambda's code runs with its
    # module's globals, which Keras 3 alone does not give it.
    converted.save(tmp_path / "zoo.keras")
    with pytest.raises(Exception, match="Lambda"):  # NameError within
        keras.models.load_model(tmp_path / "zoo.keras", safe_mode=False)
    again = load(tmp_path / "zoo.keras", safe_mode=False)
    assert max_rel_diff(expected, again(x, training=False)) <= 1e-6
    assert max_rel_diff(expected, rc.fold(again)(x)) <= 1e-5
    with pytest.raises(rc.RenormConvertError, match="Lambda"):
        load(tmp_path / "zoo.keras")
