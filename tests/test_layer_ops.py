"""A training call of BatchRenormalization: Keras's renorm numbers, bit for
bit, in fewer operations than Keras's renorm layer, on every backend.

Eager PyTorch pays for every operation, so the count is what its step time
follows (the time itself is benchmarks/train_step.py's job). Counted per
layer call, forward (with the sum of the outputs, in every count alike) and
backward: on PyTorch the ATen operations torch.profiler records (top level
only), on TensorFlow the operations of the traced graph, on JAX the
equations of the jaxpr."""

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import layer_step, numpy

BACKEND = keras.backend.backend()
# Bounds whose reciprocal and negation are exact in float32, so that Keras's
# Python-float clipping and ours clip at the same numbers.
R_MAX, D_MAX = 2.0, 0.5
SHAPE = (16, 6, 6, 8)

# Operations a training call may run beyond Keras BatchNormalization's
# (forward, backward), as measured: r and d (a square root, a floor on
# sigma, two divisions, the clipping by the bound variables), their
# composition with gamma and beta, and three more statistics to update.
# A change that adds operations fails here; lower the numbers when a change
# removes some.
EXTRA = {
    "torch": {"plain": (24, 3), "microbatch": (29, 3)},
    "tensorflow": {"plain": (46, 5), "microbatch": (59, 14)},
    "jax": {"plain": (26, 3), "microbatch": (35, 8)},
}


def _random_state(layer, seed):
    """Statistics far from a batch's, so that r and d are clipped."""
    rng = np.random.default_rng(seed)
    c = SHAPE[layer.axis]
    values = {"gamma": rng.uniform(0.5, 1.5, c), "beta": rng.normal(size=c),
              "moving_mean": rng.normal(size=c),
              "moving_variance": rng.uniform(0.2, 3.0, c),
              "renorm_mean": rng.normal(size=c),
              "renorm_stddev": rng.uniform(0.3, 4.0, c)}
    values["moving_stddev"] = np.sqrt(values["moving_variance"] + 1e-3)
    for v in layer.variables:
        name = v.path.split("/")[-1]
        if name in values:
            v.assign(values[name].astype("float32"))


@pytest.mark.parametrize("axis,center,scale", [
    (-1, True, True), (1, True, True), (-1, False, True), (1, True, False)])
def test_training_steps_equal_keras_renorm_bit_for_bit(axis, center, scale):
    ours = rc.BatchRenormalization(axis=axis, center=center, scale=scale,
                                   r_max=R_MAX, d_max=D_MAX, momentum=0.9,
                                   renorm_momentum=0.8)
    peer = keras.layers.BatchNormalization(
        axis=axis, center=center, scale=scale, momentum=0.9, renorm=True,
        renorm_momentum=0.8,
        renorm_clipping={"rmax": R_MAX, "rmin": 1 / R_MAX, "dmax": D_MAX})
    rng = np.random.default_rng(0)
    for layer in (ours, peer):
        layer.build(SHAPE)
        _random_state(layer, 1)
    clipped = False
    for _ in range(2):
        x = (rng.normal(size=SHAPE) * 2.0 + 0.7).astype("float32")
        w = rng.normal(size=SHAPE).astype("float32")
        y, grads = layer_step(ours, x, w)
        y_peer, grads_peer = layer_step(peer, x, w)
        np.testing.assert_array_equal(y, y_peer)
        for g, g_peer in zip(grads, grads_peer):
            np.testing.assert_array_equal(g, g_peer)
        for v, v_peer in zip(ours.variables, peer.variables):
            np.testing.assert_array_equal(numpy(v), numpy(v_peer),
                                          err_msg=v.path)
        clipped = clipped or _is_clipped(peer, x)
    assert clipped, "the bounds never clipped: the case tests too little"


def _is_clipped(layer, x):
    """Whether r or d of `x` against the layer's renorm statistics (NumPy)
    reach a bound."""
    axes = tuple(a for a in range(x.ndim) if a != layer.axis % x.ndim)
    sigma = np.sqrt(x.var(axis=axes) + layer.epsilon)
    r = sigma / numpy(layer.renorm_stddev)
    d = (x.mean(axis=axes) - numpy(layer.renorm_mean)) / numpy(
        layer.renorm_stddev)
    return bool(np.any((r > R_MAX) | (r < 1 / R_MAX) | (abs(d) > D_MAX)))


# --- operation counts ---------------------------------------------------------

def _torch_counts(layer, x):
    import torch
    from torch.profiler import ProfilerActivity, profile

    def aten(run):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        return sum(1 for e in prof.events() if e.name.startswith("aten::")
                   and not (e.cpu_parent is not None
                            and e.cpu_parent.name.startswith("aten::")))

    x = torch.tensor(x, requires_grad=True)
    layer(x, training=True).sum().backward()  # builds what a call caches
    out = []
    forward = aten(lambda: out.append(layer(x, training=True).sum()))
    return forward, aten(out[0].backward)


def _tf_counts(layer, x):
    import tensorflow as tf

    def forward(t):
        return tf.reduce_sum(layer(t, training=True))

    def with_gradients(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            loss = forward(t)
        return tape.gradient(loss, [t] + layer.trainable_weights)

    spec = tf.TensorSpec(x.shape, tf.float32)
    counts = [sum(op.type not in ("Placeholder", "NoOp") for op in
                  tf.function(fn).get_concrete_function(spec)
                  .graph.get_operations())
              for fn in (forward, with_gradients)]
    return counts[0], counts[1] - counts[0]


def _jax_counts(layer, x):
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(values, t):
        y, updates = layer.stateless_call(values, non_trainable, t,
                                          training=True)
        return y.sum(), updates

    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            inner = [p.jaxpr for p in eqn.params.values()
                     if hasattr(p, "jaxpr")]
            # A call (pjit, custom_jvp) counts as what it runs.
            n += sum(count(j) for j in inner) if inner else 1
        return n

    grad = jax.grad(forward, argnums=(0, 1), has_aux=True)
    counts = [count(jax.make_jaxpr(fn)(trainable, x).jaxpr)
              for fn in (forward, grad)]
    return counts[0], counts[1] - counts[0]


COUNTERS = {"torch": _torch_counts, "tensorflow": _tf_counts,
            "jax": _jax_counts}


def _counts(layer):
    layer.build(SHAPE)
    x = np.random.default_rng(0).normal(size=SHAPE).astype("float32")
    return COUNTERS[BACKEND](layer, x)


@pytest.fixture(scope="module")
def baseline():
    """(forward, backward) counts of Keras's BatchNormalization and of
    Keras's renorm layer."""
    peer = keras.layers.BatchNormalization(
        renorm=True,
        renorm_clipping={"rmax": R_MAX, "rmin": 1 / R_MAX, "dmax": D_MAX})
    return {"bn": _counts(keras.layers.BatchNormalization()),
            "keras_renorm": _counts(peer)}


@pytest.mark.parametrize("path,microbatch_size", [("plain", None),
                                                  ("microbatch", 4)])
def test_training_call_operation_count(baseline, path, microbatch_size):
    forward, backward = _counts(rc.BatchRenormalization(
        r_max=R_MAX, d_max=D_MAX, microbatch_size=microbatch_size))
    bn_forward, bn_backward = baseline["bn"]
    extra = (forward - bn_forward, backward - bn_backward)
    assert all(n <= most for n, most in zip(extra, EXTRA[BACKEND][path])), (
        f"{path} training call: {extra} operations over BatchNormalization "
        f"(forward, backward), budget {EXTRA[BACKEND][path]}")
    if path == "plain":
        # And strictly fewer than Keras's renorm, which computes the same.
        renorm_forward, _ = baseline["keras_renorm"]
        assert forward < renorm_forward, (forward, renorm_forward)

