"""The r_max / d_max relaxation schedule of the paper, as a Keras callback.

Training starts as plain batch norm (r_max = 1, d_max = 0) for a warm-up, then
the bounds are relaxed linearly: the paper (section 4) holds them for 5000
steps and reaches d_max = 5 after 25k steps and r_max = 3 after 40k steps.
"""

import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert._internal.backend import optimizer_step
from renorm_convert.errors import RenormConvertError
from renorm_convert.layers import check_d_max, check_r_max, renorm_layers

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


@keras.saving.register_keras_serializable(package="renorm_convert")
class RenormSchedule(keras.callbacks.Callback):
    """Relaxes the renorm clipping bounds during training.

    Before each training batch it sets r_max and d_max of every
    BatchRenormalization of the model (nested models and custom layers'
    sublayers included) for the optimizer step about to run, counted from
    the optimizer's iterations at the start of each epoch, so a resumed run
    continues the schedule where it stopped. The bounds are variables the
    trainer carries into its compiled step: nothing retraces, on any
    backend. The current values go into the batch and epoch logs (History,
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
        r_max = check_r_max(r_max)
        d_max = check_d_max(d_max)
        if isinstance(scale, bool) or not scale > 0:
            raise RenormConvertError("Expected `scale` > 0. Received: {arg}",
                                     "scale", scale)
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("r_max_steps", r_max_steps),
            ("d_max_steps", d_max_steps),
        ):
            if isinstance(value, bool) or not value >= 0:
                raise RenormConvertError(
                    f"Expected `{name}` >= 0. Received: {{arg}}", name, value)
        if r_max_steps < warmup_steps or d_max_steps < warmup_steps:
            raise RenormConvertError(
                "Expected `r_max_steps` and `d_max_steps` >= `warmup_steps`. "
                f"Received: warmup_steps={warmup_steps}, "
                f"r_max_steps={r_max_steps}, d_max_steps={d_max_steps}")
        self.warmup_steps = warmup_steps
        self.r_max = float(r_max)
        self.r_max_steps = r_max_steps
        self.d_max = float(d_max)
        self.d_max_steps = d_max_steps
        self.scale = float(scale)
        self._assigner = None
        self._count = 0
        self._current = (1.0, 0.0)
        self._applied = None
        self._epoch_start = 0

    @classmethod
    def for_run(cls, total_steps, *, warmup=0.1, d_max_at=0.25, r_max_at=0.35,
                r_max=3.0, d_max=5.0):
        """A schedule for a run of `total_steps`, as fractions of it.

        The defaults (warm-up 10 %, d_max at 25 %, r_max at 35 %) are the
        proportions that kept short CPU-scale runs stable; the paper's own
        proportions of its ~160k steps are warmup=0.03, d_max_at=0.16,
        r_max_at=0.25.
        """
        if isinstance(total_steps, bool) or not total_steps >= 1:
            raise RenormConvertError(
                "Expected `total_steps` >= 1. Received: {arg}", "total_steps",
                total_steps)
        for name, value in (("warmup", warmup), ("d_max_at", d_max_at),
                            ("r_max_at", r_max_at)):
            if not 0.0 <= value <= 1.0:
                raise RenormConvertError(
                    f"Expected `{name}` as a fraction of the run, in [0, 1]. "
                    "Received: {arg}", name, value)
        return cls(
            warmup_steps=round(warmup * total_steps),
            r_max=r_max,
            r_max_steps=max(round(r_max_at * total_steps),
                            round(warmup * total_steps)),
            d_max=d_max,
            d_max_steps=max(round(d_max_at * total_steps),
                            round(warmup * total_steps)),
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
        self._assigner = None
        self._applied = None

    def _apply(self, step):
        self._current = self.values_at(step)
        if self._current == self._applied:
            return  # the warm-up and the end of the schedule change nothing
        if self._assigner is None:
            layers = renorm_layers(self.model)
            for layer in layers:
                if not layer.built:
                    raise RenormConvertError(
                        f"layer '{layer.name}' is not built yet; build the "
                        "model before training it with RenormSchedule.")
            variables = [v for layer in layers
                         for v in layer.clipping_variables]
            self._count = len(layers)
            self._assigner = internals.FitAssigner(self.model, variables)
        self._assigner.assign(list(self._current) * self._count)
        self._applied = self._current

    def on_train_begin(self, logs=None):
        self._applied = None
        self._assigner = None

    def on_epoch_begin(self, epoch, logs=None):
        # Read once an epoch (under JAX the state is attached to the model
        # here; reading it mid-epoch would force a full state sync).
        self._epoch_start = optimizer_step(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        self._apply(self._epoch_start + batch)

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
