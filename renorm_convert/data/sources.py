"""Real data sets that need no internet, as a `Split` (NumPy only: the
command line checks a source before any backend loads).

Sources (`load_source` spec):
    fashion-mnist[:DIR]  Debian's dataset-fashion-mnist package
                         (/usr/share/datasets/fashion-mnist), or DIR
    digits               scikit-learn's bundled 8x8 digits
    npz:PATH | PATH.npz  arrays `x` (N, H, W[, C]) and `y`: class ids (N,),
                         or one-hot / soft labels (N, classes)
    DIR                  a directory of images, one sub-directory per class
"""

import dataclasses
import gzip
import os

import numpy as np

from renorm_convert.data.images import (SCALINGS, adapt, model_image_shape,
                                        resize_bilinear)
from renorm_convert.data.labels import (check_labels, is_dense,
                                        num_label_classes)
from renorm_convert.errors import RenormConvertError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclasses.dataclass
class Split:
    """Images (N, H, W, C) as uint8 or float, labels (class ids or one-hot /
    soft rows), class count, and how pixels are read: `value_range` is the
    value that means "white", `scaling` what a model is fed ("unit" [0, 1],
    "symmetric" [-1, 1] or "raw" [0, 255])."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    name: str
    value_range: float = 255.0
    scaling: str = "unit"

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise RenormConvertError(
                "{arg}: use one of " + ", ".join(SCALINGS) + ".",
                "scaling", self.scaling)

    def with_scaling(self, scaling):
        """The same data, fed to models with another pixel scaling."""
        return dataclasses.replace(self, scaling=scaling)

    def subset(self, train=None, val=None, seed=0):
        """A smaller split: the first `train` / `val` examples of a seeded
        permutation (deterministic under `seed`)."""
        for name, n in (("train", train), ("val", val)):
            if n is not None and (isinstance(n, bool) or int(n) != n or n < 0
                                  or (name == "train" and n < 1)):
                raise RenormConvertError(
                    f"{{arg}}: expected a number of examples "
                    f"(>= {1 if name == 'train' else 0}) or None.", name, n)
        if seed is None or int(seed) < 0:
            raise RenormConvertError(
                "{arg}: expected an integer >= 0.",
                "seed", seed)
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

    def inputs_for(self, model, count=None, *, part="val"):
        """(images, labels) as NumPy arrays, the first `count` (all when
        None) of the validation (`part="val"`) or training ("train") part,
        resized and scaled as `model`'s one image input takes them: e.g.
        `export_onnx(model, path, verify=x, labels=y)`."""
        if part not in ("val", "train"):
            raise RenormConvertError(
                "{arg}: expected 'val' or 'train'.",
                "part", part)
        x, y = ((self.x_val, self.y_val) if part == "val"
                else (self.x_train, self.y_train))
        x, y = x[:count], y[:count]
        return adapt(x, model_image_shape(model), self.value_range,
                     self.scaling), np.asarray(y)


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
        raise RenormConvertError(
            f"Fashion-MNIST not found in {directory} (missing {missing[0]}). "
            "Install it with `sudo apt-get install dataset-fashion-mnist`, or "
            "give its directory as the source 'fashion-mnist:DIR'.")
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
    """`x` (N, H, W[, C]) and `y` (class ids (N,) or one-hot / soft (N, C))
    from an .npz file; also takes `x_val` / `y_val`, else splits off
    `val_fraction`."""
    if not os.path.exists(path):
        raise RenormConvertError(
            f"{path}: no such file; check the path (an .npz file holding "
            "arrays x and y).")
    if os.path.isdir(path):
        raise RenormConvertError(f"{path}: is a directory, not an .npz file.")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        text = " ".join(str(e).split())[:120]
        raise RenormConvertError(
            f"{path}: not a readable .npz file ({text}).") from None
    if "x" not in arrays or "y" not in arrays:
        raise RenormConvertError(
            f"{path}: needs arrays named `x` and `y`; it has "
            f"{sorted(arrays)}.")
    x = _check_images(path, "x", arrays["x"])
    y = check_labels(path, "y", arrays["y"])
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or len(x) != len(y):
        raise RenormConvertError(
            f"{path}: expected x of shape (N, H, W[, C]) and as "
            f"many labels; got x {x.shape} and y {y.shape}.")
    if "x_val" in arrays and "y_val" in arrays:
        xv = _check_images(path, "x_val", arrays["x_val"])
        xv = xv[..., None] if xv.ndim == 3 else xv
        yv = check_labels(path, "y_val", arrays["y_val"])
        if xv.ndim != 4 or len(xv) != len(yv) or is_dense(yv) != is_dense(y):
            raise RenormConvertError(
                f"{path}: expected x_val of shape (N, H, W[, C]) "
                f"and labels like y's; got x_val {xv.shape} and "
                f"y_val {yv.shape}.")
        xt, yt = x, y
    else:
        idx = np.random.default_rng(seed).permutation(len(y))
        n_val = max(1, int(len(y) * val_fraction))
        xt, yt, xv, yv = x[idx[n_val:]], y[idx[n_val:]], x[idx[:n_val]], y[
            idx[:n_val]]
    vrange = 255.0 if x.dtype == np.uint8 or x.max() > 1.0 else 1.0
    return Split(xt, yt, xv, yv, num_label_classes(y, yv),
                 os.path.basename(path), value_range=vrange)


def _check_images(path, name, x):
    if x.dtype.kind not in "uif":
        raise RenormConvertError(
            f"{path}: `{name}` must hold numbers (pixel values); "
            f"it holds {x.dtype} values.")
    if not len(x):
        raise RenormConvertError(f"{path}: `{name}` holds no examples.")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise RenormConvertError(
            f"{path}: `{name}` holds NaN or infinite pixel values "
            f"(the first at index {where}); clean the data first.")
    return x


def _read_image(path):
    """An (H, W, 3) uint8 array from an image file (Pillow)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"), np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        text = " ".join(str(e).split())[:120]
        raise RenormConvertError(
            f"{path}: not a readable image ({text}); fix or "
            "remove it.") from None


def load_image_folder(directory, size=None, val_fraction=0.2, seed=0):
    """Images in DIR/<class>/*.png|jpg, classes in sorted order; images of
    other sizes than the first are resized to it (bilinear)."""
    if not os.path.isdir(directory):
        raise RenormConvertError(
            f"{directory}: no such directory (an image folder "
            "holds one sub-directory of images per class).")
    classes = sorted(d for d in os.listdir(directory)
                     if os.path.isdir(os.path.join(directory, d)))
    if len(classes) < 2:
        raise RenormConvertError(
            f"{directory}: expected one sub-directory per class "
            f"(at least 2); found {len(classes)}.")
    xs, ys = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(directory, name)
        for file in sorted(os.listdir(folder)):
            if file.lower().endswith(IMAGE_SUFFIXES):
                xs.append(_read_image(os.path.join(folder, file)))
                ys.append(label)
    if not xs:
        raise RenormConvertError(
            f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}).")
    target = tuple(size) if size is not None else xs[0].shape[:2]
    xs = [x if x.shape[:2] == target else
          np.clip(np.rint(resize_bilinear(x[None].astype(np.float32),
                                          target)[0]), 0, 255).astype(np.uint8)
          for x in xs]
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


def check_source(spec):
    """Refuses, without reading any data, a source spec whose file or folder
    does not exist (what can be told before a backend loads)."""
    if spec is None:
        raise RenormConvertError("no data source given: use one such as "
                        "'fashion-mnist' (see load_source).")
    path = source_path(spec)
    if path is None:
        return
    if spec.startswith("fashion-mnist:") and not os.path.isdir(path):
        raise RenormConvertError(
            f"{path}: no such directory for Fashion-MNIST.")
    if spec.startswith("npz:") or spec.endswith(".npz"):
        if not os.path.exists(path):
            raise RenormConvertError(
                f"{path}: no such file; check the path (an .npz file holding "
                "arrays x and y).")
        return
    if not os.path.exists(path):
        looks_like_path = os.sep in spec or spec.startswith(".")
        if looks_like_path:
            raise RenormConvertError(
                f"{path}: no such directory (an image folder "
                "holds one sub-directory of images per class).")
        raise RenormConvertError(
            f"unknown data source {spec!r}: use fashion-mnist[:DIR], digits, "
            "npz:PATH (or a .npz file), or a directory with one sub-directory "
            "of images per class.")
    if not os.path.isdir(path):
        raise RenormConvertError(
            f"{path}: not a directory of images nor an .npz "
            "file; give npz:PATH for arrays.")


def load_source(spec):
    """A `Split` from a source spec (see the module docstring)."""
    check_source(spec)
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        return load_fashion_mnist(spec.split(":", 1)[1] if ":" in spec
                                  else None)
    if spec == "digits":
        return load_digits()
    if spec.startswith("npz:"):
        return load_npz(spec[4:])
    if spec.endswith(".npz"):
        return load_npz(spec)
    return load_image_folder(spec)
