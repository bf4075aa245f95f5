"""The surgery transforms on every backend: replace_head keeps what follows
the classifier and refuses, naming what it found, what it cannot replace;
freeze_all_but_normalization and unfreeze are a pair. (configure and
recast: tests/test_finetune.py and tests/test_convert.py.)"""

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import conv_classifier, numpy, small_cnn, weights


def _feature_model(model, layer_name):
    return keras.Model(model.inputs, model.get_layer(layer_name).output)


@pytest.mark.parametrize("kind", ["conv", "dense_then_softmax", "mobilenet"])
def test_replace_head_keeps_what_follows_the_classifier(kind):
    if kind == "conv":
        model, features = conv_classifier(), "dropout"
    elif kind == "dense_then_softmax":
        inputs = keras.Input((6,))
        x = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
        x = keras.layers.Dense(3, name="logits")(x)
        model = keras.Model(inputs, keras.layers.Softmax()(x))
        features = "hidden"
    else:
        model = keras.applications.MobileNet(
            weights=None, input_shape=(32, 32, 3), alpha=0.25, classes=4)
        features = "dropout"
    x = np.random.default_rng(0).uniform(
        0, 1, (5,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    new = rc.replace_head(model, 7)
    assert new.outputs[0].shape[-1] == 7
    # A transform: the new model shares no layer (no weight) with its input.
    old_ids = {id(layer) for layer in rc.iter_layers(model)}
    assert not old_ids & {id(layer) for layer in rc.iter_layers(new)}
    # What precedes the classifier is the same layers, what follows is the
    # same kinds of layer; the softmax still normalizes.
    np.testing.assert_array_equal(numpy(_feature_model(new, features)(x)),
                                  numpy(_feature_model(model, features)(x)))
    old_tail = [type(l) for l in model.layers[-3:]]
    assert [type(l) for l in new.layers[-3:]] == old_tail
    y = numpy(new(x))
    assert y.shape == (5, 7)
    np.testing.assert_allclose(y.sum(axis=-1), 1, rtol=1e-5)


@pytest.mark.parametrize("ending, found", [
    ("bn", "BatchNormalization 'last_bn'"),
    ("two_outputs", "2 outputs"),
    ("grouped", "Conv2D 'grouped' after 'gap'"),
])
def test_replace_head_refuses_naming_what_it_found(ending, found):
    from renorm_convert.cli import one_line

    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 1)(inputs)
    if ending == "bn":
        outputs = keras.layers.BatchNormalization(name="last_bn")(x)
    elif ending == "two_outputs":
        outputs = [x, keras.layers.ReLU()(x)]
    else:
        x = keras.layers.Conv2D(4, 1, groups=2, name="grouped")(x)
        outputs = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, outputs)
    with pytest.raises(rc.RenormConvertError,
                       match="a head of 3 classes") as info:
        rc.replace_head(model, 3)
    assert found in str(info.value)
    assert str(info.value).startswith("num_classes=3: ")
    # The command line names its flag.
    assert one_line(info.value, "finetune").startswith("--head 3: ")


def test_freeze_and_unfreeze_are_a_pair_of_transforms():
    model = rc.convert(small_cnn())
    frozen = rc.freeze_all_but_normalization(model)
    assert all(layer.trainable for layer in rc.iter_layers(model))
    norms = [layer for layer in rc.iter_layers(frozen)
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 2
    # gamma and beta of the two normalization layers, nothing else.
    assert len(frozen.trainable_weights) == 4
    assert {id(v) for v in frozen.trainable_weights} == {
        id(v) for layer in norms for v in layer.trainable_weights}
    thawed = rc.unfreeze(frozen)
    assert len(thawed.trainable_weights) == len(model.trainable_weights)
    assert len(frozen.trainable_weights) == 4
    for a, b in zip(weights(thawed), weights(model)):
        np.testing.assert_array_equal(a, b)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(rc.RenormConvertError, match="no normalization layer"):
        rc.freeze_all_but_normalization(plain)
