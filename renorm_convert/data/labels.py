"""Labels as class ids (N,) or one-hot / soft rows (N, classes): telling
them apart, checking them, counting their classes. NumPy only."""

import numpy as np

from renorm_convert.errors import RenormConvertError


def class_ids(y):
    """Class ids of labels given as ids (N,) or one-hot / soft (N, C)."""
    y = np.asarray(y)
    return y.reshape(-1) if y.ndim < 2 else y.argmax(axis=-1)


def is_dense(y):
    """Whether labels are one-hot / soft rows (N, C) rather than ids."""
    return np.ndim(y) == 2


def check_labels(where, name, y):
    """Class ids (N,) as int64, or one-hot / soft rows (N, C) as float32;
    refuses what cannot be read as either, naming it."""
    y = np.asarray(y)
    if y.dtype.kind not in "uifb":
        raise RenormConvertError(
            f"{where}: `{name}` must hold class labels (0, 1, "
            f"...) or one-hot rows; it holds {y.dtype} values.")
    if not len(y):
        raise RenormConvertError(f"{where}: `{name}` holds no labels.")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        y = y.astype(np.float64)
        sums = y.sum(axis=1)
        if not np.isfinite(y).all() or (y < 0).any() or not np.allclose(
                sums, 1.0, atol=1e-3):
            row = int(np.flatnonzero(~np.isclose(sums, 1.0, atol=1e-3)
                                     | (y < 0).any(axis=1))[0]) \
                if np.isfinite(y).all() else 0
            raise RenormConvertError(
                f"{where}: `{name}` has shape {y.shape}, read as one-hot or "
                f"soft labels, but row {row} is not a probability "
                f"distribution (sum {sums[row]:.3g}); multi-label targets "
                "are not supported. Give class ids (N,) or rows summing "
                "to 1.")
        return y.astype(np.float32)
    if y.ndim != 1:
        raise RenormConvertError(
            f"{where}: `{name}` must have shape (N,) or (N, "
            f"classes); got {y.shape}.")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (
            y == np.round(y)).all()):
        raise RenormConvertError(
            f"{where}: `{name}` must hold integer class labels "
            f"(0, 1, ...); it holds {y.dtype} values that are not "
            "whole numbers.")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise RenormConvertError(f"{where}: labels must be >= 0.")
    return y


def num_label_classes(*labels):
    """Classes the labels need: the columns of dense labels, else the
    largest id + 1."""
    for y in labels:
        if is_dense(y):
            return int(np.shape(y)[1])
    return int(max(int(np.max(y)) for y in labels if len(y)) + 1)
