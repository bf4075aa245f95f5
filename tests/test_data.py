"""data and batches: real sources, labels, images adapted to a model, i.i.d.
and non-i.i.d. batching, each checked against NumPy; on every backend."""


import keras
import numpy as np
import pytest

import renorm_convert as rc
from renorm_convert import data
from renorm_convert.errors import RenormConvertError
from renorm_convert.data.batches import (ArrayBatches, EvaluationBatches,
                                    TrainingBatches)
from helpers import numpy


def image_model(shape=(16, 16, 3), classes=3):
    return keras.Sequential([keras.Input(shape),
                             keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(classes)])


def reference_resize(images, size):
    """Bilinear resizing with half-pixel centres, edges clamped, computed
    with np.interp one axis at a time (float64)."""
    images = np.asarray(images, np.float64)

    def along(x, axis, n_out):
        n_in = x.shape[axis]
        where = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        moved = np.moveaxis(x, axis, -1)
        out = np.apply_along_axis(
            lambda row: np.interp(where, np.arange(n_in), row), -1, moved)
        return np.moveaxis(out, -1, axis)

    return along(along(images, 1, size[0]), 2, size[1])


# --- sources ---------------------------------------------------------------


def test_fashion_mnist_is_the_real_dataset(fashion):
    assert fashion.x_train.shape == (60000, 28, 28, 1)
    assert fashion.x_val.shape == (10000, 28, 28, 1)
    assert np.bincount(fashion.y_train).tolist() == [6000] * 10
    assert np.bincount(fashion.y_val).tolist() == [1000] * 10
    assert fashion.x_train.dtype == np.uint8 and fashion.x_train.max() == 255
    assert fashion.num_classes == 10 and fashion.value_range == 255.0


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(RenormConvertError, match="apt-get install "
                       "dataset-fashion-mnist"):
        data.load_fashion_mnist(str(tmp_path))
    with pytest.raises(RenormConvertError, match="no such directory"):
        data.load_source(f"fashion-mnist:{tmp_path / 'nowhere'}")


def test_digits_are_sklearns_split_deterministically():
    from sklearn.datasets import load_digits

    digits = data.load_source("digits")
    reference = load_digits()
    assert digits.num_classes == 10 and digits.x_train.shape[1:] == (8, 8, 1)
    assert len(digits.y_train) + len(digits.y_val) == 1797
    assert len(digits.y_val) == int(1797 * 0.2)
    assert digits.value_range == 16.0
    # Train and validation together are exactly sklearn's images, each once
    # and with its own label.
    both = np.concatenate([digits.x_train, digits.x_val])[..., 0]
    labels = np.concatenate([digits.y_train, digits.y_val])
    pairs = sorted((im.astype(np.float64).tobytes(), int(c))
                   for im, c in zip(both, labels))
    assert pairs == sorted((im.tobytes(), int(c)) for im, c in zip(
        reference.images, reference.target))
    again = data.load_digits()
    np.testing.assert_array_equal(again.y_val, digits.y_val)


def test_npz_with_class_ids_and_with_a_validation_part(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (50, 12, 12)).astype(np.uint8)
    y = rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    npz = data.load_source(str(tmp_path / "d.npz"))
    assert npz.x_train.shape == (40, 12, 12, 1) and len(npz.y_val) == 10
    assert npz.num_classes == int(y.max()) + 1 and npz.value_range == 255.0
    # The split is a permutation of the examples: every (image, label) pair
    # is kept.
    got = sorted((im.tobytes(), int(c)) for im, c in zip(
        np.concatenate([npz.x_train, npz.x_val])[..., 0],
        np.concatenate([npz.y_train, npz.y_val])))
    assert got == sorted((im.tobytes(), int(c)) for im, c in zip(x, y))
    np.savez(tmp_path / "v.npz", x=x[:30], y=y[:30], x_val=x[30:],
             y_val=y[30:])
    given = data.load_source(f"npz:{tmp_path / 'v.npz'}")
    np.testing.assert_array_equal(given.x_val[..., 0], x[30:])
    np.testing.assert_array_equal(given.y_train, y[:30])
    floats = x.astype(np.float32) / 255
    np.savez(tmp_path / "f.npz", x=floats, y=y)
    assert data.load_npz(str(tmp_path / "f.npz")).value_range == 1.0


def test_npz_with_one_hot_labels_keeps_rows(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 4, 40)
    one_hot = np.eye(5, dtype=np.float32)[ids]  # class 4 never occurs
    np.savez(tmp_path / "h.npz", x=rng.normal(size=(40, 6, 6, 3)), y=one_hot)
    split = data.load_npz(str(tmp_path / "h.npz"))
    # The classes are the columns, not the largest id + 1.
    assert split.num_classes == 5
    assert split.y_train.shape == (32, 5) and split.y_train.dtype == np.float32
    np.testing.assert_array_equal(
        np.sort(np.concatenate([data.class_ids(split.y_train),
                                data.class_ids(split.y_val)])), np.sort(ids))


def test_npz_refusals_name_the_problem(tmp_path):
    np.savez(tmp_path / "noy.npz", x=np.zeros((4, 3, 3)))
    with pytest.raises(RenormConvertError, match=r"needs arrays named `x` and "
                       r"`y`; it has \['x'\]"):
        data.load_npz(str(tmp_path / "noy.npz"))
    x = np.zeros((4, 3, 3))
    x[2, 1, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(4))
    with pytest.raises(RenormConvertError, match=r"index \(2, 1, 0\)"):
        data.load_npz(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "few.npz", x=np.zeros((4, 3, 3)), y=np.arange(3))
    with pytest.raises(RenormConvertError, match=r"got x \(4, 3, 3, 1\) and y "
                       r"\(3,\)"):
        data.load_npz(str(tmp_path / "few.npz"))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(RenormConvertError, match="not a readable .npz file"):
        data.load_npz(str(tmp_path / "text.npz"))
    with pytest.raises(RenormConvertError, match="no such file"):
        data.load_source(str(tmp_path / "missing.npz"))


def test_image_folder_reads_pixels_and_classes(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    written = {}
    for label in ("cat", "dog"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (10, 10, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            written[pixels.tobytes()] = label
    (tmp_path / "images" / "cat" / "notes.txt").write_text("ignored")
    images = data.load_source(str(tmp_path / "images"))
    assert images.num_classes == 2 and images.name == "images"
    xs = np.concatenate([images.x_train, images.x_val])
    ys = np.concatenate([images.y_train, images.y_val])
    assert len(ys) == 6 and xs.dtype == np.uint8
    # PNG is lossless: every image comes back bit for bit, with its
    # folder's class (in sorted order: cat 0, dog 1).
    assert {x.tobytes(): ("cat", "dog")[c] for x, c in zip(xs, ys)} == written


def test_image_folder_resizes_to_the_first_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    big = rng.integers(0, 255, (20, 16, 3)).astype(np.uint8)
    for label, pixels in (("a", np.zeros((10, 8, 3), np.uint8)), ("b", big)):
        (tmp_path / label).mkdir()
        Image.fromarray(pixels).save(tmp_path / label / "0.png")
    split = data.load_image_folder(str(tmp_path), val_fraction=0.01, seed=0)
    xs = np.concatenate([split.x_train, split.x_val])
    ys = np.concatenate([split.y_train, split.y_val])
    assert xs.shape == (2, 10, 8, 3)
    expected = np.clip(np.rint(reference_resize(big[None], (10, 8))[0]), 0,
                       255)
    np.testing.assert_allclose(xs[ys == 1][0], expected, atol=1)


def test_unreadable_image_and_unknown_sources(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(RenormConvertError, match="broken.png: not a readable "
                       "image"):
        data.load_source(str(tmp_path))
    with pytest.raises(RenormConvertError, match="unknown data source"):
        data.load_source("imagenet")
    with pytest.raises(RenormConvertError, match="no data source given"):
        data.check_source(None)
    assert data.source_path("npz:/x/y.npz") == "/x/y.npz"
    assert data.source_path("digits") is None


# --- labels ----------------------------------------------------------------


def test_check_labels_takes_ids_one_hot_and_soft_rows():
    ids = data.check_labels("t", "y", np.array([0, 2, 1], np.uint8))
    assert ids.dtype == np.int64 and ids.tolist() == [0, 2, 1]
    assert data.check_labels("t", "y", np.array([0.0, 3.0])).tolist() == [0, 3]
    assert data.check_labels("t", "y", np.array([[1], [0]])).tolist() == [1, 0]
    one_hot = np.eye(4)[[3, 0, 1]]
    rows = data.check_labels("t", "y", one_hot)
    assert rows.dtype == np.float32 and rows.shape == (3, 4)
    np.testing.assert_array_equal(data.class_ids(rows), [3, 0, 1])
    soft = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(data.check_labels("t", "y", soft), soft,
                               rtol=1e-6)
    assert data.num_label_classes(rows) == 4
    assert data.num_label_classes(np.array([0, 5]), np.array([2])) == 6


def test_check_labels_refuses_multi_hot_naming_the_row():
    multi_hot = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]], np.float32)
    with pytest.raises(RenormConvertError, match=r"row 2 is not a probability "
                       r"distribution \(sum 2\); multi-label"):
        data.check_labels("f.npz", "y", multi_hot)
    negative = np.array([[1.5, -0.5], [0.0, 1.0]])
    with pytest.raises(RenormConvertError, match="row 0"):
        data.check_labels("f.npz", "y", negative)
    with pytest.raises(RenormConvertError, match="not whole numbers"):
        data.check_labels("f.npz", "y", np.array([0.5, 1.0]))
    with pytest.raises(RenormConvertError, match=">= 0"):
        data.check_labels("f.npz", "y", np.array([0, -1]))
    with pytest.raises(RenormConvertError, match="<U1 values"):
        data.check_labels("f.npz", "y", np.array(["a", "b"]))
    with pytest.raises(RenormConvertError, match=r"got \(2, 2, 2\)"):
        data.check_labels("f.npz", "y", np.zeros((2, 2, 2)))


def test_multi_hot_npz_is_refused_on_loading(tmp_path):
    y = np.zeros((10, 3), np.float32)
    y[:, 0] = 1
    y[4, 2] = 1
    np.savez(tmp_path / "m.npz", x=np.zeros((10, 4, 4)), y=y)
    with pytest.raises(RenormConvertError, match="row 4 .* multi-label targets "
                       "are not supported"):
        data.load_source(str(tmp_path / "m.npz"))


# --- adapting images --------------------------------------------------------


@pytest.mark.parametrize("size", [(75, 75), (5, 7), (28, 28), (13, 40)])
def test_resize_bilinear_matches_numpy_and_keras(size):
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 255, (2, 28, 28, 3)).astype(np.float32)
    got = data.resize_bilinear(images, size)
    assert got.shape == (2,) + size + (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_resize(images, size),
                               rtol=1e-5, atol=1e-3)
    # The backend's own bilinear resize (no antialiasing) agrees.
    keras_resized = numpy(keras.ops.image.resize(
        images, size, interpolation="bilinear", antialias=False))
    np.testing.assert_allclose(got, keras_resized, rtol=1e-4, atol=1e-2)


def test_adapt_grey_28_to_inception_75x75x3():
    grey = np.full((2, 28, 28, 1), 51, np.uint8)
    grey[1] = 255
    x = data.adapt(grey, (75, 75, 3), scaling="symmetric")
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    assert x.shape == (2, 75, 75, 3)
    np.testing.assert_allclose(x[0], 51 / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(x[1], 1.0, atol=1e-6)
    colour = np.zeros((1, 8, 8, 3), np.float32)
    colour[..., 0] = 16
    back = data.adapt(colour, (8, 8, 1), value_range=16)
    np.testing.assert_allclose(back, 1 / 3, atol=1e-6)


def test_adapt_matches_numpy_for_each_scaling():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 17, (3, 8, 8, 1)).astype(np.float32)  # digits-like
    resized = reference_resize(x * 255 / 16, (12, 10))
    for scaling, expected in (("unit", resized / 255),
                              ("symmetric", resized / 127.5 - 1),
                              ("raw", resized)):
        got = data.adapt(x, (12, 10, 3), value_range=16.0, scaling=scaling)
        np.testing.assert_allclose(got, np.repeat(expected, 3, axis=-1),
                                   rtol=1e-5, atol=1e-4)
    with pytest.raises(RenormConvertError, match="scaling='bad': use one of"):
        data.adapt(x, (8, 8, 1), scaling="bad")
    with pytest.raises(RenormConvertError, match="2-channel images"):
        data.adapt(np.zeros((1, 4, 4, 2)), (4, 4, 3))


def test_inputs_for_prepares_images_as_training_does():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 8, 8, 1)).astype("float32")
    split = data.Split(x, np.arange(6) % 3, x[:4], np.array([2, 0, 1, 1]), 3,
                       "floats", value_range=1.0)
    model = image_model()
    images, labels = split.inputs_for(model, 3)
    assert images.shape == (3, 16, 16, 3) and labels.tolist() == [2, 0, 1]
    # Bilinear resizing of a whole image keeps its mean; "unit" scaling of
    # data whose white is 1.0 leaves the values in [0, 1].
    np.testing.assert_allclose(images, np.repeat(
        reference_resize(x[:3], (16, 16)), 3, axis=-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)),
                               x[:3].mean(axis=(1, 2, 3)), rtol=1e-5)
    train, _ = split.with_scaling("symmetric").inputs_for(model, part="train")
    np.testing.assert_allclose(train.mean(axis=(1, 2, 3)),
                               2 * x.mean(axis=(1, 2, 3)) - 1, atol=1e-5)
    assert split.scaling == "unit"  # with_scaling made a new Split
    with pytest.raises(RenormConvertError, match="part='test'"):
        split.inputs_for(model, part="test")
    with pytest.raises(RenormConvertError, match="scaling='wide'"):
        split.with_scaling("wide")


def test_model_image_shape_refuses_what_is_not_one_image_input():
    assert data.model_image_shape(image_model((9, 7, 2))) == (9, 7, 2)
    flat = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    with pytest.raises(RenormConvertError, match="does not take one image input"):
        data.model_image_shape(flat)
    inputs = keras.Input((None, None, 3))
    free = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    with pytest.raises(RenormConvertError, match="unknown size"):
        data.model_image_shape(free)


def test_subset_is_a_seeded_sorted_sample():
    labels = np.arange(100)
    split = data.Split(labels[:, None, None, None].repeat(2, 1), labels,
                       labels[:10, None, None, None], labels[:10], 100, "n")
    part = split.subset(train=20, val=4, seed=7)
    expected = np.sort(np.random.default_rng(7).permutation(100)[:20])
    np.testing.assert_array_equal(part.y_train, expected)
    np.testing.assert_array_equal(part.x_train[:, 0, 0, 0], expected)
    assert len(part.y_val) == 4 and len(split.subset(val=50).y_val) == 10
    for bad in ({"train": 0}, {"train": 2.5}, {"val": -1}, {"seed": -1}):
        with pytest.raises(RenormConvertError, match=f"{next(iter(bad))}="):
            split.subset(**bad)


# --- batching ----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_non_iid_batches_hold_exactly_k_classes(k):
    labels = np.repeat(np.arange(10), 100)
    idx = data.epoch_indices(labels, 32, seed=3, epoch=0, non_iid_classes=k)
    assert len(idx) == (1000 // 32) * 32
    classes_seen = set()
    for batch in idx.reshape(-1, 32):
        counts = np.bincount(labels[batch], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [32 // k] * k
        assert len(set(batch.tolist())) == 32  # no example twice in a batch
        classes_seen |= set(np.flatnonzero(counts).tolist())
    assert classes_seen == set(range(10))  # the classes are drawn at random
    again = data.epoch_indices(labels, 32, seed=3, epoch=0, non_iid_classes=k)
    np.testing.assert_array_equal(idx, again)
    other = data.epoch_indices(labels, 32, seed=3, epoch=1, non_iid_classes=k)
    assert not np.array_equal(idx, other)


def test_non_iid_batches_of_a_small_class_repeat_its_examples():
    """A class with fewer examples than a batch takes from it repeats them
    (a 256-example subset of digits has classes of 15 for 16 places)."""
    labels = np.concatenate([np.zeros(5, int), np.ones(40, int),
                             np.full(40, 2)])
    idx = data.epoch_indices(labels, 16, seed=0, epoch=0, non_iid_classes=2)
    assert len(idx) == (85 // 16) * 16
    for batch in idx.reshape(-1, 16):
        counts = np.bincount(labels[batch], minlength=3)
        assert sorted(counts[counts > 0].tolist()) == [8, 8]
        if counts[0]:  # all five examples of class 0, three of them twice
            assert sorted(set(batch[labels[batch] == 0].tolist())) == \
                list(range(5))


def test_iid_batches_are_a_seeded_permutation():
    labels = np.repeat(np.arange(10), 100)
    iid = data.epoch_indices(labels, 32, seed=3, epoch=0)
    np.testing.assert_array_equal(
        iid, np.random.default_rng([3, 0]).permutation(1000)[:992])
    assert len(set(iid.tolist())) == len(iid)


def test_non_iid_batches_of_one_hot_labels_follow_their_classes():
    ids = np.repeat(np.arange(6), 20)
    soft = np.full((120, 6), 0.02)
    soft[np.arange(120), ids] = 0.9
    for labels in (np.eye(6)[ids], soft):
        idx = data.epoch_indices(labels, 12, seed=0, epoch=0,
                                 non_iid_classes=3)
        np.testing.assert_array_equal(idx, data.epoch_indices(
            ids, 12, seed=0, epoch=0, non_iid_classes=3))


def test_training_batches_are_the_adapted_examples(fashion):
    split = fashion.subset(train=400, val=0, seed=2).with_scaling("symmetric")
    model = image_model((20, 20, 3), classes=10)
    batches = rc.data.training_batches(split, model, 32, non_iid_classes=4, seed=5)
    assert isinstance(batches, keras.utils.PyDataset)
    assert len(batches) == batches.num_batches == 400 // 32
    order = data.epoch_indices(split.y_train, 32, seed=5, epoch=0,
                               non_iid_classes=4)
    for i in (0, 3, len(batches) - 1):
        x, y = batches[i]
        index = order[i * 32:(i + 1) * 32]
        np.testing.assert_array_equal(y, split.y_train[index])
        expected = reference_resize(split.x_train[index].astype(np.float64),
                                    (20, 20)) / 127.5 - 1
        np.testing.assert_allclose(x, np.repeat(expected, 3, axis=-1),
                                   atol=1e-5)
        # Every batch is 4 classes of 8 examples each.
        assert sorted(np.bincount(y)[np.bincount(y) > 0].tolist()) == [8] * 4
    # `fit` moves to the next epoch: the next pass's order.
    batches.on_epoch_end()
    np.testing.assert_array_equal(batches[0][1], split.y_train[
        data.epoch_indices(split.y_train, 32, seed=5, epoch=1,
                           non_iid_classes=4)[:32]])


def test_steps_per_epoch_runs_the_data_on_and_shards_split_batches():
    digits = data.load_digits().subset(train=100, val=0)
    model = image_model((8, 8, 1), classes=10)
    whole = TrainingBatches(digits, (8, 8, 1), 20, seed=1)  # 5 a pass
    longer = TrainingBatches(digits, (8, 8, 1), 20, seed=1, steps_per_epoch=3)
    assert len(longer) == 3
    steps = []
    for epoch in range(4):
        steps += [longer[i][1] for i in range(3)]
        longer.on_epoch_end()
    # 12 steps are the first 12 batches of passes 0, 1 and 2 in turn.
    expected = [digits.y_train[data.epoch_indices(
        digits.y_train, 20, seed=1, epoch=s // 5)[(s % 5) * 20:][:20]]
        for s in range(12)]
    for got, want in zip(steps, expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(whole[4][1], expected[4])
    parts = [whole.shard(i, 4)[2] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]),
                                  whole[2][0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]),
                                  whole[2][1])
    with pytest.raises(RenormConvertError, match="batch_size=20: must be a "
                       "multiple of the 3 processes"):
        whole.shard(0, 3)
    with pytest.raises(RenormConvertError, match="steps_per_epoch=0"):
        rc.data.training_batches(digits, model, 20, steps_per_epoch=0)


def test_evaluation_batches_keep_order_and_the_last_partial_batch():
    digits = data.load_digits()
    model = image_model((8, 8, 1), classes=10)
    batches = rc.data.evaluation_batches(digits, model, batch_size=100, count=250)
    assert isinstance(batches, EvaluationBatches) and len(batches) == 3
    sizes = [len(y) for _, y in batches]
    assert sizes == [100, 100, 50]
    x = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]),
                                  digits.y_val[:250])
    np.testing.assert_allclose(x, digits.x_val[:250] / 16.0, atol=1e-6)


def test_array_batches_reshuffle_each_epoch_and_keep_pairs():
    x = np.arange(50, dtype=np.float32)[:, None]
    other = -x
    batches = ArrayBatches([x, other], np.arange(50), 10, seed=2)
    assert len(batches) == 5
    (a, b), y = batches[1]
    np.testing.assert_array_equal(a[:, 0], y)
    np.testing.assert_array_equal(b[:, 0], -y)
    np.testing.assert_array_equal(
        y, np.random.default_rng([2, 0]).permutation(50)[10:20])
    batches.on_epoch_end()
    np.testing.assert_array_equal(
        batches[1][1], np.random.default_rng([2, 1]).permutation(50)[10:20])
    fixed = ArrayBatches(x, np.arange(50), 10, shuffle=False)
    np.testing.assert_array_equal(fixed[3][1], np.arange(30, 40))
    with pytest.raises(RenormConvertError, match="49 labels for inputs of "
                       r"\[50, 50\] examples"):
        ArrayBatches([x, other], np.arange(49), 10)


def test_check_batching_names_the_argument_in_python_and_flags():
    from renorm_convert.cli import one_line

    with pytest.raises(RenormConvertError, match="multiple"):
        data.check_batching(1000, 30, non_iid_classes=4)
    with pytest.raises(RenormConvertError) as info:
        data.check_batching(1000, 32, non_iid_classes=3)
    text = str(info.value)
    assert text.startswith("non_iid_classes=3: the batch size 32 must be a "
                           "multiple of it") and "--" not in text
    assert one_line(info.value, "finetune").startswith("--non-iid 3: ")
    assert one_line(info.value, "reproduce").startswith(
        "--classes-per-batch 3: ")
    with pytest.raises(RenormConvertError, match="non_iid_classes=4: the data "
                       "has only 3 classes"):
        data.check_batching(100, 32, non_iid_classes=4, num_classes=3)
    with pytest.raises(RenormConvertError, match="batch_size=64: larger than the "
                       "50 training examples"):
        data.check_batching(50, 64)
    for bad in (0, 2.0, True):
        with pytest.raises(RenormConvertError, match="batch_size="):
            data.check_batching(50, bad)
    with pytest.raises(RenormConvertError, match="microbatch_size=33: must be "
                       "between 1 and the batch size 32"):
        data.check_batching(50, 32, microbatch_size=33)
    data.check_batching(50, 32, non_iid_classes=4, num_classes=10,
                        microbatch_size=4)
    # Splits refuse the same settings when batching.
    split = data.load_digits().subset(train=64, val=0)
    with pytest.raises(RenormConvertError, match="non_iid_classes=3"):
        rc.data.training_batches(split, image_model((8, 8, 1)), 32, non_iid_classes=3)


@pytest.mark.tensorflow
def test_as_tf_dataset_yields_the_same_batches():
    digits = data.load_digits().subset(train=90, val=0)
    batches = TrainingBatches(digits, (8, 8, 1), 30, seed=4)
    batches.epoch = 1  # resumed after one epoch
    got = list(batches.as_tf_dataset(epochs=3).as_numpy_iterator())
    assert len(got) == 6
    for step, (x, y) in enumerate(got, start=3):
        want_x, want_y = batches.batch_at(step)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
