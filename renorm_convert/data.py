"""Real datasets that need no internet, adapted to a model's input, batched
i.i.d., in microbatch-friendly order, or non-i.i.d. as in the paper.

Sources (`load_source` spec):
    fashion-mnist[:DIR]  Debian's dataset-fashion-mnist package
                         (/usr/share/datasets/fashion-mnist), or DIR
    digits               scikit-learn's bundled 8x8 digits
    npz:PATH | PATH.npz  arrays `x` (N, H, W[, C]) and `y` (N,)
    DIR                  a directory of images, one sub-directory per class
"""

import dataclasses
import gzip
import os

import numpy as np
import tensorflow as tf

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class DataError(ValueError):
    """Bad or missing data: the message says what and how to fix it."""


@dataclasses.dataclass
class Split:
    """Images (N, H, W, C) as uint8 or float, integer labels, class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    name: str
    value_range: float = 255.0  # the value that means "white"

    def subset(self, train=None, val=None, seed=0):
        """A smaller split: `train` / `val` examples drawn per class evenly
        (deterministic under `seed`)."""
        for name, n in (("train", train), ("val", val)):
            if n is not None and (isinstance(n, bool) or int(n) != n or n < 0
                                  or (name == "train" and n < 1)):
                raise DataError(f"{name}={n}: expected a number of examples "
                                f"(>= {1 if name == 'train' else 0}) or None.")
        if seed is None or int(seed) < 0:
            raise DataError(f"seed={seed}: expected an integer >= 0.")
        rng = np.random.default_rng(seed)

        def pick(x, y, n):
            if n is None or n >= len(y):
                return x, y
            idx = rng.permutation(len(y))[:n]
            idx.sort()
            return x[idx], y[idx]

        xt, yt = pick(self.x_train, self.y_train, train)
        xv, yv = pick(self.x_val, self.y_val, val)
        return dataclasses.replace(self, x_train=xt, y_train=yt, x_val=xv,
                                   y_val=yv)

    def inputs_for(self, model, count=None, *, part="val", scaling="unit"):
        """(images, labels) as NumPy arrays, the first `count` (all when
        None) of the validation (`part="val"`) or training ("train") part,
        resized and scaled as `model`'s one image input takes them: e.g.
        `export_onnx(model, path, verify=x, labels=y)`."""
        if part not in ("val", "train"):
            raise DataError(f"part={part!r}: expected 'val' or 'train'.")
        x, y = ((self.x_val, self.y_val) if part == "val"
                else (self.x_train, self.y_train))
        x, y = x[:count], y[:count]
        return (np.asarray(adapt(x, model_image_shape(model),
                                 self.value_range, scaling)), np.asarray(y))


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big")
            for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(directory=None):
    """Fashion-MNIST (60000 + 10000 28x28 grey images, 10 classes)."""
    directory = directory or FASHION_MNIST_DIR
    names = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_val": "t10k-images-idx3-ubyte.gz",
        "y_val": "t10k-labels-idx1-ubyte.gz",
    }
    missing = [n for n in names.values()
               if not os.path.exists(os.path.join(directory, n))]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {directory} (missing {missing[0]}). "
            "Install it with `sudo apt-get install dataset-fashion-mnist`, or "
            "give its directory as the source 'fashion-mnist:DIR'."
        )
    arrays = {k: _read_idx(os.path.join(directory, v))
              for k, v in names.items()}
    return Split(arrays["x_train"][..., None], arrays["y_train"].astype(
        np.int64), arrays["x_val"][..., None], arrays["y_val"].astype(
        np.int64), 10, "fashion-mnist")


def load_digits(val_fraction=0.2, seed=0):
    """scikit-learn's 1797 8x8 digits, split deterministically."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = data.images.astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(y))
    n_val = int(len(y) * val_fraction)
    val, train = idx[:n_val], idx[n_val:]
    return Split(x[train], y[train], x[val], y[val], 10, "digits",
                 value_range=16.0)


def load_npz(path, val_fraction=0.2, seed=0):
    """`x` (N, H, W[, C]) and `y` (N,) from an .npz file; also accepts
    `x_val` / `y_val`, else splits off `val_fraction`."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file.")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e}).") from None
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path}: needs arrays named `x` and `y`; it has "
                        f"{sorted(arrays)}.")
    x = _check_images(path, "x", arrays["x"])
    y = _check_labels(path, "y", arrays["y"])
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or len(x) != len(y):
        raise DataError(f"{path}: expected x of shape (N, H, W[, C]) and y of "
                        f"shape (N,); got {x.shape} and {y.shape}.")
    if "x_val" in arrays and "y_val" in arrays:
        xv = _check_images(path, "x_val", arrays["x_val"])
        xv = xv[..., None] if xv.ndim == 3 else xv
        yv = _check_labels(path, "y_val", arrays["y_val"])
        if xv.ndim != 4 or len(xv) != len(yv):
            raise DataError(f"{path}: expected x_val of shape (N, H, W[, C]) "
                            f"and y_val of shape (N,); got {xv.shape} and "
                            f"{yv.shape}.")
        xt, yt = x, y
    else:
        idx = np.random.default_rng(seed).permutation(len(y))
        n_val = max(1, int(len(y) * val_fraction))
        xt, yt, xv, yv = x[idx[n_val:]], y[idx[n_val:]], x[idx[:n_val]], y[
            idx[:n_val]]
    if (y < 0).any() or (yv < 0).any():
        raise DataError(f"{path}: labels must be >= 0.")
    vrange = 255.0 if x.dtype == np.uint8 or x.max() > 1.0 else 1.0
    return Split(xt, yt, xv, yv, int(max(y.max(), yv.max()) + 1),
                 os.path.basename(path), value_range=vrange)


def _check_images(path, name, x):
    if x.dtype.kind not in "uif":
        raise DataError(f"{path}: `{name}` must hold numbers (pixel values); "
                        f"it holds {x.dtype} values.")
    if not len(x):
        raise DataError(f"{path}: `{name}` holds no examples.")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise DataError(f"{path}: `{name}` holds NaN or infinite pixel values "
                        f"(the first at index {where}); clean the data first.")
    return x


def _check_labels(path, name, y):
    if y.dtype.kind not in "uif" or (
            y.dtype.kind == "f" and not (np.isfinite(y).all() and (
                y == np.round(y)).all())):
        raise DataError(f"{path}: `{name}` must hold integer class labels "
                        f"(0, 1, ...); it holds {y.dtype} values.")
    if not len(y):
        raise DataError(f"{path}: `{name}` holds no labels.")
    return y.astype(np.int64).reshape(-1)


def load_image_folder(directory, size=None, val_fraction=0.2, seed=0):
    """Images in DIR/<class>/*.png|jpg, classes in sorted order."""
    classes = sorted(d for d in os.listdir(directory)
                     if os.path.isdir(os.path.join(directory, d)))
    if len(classes) < 2:
        raise DataError(f"{directory}: expected one sub-directory per class "
                        f"(at least 2); found {len(classes)}.")
    xs, ys = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(directory, name)
        for file in sorted(os.listdir(folder)):
            if not file.lower().endswith(IMAGE_SUFFIXES):
                continue
            image_path = os.path.join(folder, file)
            try:
                raw = tf.io.read_file(image_path)
                image = tf.io.decode_image(raw, channels=3,
                                           expand_animations=False)
            except (tf.errors.OpError, OSError) as e:
                text = " ".join(str(e).split())[:120]
                raise DataError(f"{image_path}: not a readable image "
                                f"({text}); fix or remove it.") from None
            if size is not None:
                image = tf.image.resize(image, size)
            xs.append(np.asarray(image, np.float32))
            ys.append(label)
    if not xs:
        raise DataError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}).")
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        first = xs[0].shape[:2]
        xs = [np.asarray(tf.image.resize(x, first)) for x in xs]
    x, y = np.stack(xs), np.array(ys, np.int64)
    idx = np.random.default_rng(seed).permutation(len(y))
    n_val = max(1, int(len(y) * val_fraction))
    return Split(x[idx[n_val:]], y[idx[n_val:]], x[idx[:n_val]], y[idx[:n_val]],
                 len(classes), os.path.basename(os.path.normpath(directory)))


def source_path(spec):
    """The file or directory a source spec reads, or None (digits, or the
    system's Fashion-MNIST)."""
    if not spec or spec in ("digits", "fashion-mnist"):
        return None
    if spec.startswith("fashion-mnist:"):
        return spec.split(":", 1)[1]
    if spec.startswith("npz:"):
        return spec[4:]
    return spec


def load_source(spec):
    """A `Split` from a source spec (see the module docstring)."""
    if spec is None:
        raise DataError("no data source given: use one such as "
                        "'fashion-mnist' (see load_source).")
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        return load_fashion_mnist(spec.split(":", 1)[1] if ":" in spec
                                  else None)
    if spec == "digits":
        return load_digits()
    if spec.startswith("npz:"):
        return load_npz(spec[4:])
    if spec.endswith(".npz"):
        return load_npz(spec)
    if os.path.isdir(spec):
        return load_image_folder(spec)
    raise DataError(
        f"unknown data source {spec!r}: use fashion-mnist[:DIR], digits, "
        "npz:PATH (or a .npz file), or a directory with one sub-directory of "
        "images per class."
    )


# --- adapting images to a model ------------------------------------------------------

SCALINGS = ("unit", "symmetric", "raw")


def model_image_shape(model):
    """(height, width, channels) of a model with one image input."""
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise DataError(
            f"model '{model.name}' does not take one image input (inputs: "
            f"{[tuple(t.shape) for t in model.inputs]}); give it a "
            "tf.data.Dataset instead."
        )
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise DataError(f"model '{model.name}' has an input of unknown size "
                        f"{shape}; build it with a fixed image size.")
    return shape


def adapt(images, shape, value_range=255.0, scaling="unit"):
    """A batch of images resized to (H, W), with grey turned to three equal
    channels (or colour to grey) as `shape` asks, scaled to [0, 1] ("unit"),
    [-1, 1] ("symmetric", as keras.applications' MobileNet / Inception
    preprocessing) or left in [0, 255] ("raw", ResNet-style models that
    preprocess themselves). Works on tf tensors inside tf.data."""
    if scaling not in SCALINGS:
        raise DataError(f"unknown scaling {scaling!r}; use one of {SCALINGS}.")
    h, w, c = shape
    x = tf.cast(images, tf.float32) * (255.0 / value_range)
    if x.shape[1] != h or x.shape[2] != w:
        x = tf.image.resize(x, (h, w))
    if x.shape[-1] == 1 and c == 3:
        x = tf.repeat(x, 3, axis=-1)
    elif x.shape[-1] == 3 and c == 1:
        x = tf.reduce_mean(x, axis=-1, keepdims=True)
    elif x.shape[-1] != c:
        raise DataError(f"cannot turn {x.shape[-1]}-channel images into the "
                        f"model's {c} channels.")
    if scaling == "unit":
        x = x / 255.0
    elif scaling == "symmetric":
        x = x / 127.5 - 1.0
    return x


# --- batching ----------------------------------------------------------------------------

def epoch_indices(labels, batch_size, *, seed, epoch, non_iid_classes=None):
    """Example indices of one epoch, `len // batch_size` whole batches.

    i.i.d.: a random permutation. Non-i.i.d. (the paper's Figure 3): each
    batch is drawn from `non_iid_classes` (K) random classes with
    batch_size / K examples of each.
    """
    rng = np.random.default_rng([seed, epoch])
    steps = len(labels) // batch_size
    if not non_iid_classes:
        return rng.permutation(len(labels))[: steps * batch_size]
    k = non_iid_classes
    per_class = batch_size // k
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    cursor = {c: 0 for c in classes}
    out = np.empty(steps * batch_size, np.int64)
    for step in range(steps):
        chosen = rng.choice(classes, size=k, replace=False)
        for j, c in enumerate(chosen):
            pool = pools[c]
            if cursor[c] + per_class > len(pool):
                pools[c] = pool = rng.permutation(pool)
                cursor[c] = 0
            start = step * batch_size + j * per_class
            out[start:start + per_class] = pool[cursor[c]:cursor[c] + per_class]
            cursor[c] += per_class
    return out


def check_batching(split, batch_size, non_iid_classes=None, microbatch=None):
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be >= 1.")
    if batch_size > len(split.y_train):
        raise DataError(f"batch_size={batch_size}: larger than the "
                        f"{len(split.y_train)} training examples.")
    if non_iid_classes:
        if batch_size % non_iid_classes:
            raise DataError(
                f"non_iid_classes={non_iid_classes}: the batch size {batch_size} "
                f"must be a multiple of it (batches of {non_iid_classes} "
                "classes with equally many examples each).")
        if non_iid_classes > split.num_classes:
            raise DataError(f"non_iid_classes={non_iid_classes}: the data has only "
                            f"{split.num_classes} classes.")
    if microbatch is not None and (microbatch < 1 or microbatch > batch_size):
        raise DataError(f"microbatch_size={microbatch}: must be between 1 "
                        f"and the batch size {batch_size}.")


def training_dataset(split, shape, batch_size, *, epochs, seed=0,
                     non_iid_classes=None, scaling="unit"):
    """tf.data of (images, labels) batches for `epochs` epochs, adapted to
    `shape`, prefetched, deterministic under `seed`. Returns
    (dataset, steps_per_epoch)."""
    check_batching(split, batch_size, non_iid_classes)
    steps = len(split.y_train) // batch_size
    order = np.concatenate([
        epoch_indices(split.y_train, batch_size, seed=seed, epoch=e,
                      non_iid_classes=non_iid_classes) for e in range(epochs)
    ])
    return _gather_dataset(split.x_train, split.y_train, order, batch_size,
                           shape, split.value_range, scaling,
                           whole_batches=True), steps


def evaluation_dataset(split, shape, batch_size=256, scaling="unit"):
    order = np.arange(len(split.y_val))
    return _gather_dataset(split.x_val, split.y_val, order, batch_size, shape,
                           split.value_range, scaling)


def _gather_dataset(x, y, order, batch_size, shape, value_range, scaling,
                    whole_batches=False):
    x_const = tf.constant(x)
    y_const = tf.constant(y)
    # Training orders are whole batches: saying so gives the batches a
    # static size, so layers trace one code path (no ragged-batch branch).
    ds = tf.data.Dataset.from_tensor_slices(order).batch(
        batch_size, drop_remainder=whole_batches)
    ds = ds.map(
        lambda i: (adapt(tf.gather(x_const, i), shape, value_range, scaling),
                   tf.gather(y_const, i)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
