"""fine_tune and data on small real slices of Fashion-MNIST and digits."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import renorm_convert as rc
from renorm_convert import data
from renorm_convert.finetune import accuracy


@pytest.fixture(scope="module")
def fashion():
    if not os.path.isdir(data.FASHION_MNIST_DIR) and not os.environ.get("CI"):
        pytest.skip("Debian's dataset-fashion-mnist is not installed "
                    "(`sudo apt-get install dataset-fashion-mnist`)")
    return data.load_fashion_mnist()


@pytest.fixture
def small(fashion):
    return fashion.subset(train=1536, val=500, seed=1)


def small_cnn(num_classes=10, synchronized=False):
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(synchronized=synchronized)(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_fashion_mnist_is_the_real_dataset(fashion):
    assert fashion.x_train.shape == (60000, 28, 28, 1)
    assert fashion.x_val.shape == (10000, 28, 28, 1)
    assert np.bincount(fashion.y_train).tolist() == [6000] * 10
    assert fashion.x_train.dtype == np.uint8 and fashion.x_train.max() == 255


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(data.DataError, match="apt-get install "
                       "dataset-fashion-mnist"):
        data.load_fashion_mnist(str(tmp_path))


def test_other_sources(tmp_path):
    digits = data.load_source("digits")
    assert digits.num_classes == 10 and digits.x_train.shape[1:] == (8, 8, 1)
    assert len(digits.y_train) + len(digits.y_val) == 1797
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (50, 12, 12)),
             y=rng.integers(0, 3, 50))
    npz = data.load_source(str(tmp_path / "d.npz"))
    assert npz.x_train.shape[1:] == (12, 12, 1) and len(npz.y_val) == 10
    for label in ("cat", "dog"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(3):
            image = tf.cast(tf.fill((10, 10, 3), 40 * i), tf.uint8)
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    images = data.load_source(str(tmp_path / "images"))
    assert images.num_classes == 2
    assert len(images.y_train) + len(images.y_val) == 6
    with pytest.raises(data.DataError, match="unknown data source"):
        data.load_source("imagenet")


def test_adapt_grey_28_to_inception_75x75x3():
    grey = np.full((2, 28, 28, 1), 51, np.uint8)
    grey[1] = 255
    x = data.adapt(grey, (75, 75, 3), scaling="symmetric").numpy()
    assert x.shape == (2, 75, 75, 3)
    np.testing.assert_allclose(x[0], 51 / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(x[1], 1.0, atol=1e-6)
    colour = np.zeros((1, 8, 8, 3), np.float32)
    colour[..., 0] = 16
    back = data.adapt(colour, (8, 8, 1), value_range=16).numpy()
    np.testing.assert_allclose(back, 1 / 3, atol=1e-6)


def test_non_iid_batches_hold_k_classes():
    labels = np.repeat(np.arange(10), 100)
    idx = data.epoch_indices(labels, 32, seed=3, epoch=0, non_iid_classes=2)
    assert len(idx) == (1000 // 32) * 32
    for batch in idx.reshape(-1, 32):
        counts = np.bincount(labels[batch], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [16, 16]
    again = data.epoch_indices(labels, 32, seed=3, epoch=0, non_iid_classes=2)
    np.testing.assert_array_equal(idx, again)
    other = data.epoch_indices(labels, 32, seed=3, epoch=1, non_iid_classes=2)
    assert not np.array_equal(idx, other)
    iid = data.epoch_indices(labels, 32, seed=3, epoch=0)
    assert len(set(iid.tolist())) == len(iid)


def test_fine_tune_raises_accuracy_and_runs_the_schedule(small, tmp_path):
    model = rc.convert(small_cnn())
    before = accuracy(model, small)
    history = rc.fine_tune(model, small, epochs=3, batch_size=32,
                           microbatch_size=4, momentum=0.9,
                           learning_rate=5e-3,
                           history_path=tmp_path / "h",
                           plot=tmp_path / "curves.png", verbose=0,
                           gradient_report_path=tmp_path / "grads.json")
    after = accuracy(history.trained_model, small)
    assert after > before + 0.2, (before, after)
    steps = history.steps
    assert len(steps) == 3 * (1536 // 32)
    assert (steps[0]["r_max"], steps[0]["d_max"]) == (1.0, 0.0)
    assert (steps[-1]["r_max"], steps[-1]["d_max"]) == (3.0, 5.0)
    layers = rc.schedule.renorm_layers(history.trained_model)
    assert all(l.microbatch_size == 4 and l.r_max == 3.0 for l in layers)
    # The input model was not touched.
    assert all(l.microbatch_size is None for l in
               rc.schedule.renorm_layers(model))
    with open(tmp_path / "h.json") as f:
        saved = json.load(f)
    assert len(saved["steps"]) == len(steps)
    assert saved["epochs"][-1]["val_accuracy"] == pytest.approx(
        history.history["val_accuracy"][-1])
    assert (tmp_path / "h.csv").read_text().startswith("epoch,")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "grads.json").read_text())
    assert set(report["summary"]) == {"normalization", "other"}
    assert all(v > 0 for v in report["summary"].values())


def test_resume_after_interruption_ends_at_the_same_step(small, tmp_path):
    model = rc.convert(small_cnn())
    part = small.subset(train=320, val=64)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                raise KeyboardInterrupt("killed after one epoch")

    kwargs = dict(epochs=3, batch_size=32, verbose=0, seed=4)
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        rc.fine_tune(model, part, checkpoint_dir=ckpt,
                     callbacks=[Interrupt()], **kwargs)
    assert os.path.exists(os.path.join(ckpt, "epoch-0001.json"))
    said = []
    resumed = rc.fine_tune(model, part, checkpoint_dir=ckpt,
                           progress=said.append, **kwargs)
    straight = rc.fine_tune(model, part, **kwargs)
    assert said == [f"resuming from epoch 1, step 10 (checkpoint in {ckpt})"]
    assert resumed.resumed_from == (1, 10)
    # The history covers the whole run, epoch 1 from the checkpoint.
    assert len(resumed.history["loss"]) == 3
    assert len(resumed.steps) == 30
    np.testing.assert_allclose(resumed.history["loss"],
                               straight.history["loss"], rtol=1e-5)
    steps = int(straight.trained_model.optimizer.iterations.numpy())
    assert steps == 3 * 10
    assert int(resumed.trained_model.optimizer.iterations.numpy()) == steps
    # Same data in the same order and the same optimizer state: the same
    # weights, to float round-off.
    for a, b in zip(resumed.trained_model.weights,
                    straight.trained_model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4,
                                   atol=1e-5)


def test_mirrored_two_replicas_agree(small, mirrored):
    strategy = mirrored
    model = rc.convert(small_cnn(synchronized=True))
    part = small.subset(train=256, val=64)
    history = rc.fine_tune(model, part, epochs=1, batch_size=32,
                           strategy=strategy, verbose=0)
    trained = history.trained_model
    assert int(trained.optimizer.iterations.numpy()) == 8
    checked = 0
    for v in trained.weights:
        values = getattr(v.value, "values", None)
        if values is None:
            continue
        first = values[0].numpy()
        for other in values[1:]:
            np.testing.assert_array_equal(first, other.numpy())
        checked += 1
    assert checked == len(trained.weights)


def test_non_finite_loss_stops_and_keeps_the_last_good_model(small):
    model = rc.convert(small_cnn())
    start = [v.numpy() for v in model.weights]
    with pytest.raises(rc.NonFiniteLoss, match="NaN or infinite") as info:
        rc.fine_tune(model, small.subset(train=320), epochs=1, batch_size=32,
                     optimizer="sgd", learning_rate=1e12, verbose=0)
    kept = info.value.model
    for a, b in zip(kept.weights, start):
        np.testing.assert_array_equal(a.numpy(), b)


def test_head_train_only_norm_and_mixed_precision(small):
    model = rc.convert(small_cnn(num_classes=4))
    history = rc.fine_tune(model, small.subset(train=256, val=64), epochs=1,
                           batch_size=32, head=10, train_only="norm",
                           mixed_precision="bfloat16", verbose=0)
    trained = history.trained_model
    assert trained.outputs[0].shape[-1] == 10
    trainable = {v.path.split("/")[-1] for v in trained.trainable_weights}
    assert trainable == {"gamma", "beta"}
    frozen = [l for l in trained.layers if isinstance(l, keras.layers.Conv2D)]
    for layer in frozen:
        original = model.get_layer(layer.name)
        np.testing.assert_array_equal(layer.kernel.numpy(),
                                      original.kernel.numpy())
    norm = rc.schedule.renorm_layers(trained)[0]
    assert norm.compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in norm.variables)


def test_labels_beyond_the_head(small):
    model = rc.convert(small_cnn(num_classes=4))
    with pytest.raises(rc.FineTuneError, match="head=10"):
        rc.fine_tune(model, small, epochs=1, verbose=0)


def test_non_iid_batch_size_must_divide(small):
    with pytest.raises(data.DataError, match="multiple"):
        data.check_batching(small, 30, non_iid_classes=4)


def test_multi_worker_two_processes(tmp_path):
    """Two workers on 127.0.0.1 in a private network namespace (the gRPC
    server listens on every interface), bounded in time."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -n` (a private network namespace)")
    worker = os.path.join(os.path.dirname(__file__), "multiworker_worker.py")
    outs = [tmp_path / f"w{i}.npz" for i in range(2)]
    ckpt = tmp_path / "ckpt"
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    py = sys.executable
    script = (
        "ip link set lo up && "
        f"({py} {worker} 0 23456 23457 {outs[0]} {ckpt} > {logs[0]} 2>&1 &)"
        f" && {py} {worker} 1 23456 23457 {outs[1]} {ckpt} > {logs[1]} 2>&1; "
        "for i in $(seq 60); do [ -f " + str(outs[0]) + " ] && break; "
        "sleep 1; done"
    )
    result = subprocess.run(["timeout", "240", "unshare", "-n", "bash", "-c",
                             script], capture_output=True, text=True)
    detail = "\n".join(l.read_text()[-2000:] for l in logs if l.exists())
    assert result.returncode == 0 and all(o.exists() for o in outs), detail
    w0, w1 = (np.load(o) for o in outs)
    assert int(w0["steps"]) == int(w1["steps"]) > 0
    names = [k for k in w0.files if k.startswith("arr_")]
    assert len(names) > 5
    for k in names:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    assert int(w0["steps"]) == 2 * (256 // 32)
    assert np.isfinite(float(w0["loss"]))
    # The chief checkpoints into the directory, the other worker into its
    # own sub-directory; both are ours and kept until the caller removes
    # them.
    for folder in (ckpt, ckpt / "worker-1"):
        names = set(os.listdir(folder))
        assert {".renorm-convert-checkpoint", "epoch-0002.json",
                "epoch-0002.weights.h5"} <= names, names
    rc.checkpoint.remove(ckpt)
    assert not ckpt.exists()


def test_xla_non_iid_rmsprop_and_tensorboard(tmp_path):
    digits = data.load_digits()
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(x)  # logits: the loss must notice
    model = rc.convert(keras.Model(inputs, outputs))
    history = rc.fine_tune(model, digits, epochs=2, batch_size=32,
                           optimizer="rmsprop", learning_rate=3e-3,
                           microbatch_size=4, non_iid_classes=2,
                           jit_compile=True, momentum=0.9, verbose=0,
                           tensorboard_dir=tmp_path / "tb")
    trained = history.trained_model
    assert trained.jit_compile
    assert isinstance(trained.optimizer, keras.optimizers.RMSprop)
    assert trained.loss.get_config()["from_logits"]
    assert len(history.steps) == 2 * (len(digits.y_train) // 32)
    assert np.isfinite(history.history["loss"]).all()
    events = [f for _, _, files in os.walk(tmp_path / "tb") for f in files
              if f.startswith("events.out")]
    assert events


def conv_classifier(classes=4, shape=(12, 12, 3)):
    """A Keras 2 style classifier (SqueezeNet, mini-Xception): the classes
    come from a 1x1 Conv, then pooling and softmax."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.Conv2D(classes, 1, name="classes")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Activation("softmax")(x),
                       name="model_1")


def _feature_model(model, layer_name):
    return keras.Model(model.inputs, model.get_layer(layer_name).output)


@pytest.mark.parametrize("kind", ["conv", "dense_then_softmax", "mobilenet"])
def test_replace_head_keeps_what_follows_the_classifier(kind):
    from renorm_convert import replace_head
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
    new = replace_head(model, 7)
    assert new.outputs[0].shape[-1] == 7
    # A transform: the new model shares no layer (no weight) with its input.
    old_ids = {id(layer) for layer in rc.iter_layers(model)}
    assert not old_ids & {id(layer) for layer in rc.iter_layers(new)}
    # What precedes the classifier is the same layers, what follows is the
    # same kinds of layer; the softmax still normalizes.
    np.testing.assert_array_equal(_feature_model(new, features)(x),
                                  _feature_model(model, features)(x))
    old_tail = [type(l) for l in model.layers[-3:]]
    assert [type(l) for l in new.layers[-3:]] == old_tail
    y = new(x).numpy()
    assert y.shape == (5, 7)
    np.testing.assert_allclose(y.sum(axis=-1), 1, rtol=1e-5)


@pytest.mark.parametrize("ending, found", [
    ("bn", "BatchNormalization 'last_bn'"),
    ("two_outputs", "2 outputs"),
    ("grouped", "Conv2D 'grouped' after 'gap'"),
])
def test_replace_head_refuses_naming_what_it_found(ending, found):
    from renorm_convert import replace_head
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
    with pytest.raises(rc.ConversionError, match="a head of 3 classes") as info:
        replace_head(model, 3)
    assert found in str(info.value)
    # Through fine_tune, the message names fine_tune's argument.
    with pytest.raises(rc.FineTuneError, match="^head=3: ") as info:
        rc.fine_tune(model, tf.data.Dataset.from_tensors(
            (np.zeros((1, 8, 8, 4), "float32"), np.zeros((1,), "int64"))),
            head=3, verbose=0)
    assert found in str(info.value)


def test_finetune_head_on_conv_classifier(small):
    model = rc.convert(conv_classifier(classes=4, shape=(28, 28, 1)))
    history = rc.fine_tune(model, small.subset(train=64, val=32), epochs=1, batch_size=32, head=10,
                           verbose=0)
    trained = history.trained_model
    assert trained.outputs[0].shape[-1] == 10
    assert trained.get_layer("classes_head10").filters == 10


def test_validation_curve_starts_at_the_model_as_given(small, tmp_path):
    model = rc.convert(small_cnn())
    split = small.subset(train=320, val=400)
    history = rc.fine_tune(model, split, epochs=2, batch_size=32,
                           plot=tmp_path / "p.png", verbose=0)
    curve = history.validation_curve
    steps_per_epoch = 10
    assert [p["step"] for p in curve] == [0, 2, 5, 8, 10, 12, 15, 18, 20]
    # Step 0 is the input model on the validation examples (all 400: the
    # subset is the first 512), computed here independently.
    shape = data.model_image_shape(model)
    x = np.asarray(data.adapt(split.x_val, shape))
    expected = float((np.asarray(model(x, training=False)).argmax(-1)
                      == split.y_val).mean())
    assert history.validation_curve_size == 400
    assert curve[0]["val_accuracy"] == pytest.approx(expected, abs=1e-9)
    # The last point is the trained model on the same examples.
    trained = np.asarray(history.trained_model(x, training=False))
    assert curve[-1]["val_accuracy"] == pytest.approx(
        float((trained.argmax(-1) == split.y_val).mean()), abs=1e-9)
    assert curve[-1]["step"] == 2 * steps_per_epoch
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_steps_per_epoch_runs_the_data_on_across_epochs(small):
    """Three epochs of 5 steps are the first 15 batches of the data, as one
    epoch of 15 steps is: same weights at the end, bit for bit."""
    part = small.subset(train=320, val=64, seed=0)  # 10 batches a pass
    model = rc.convert(small_cnn())
    runs = [rc.fine_tune(model, part, epochs=e, steps_per_epoch=s,
                         batch_size=32, schedule=None, validation_curve=0,
                         verbose=0, seed=3)
            for e, s in ((3, 5), (1, 15))]
    assert [len(h.steps) for h in runs] == [15, 15]
    assert len(runs[0].history["loss"]) == 3
    for a, b in zip(runs[0].trained_model.weights,
                    runs[1].trained_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # 15 steps are more than one pass: the second pass really ran.
    assert not np.array_equal(runs[1].trained_model.weights[0].numpy(),
                              model.weights[0].numpy())


def test_copy_false_trains_the_given_model(small):
    part = small.subset(train=64, val=32, seed=0)
    model = rc.convert(small_cnn())
    before = [v.numpy().copy() for v in model.trainable_weights]
    kept = rc.fine_tune(model, part, epochs=1, batch_size=32, verbose=0)
    assert kept.trained_model is not model
    for v, b in zip(model.trainable_weights, before):
        np.testing.assert_array_equal(v.numpy(), b)
    owned = rc.fine_tune(model, part, epochs=1, batch_size=32, verbose=0,
                         copy=False)
    assert owned.trained_model is model
    # Same run, same result: the copy changes nothing but ownership.
    for a, b in zip(kept.trained_model.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


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
    for a, b in zip(thawed.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_library_errors_name_arguments_and_the_command_line_flags(small):
    from renorm_convert.cli import as_flags

    with pytest.raises(data.DataError) as info:
        data.check_batching(small, 32, non_iid_classes=3)
    text = str(info.value)
    assert text.startswith("non_iid_classes=3: ") and "--" not in text
    assert as_flags(text).startswith("--non-iid 3: ")
    assert as_flags(text, "reproduce").startswith("--classes-per-batch 3: ")
    assert as_flags("Try another opset=, or") == "Try another --opset, or"
    assert as_flags("renorm_momentum=2") == "--renorm-momentum 2"


def test_inputs_for_prepares_images_as_training_does():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 8, 8, 1)).astype("float32")
    split = data.Split(x, np.arange(6) % 3, x[:4], np.array([2, 0, 1, 1]), 3,
                       "floats", value_range=1.0)
    model = keras.Sequential([keras.Input((16, 16, 3)),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
    images, labels = split.inputs_for(model, 3)
    assert images.shape == (3, 16, 16, 3) and labels.tolist() == [2, 0, 1]
    # Bilinear resizing keeps the mean; "unit" scaling of data whose white
    # is 1.0 leaves the values in [0, 1] (not divided by 255).
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)),
                               x[:3].mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    train, _ = split.inputs_for(model, part="train", scaling="symmetric")
    np.testing.assert_allclose(train.mean(axis=(1, 2, 3)),
                               2 * x.mean(axis=(1, 2, 3)) - 1, atol=1e-5)
    with pytest.raises(data.DataError, match="part='test'"):
        split.inputs_for(model, part="test")
