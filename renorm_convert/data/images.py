"""Images adapted to a model's input: resized (as `tf.image.resize`
computes it), grey <-> colour, scaled. NumPy only."""

import numpy as np

from renorm_convert.errors import RenormConvertError

SCALINGS = ("unit", "symmetric", "raw")


def model_image_shape(model):
    """(height, width, channels) of a model with one channels-last image
    input."""
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        raise RenormConvertError(
            f"model '{model.name}' does not take one image input (inputs: "
            f"{[tuple(t.shape) for t in model.inputs]}); give it batches "
            "(arrays, a keras.utils.PyDataset or a tf.data.Dataset) instead.")
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise RenormConvertError(
            f"model '{model.name}' has an input of unknown size "
            f"{shape}; build it with a fixed image size.")
    return shape


def resize_bilinear(images, size):
    """(N, H, W, C) float images resized to `size` (h, w) by bilinear
    interpolation with half-pixel centres and no antialiasing, as
    `tf.image.resize(..., "bilinear")` computes it."""
    images = np.asarray(images, np.float32)
    h_out, w_out = size
    n, h_in, w_in, c = images.shape

    def taps(n_in, n_out):
        centre = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) \
            - 0.5
        centre = np.clip(centre, 0.0, n_in - 1)
        low = np.floor(centre).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        return low, high, (centre - low).astype(np.float32)

    y0, y1, wy = taps(h_in, h_out)
    x0, x1, wx = taps(w_in, w_out)
    top = images[:, y0] * (1 - wy)[None, :, None, None] + \
        images[:, y1] * wy[None, :, None, None]
    return top[:, :, x0] * (1 - wx)[None, None, :, None] + \
        top[:, :, x1] * wx[None, None, :, None]


def adapt(images, shape, value_range=255.0, scaling="unit"):
    """A batch of images (NumPy) resized to (H, W), with grey turned to three
    equal channels (or colour to grey) as `shape` asks, scaled to [0, 1]
    ("unit"), [-1, 1] ("symmetric", as keras.applications' MobileNet /
    Inception preprocessing) or left in [0, 255] ("raw", ResNet-style models
    that preprocess themselves); float32."""
    if scaling not in SCALINGS:
        raise RenormConvertError(
            "{arg}: use one of " + ", ".join(SCALINGS) + ".",
            "scaling", scaling)
    h, w, c = shape
    x = np.asarray(images, np.float32) * np.float32(255.0 / value_range)
    if x.shape[1] != h or x.shape[2] != w:
        x = resize_bilinear(x, (h, w))
    if x.shape[-1] == 1 and c == 3:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] == 3 and c == 1:
        x = x.mean(axis=-1, keepdims=True)
    elif x.shape[-1] != c:
        raise RenormConvertError(
            f"cannot turn {x.shape[-1]}-channel images into the "
            f"model's {c} channels.")
    if scaling == "unit":
        x = x / np.float32(255.0)
    elif scaling == "symmetric":
        x = x / np.float32(127.5) - np.float32(1.0)
    return x.astype(np.float32, copy=False)
