"""The r_max / d_max relaxation schedule of the paper, as a Keras callback.

Training starts as plain batch norm (r_max = 1, d_max = 0) for a warm-up, then
the bounds are relaxed linearly: the paper (section 4) holds them for 5000
steps and reaches d_max = 5 after 25k steps and r_max = 3 after 40k steps.
"""

import keras
import tensorflow as tf

from renorm_convert import _keras_internals as internals
from renorm_convert.layers import BatchRenormalization

# The paper trains for about 160k steps; `RenormSchedule.for_run` keeps the
# shape below for runs of any length.
PAPER_STEPS = 160_000


def clipping_at(step, *, warmup_steps, r_max, r_max_steps, d_max, d_max_steps):
    """(r_max, d_max) at `step`: 1 and 0 until `warmup_steps`, then a linear
    ramp reaching `r_max` at `r_max_steps` and `d_max` at `d_max_steps`."""

    def ramp(start, end, target, rest):
        if step <= start:
            return rest
        if step >= end or end <= start:
            return target
        return rest + (target - rest) * (step - start) / (end - start)

    return (
        float(ramp(warmup_steps, r_max_steps, r_max, 1.0)),
        float(ramp(warmup_steps, d_max_steps, d_max, 0.0)),
    )


def renorm_layers(model):
    """Every BatchRenormalization in `model`, nested models included."""
    return [
        layer
        for layer in internals.flatten_layers(model, include_self=True)
        if isinstance(layer, BatchRenormalization)
    ]


@keras.saving.register_keras_serializable(package="renorm_convert")
class RenormSchedule(keras.callbacks.Callback):
    """Relaxes the renorm clipping bounds during training.

    At each training batch it sets r_max and d_max of every
    BatchRenormalization of the model (nested models included) from the
    optimizer's iteration count, so a resumed run continues the schedule where
    it stopped; the current values go into the batch and epoch logs (History,
    CSVLogger, TensorBoard).

    Args:
        warmup_steps: Steps at r_max = 1, d_max = 0 (plain batch norm).
        r_max: Final r_max, reached at `r_max_steps`.
        r_max_steps: Step at which r_max is reached.
        d_max: Final d_max, reached at `d_max_steps`.
        d_max_steps: Step at which d_max is reached.
        scale: Multiplies every step count, to fit the schedule to a run
            shorter or longer than the paper's.

    Example:
    >>> model.fit(x, y, callbacks=[RenormSchedule.for_run(total_steps=3000)])

    Reference: https://arxiv.org/abs/1702.03275, section 4.
    """

    def __init__(
        self,
        warmup_steps=5000,
        r_max=3.0,
        r_max_steps=40000,
        d_max=5.0,
        d_max_steps=25000,
        scale=1.0,
    ):
        super().__init__()
        r_max = BatchRenormalization._check_r_max(r_max)
        d_max = BatchRenormalization._check_d_max(d_max)
        if scale <= 0:
            raise ValueError(f"Expected `scale` > 0. Received: scale={scale}")
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("r_max_steps", r_max_steps),
            ("d_max_steps", d_max_steps),
        ):
            if value < 0:
                raise ValueError(
                    f"Expected `{name}` >= 0. Received: {name}={value}"
                )
        if r_max_steps < warmup_steps or d_max_steps < warmup_steps:
            raise ValueError(
                "Expected `r_max_steps` and `d_max_steps` >= `warmup_steps`. "
                f"Received: warmup_steps={warmup_steps}, "
                f"r_max_steps={r_max_steps}, d_max_steps={d_max_steps}"
            )
        self.warmup_steps = warmup_steps
        self.r_max = float(r_max)
        self.r_max_steps = r_max_steps
        self.d_max = float(d_max)
        self.d_max_steps = d_max_steps
        self.scale = float(scale)
        self._layers = None
        self._current = (1.0, 0.0)

    @classmethod
    def for_run(cls, total_steps, *, warmup=0.1, d_max_at=0.25, r_max_at=0.35,
                r_max=3.0, d_max=5.0):
        """A schedule for a run of `total_steps`, as fractions of it.

        The defaults (warm-up 10 %, d_max at 25 %, r_max at 35 %) are the
        proportions that kept short CPU-scale runs stable; the paper's own
        proportions of its ~160k steps are warmup=0.03, d_max_at=0.16,
        r_max_at=0.25.
        """
        if total_steps < 1:
            raise ValueError(
                f"Expected `total_steps` >= 1. Received: total_steps={total_steps}"
            )
        return cls(
            warmup_steps=round(warmup * total_steps),
            r_max=r_max,
            r_max_steps=round(r_max_at * total_steps),
            d_max=d_max,
            d_max_steps=round(d_max_at * total_steps),
        )

    def values_at(self, step):
        """(r_max, d_max) at optimizer step `step`."""
        return clipping_at(
            step,
            warmup_steps=self.warmup_steps * self.scale,
            r_max=self.r_max,
            r_max_steps=self.r_max_steps * self.scale,
            d_max=self.d_max,
            d_max_steps=self.d_max_steps * self.scale,
        )

    def set_model(self, model):
        super().set_model(model)
        self._layers = None
        self._assign = None
        self._applied = None

    def _apply(self):
        if self._layers is None:
            self._layers = renorm_layers(self.model)
            r_vars = [layer._r_max_var for layer in self._layers]
            d_vars = [layer._d_max_var for layer in self._layers]

            # One call per change instead of two eager assignments per
            # layer and batch (which cost ~0.1 ms each).
            @tf.function
            def assign(r_max, d_max):
                for v in r_vars:
                    v.assign(r_max)
                for v in d_vars:
                    v.assign(d_max)

            self._assign = assign
        step = int(self.model.optimizer.iterations.numpy())
        self._current = self.values_at(step)
        if self._current != self._applied:
            # The warm-up and the end of the schedule change nothing.
            self._assign(tf.constant(self._current[0], tf.float32),
                         tf.constant(self._current[1], tf.float32))
            self._applied = self._current

    def on_train_begin(self, logs=None):
        self._apply()

    def on_train_batch_begin(self, batch, logs=None):
        self._apply()

    def _log(self, logs):
        if logs is not None:
            logs["r_max"], logs["d_max"] = self._current

    def on_train_batch_end(self, batch, logs=None):
        self._log(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._log(logs)

    def get_config(self):
        return {
            "warmup_steps": self.warmup_steps,
            "r_max": self.r_max,
            "r_max_steps": self.r_max_steps,
            "d_max": self.d_max,
            "d_max_steps": self.d_max_steps,
            "scale": self.scale,
        }
