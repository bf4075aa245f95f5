"""The numbers a diagnosis reports, as pure NumPy functions of what the
passes recorded: r and d against a layer's statistics, their summaries and
clipped shares, the drift of the moving statistics from the data's, and
how far a model's outputs move between two modes."""

import numpy as np

from renorm_convert.data import class_ids, is_dense


def corrections(mean, variance, ref_mean, ref_stddev, epsilon):
    """(r, d) of batch (or group) moments against statistics (mean,
    stddev): r = sigma_B / sigma, d = (mu_B - mu) / sigma, with sigma_B =
    sqrt(var_B + epsilon) as the layer computes it; unclipped."""
    stddev = np.sqrt(np.asarray(variance, np.float64) + epsilon)
    return stddev / ref_stddev, (np.asarray(mean, np.float64)
                                 - ref_mean) / ref_stddev


def summary(values):
    """Median and the 5-95 % range of `values` (any shape)."""
    p5, median, p95 = np.percentile(np.asarray(values, np.float64),
                                    [5, 50, 95])
    return {"median": float(median), "p5": float(p5), "p95": float(p95)}


def clipped_share(r, d, r_max, d_max):
    """Shares of the r values outside [1 / r_max, r_max] and of the d
    values outside [-d_max, d_max]: what clipping at these bounds would
    change."""
    r, d = np.asarray(r), np.asarray(d)
    return {"r": float(np.mean((r > r_max) | (r < 1.0 / r_max))),
            "d": float(np.mean(np.abs(d) > d_max))}


def deviation(r, d):
    """One number for how far a layer's batch statistics stray: the root
    mean square of d and of log r over groups and channels, combined
    (0: every batch has the reference statistics)."""
    return float(np.sqrt(np.mean(np.square(d))
                         + np.mean(np.square(np.log(r)))))


def drift(moving_mean, moving_variance, data_mean, data_variance, epsilon):
    """How far the moving statistics are from the data's, relative to the
    data's standard deviation, averaged over channels: the mean's shift
    |mu_moving - mu_data| / sigma_data and the standard deviation's
    relative error |sigma_moving / sigma_data - 1|."""
    sigma = np.sqrt(np.asarray(data_variance, np.float64) + epsilon)
    moving_sigma = np.sqrt(np.asarray(moving_variance, np.float64) + epsilon)
    return {"mean": float(np.mean(np.abs(np.asarray(moving_mean, np.float64)
                                         - data_mean) / sigma)),
            "stddev": float(np.mean(np.abs(moving_sigma / sigma - 1.0)))}


def log_probabilities(outputs, probabilities):
    """Log class probabilities (float64) of a classifier's outputs:
    logits, or probabilities when `probabilities` (a final softmax)."""
    z = np.asarray(outputs, np.float64).reshape(len(outputs), -1)
    if probabilities:
        p = np.clip(z, 1e-12, None)
        return np.log(p / p.sum(axis=1, keepdims=True))
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def top1_and_loss(log_p, labels):
    """(top-1 accuracy, mean cross-entropy) of log probabilities against
    class ids or one-hot / soft rows."""
    top1 = float(np.mean(log_p.argmax(axis=1) == class_ids(labels)))
    if is_dense(labels):
        loss = -np.sum(np.asarray(labels, np.float64) * log_p, axis=1)
    else:
        loss = -log_p[np.arange(len(log_p)), class_ids(labels)]
    return top1, float(np.mean(loss))


def output_shifts(log_p, reference):
    """How far each example's prediction moved from `reference`: the total
    variation distance between the two class distributions, half the sum
    of |p - p_reference| over classes (0: the same prediction, 1: all of
    the probability moved to other classes). Classes the model deems
    unlikely weigh little, as they weigh little in its predictions."""
    return 0.5 * np.abs(np.exp(log_p) - np.exp(reference)).sum(axis=1)


def batch_means(values, batch_size):
    """Means of consecutive batches of `values`."""
    values = np.asarray(values, np.float64)
    return values.reshape(-1, batch_size).mean(axis=1)
