"""BatchRenormalization against Keras's renorm layer and NumPy references,
on every backend."""

import os
import tempfile

import keras
import numpy as np
import pytest

import renorm_convert as rc
from helpers import compiled_training_call, layer_step, numpy

R_MAX, D_MAX = 1.4, 0.3


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * 2.0 + 0.7).astype("float32")


def _random_state(layer, rng):
    """Statistics far from the batch's so clipping of r and d is active."""
    c = layer.moving_mean.shape[0]
    values = {
        "gamma": rng.uniform(0.5, 1.5, c),
        "beta": rng.normal(size=c),
        "moving_mean": rng.normal(size=c),
        "moving_variance": rng.uniform(0.2, 3.0, c),
        "renorm_mean": rng.normal(size=c),
        "renorm_stddev": rng.uniform(0.3, 4.0, c),
    }
    values["moving_stddev"] = np.sqrt(values["moving_variance"] + layer.epsilon)
    for v in layer.variables:
        name = v.path.split("/")[-1]
        if name in values:
            v.assign(values[name].astype("float32"))


def _pair(shape, axis, center=True, scale=True, **kw):
    ours = rc.BatchRenormalization(
        axis=axis, r_max=R_MAX, d_max=D_MAX, center=center, scale=scale,
        momentum=0.9, renorm_momentum=0.8, **kw)
    peer = keras.layers.BatchNormalization(
        axis=axis, center=center, scale=scale, momentum=0.9,
        renorm=True, renorm_momentum=0.8,
        renorm_clipping={"rmax": R_MAX, "rmin": 1 / R_MAX, "dmax": D_MAX})
    ours.build(shape)
    peer.build(shape)
    _random_state(ours, np.random.default_rng(1))
    _random_state(peer, np.random.default_rng(1))
    return ours, peer


def _peer(shape, snapshot, r_max=R_MAX, d_max=D_MAX):
    """Keras's renorm with these bounds, its state set from `snapshot` (the
    values of our layer's variables, whose first seven are Keras's own
    state arrays in Keras's order)."""
    peer = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping={"rmax": r_max, "rmin": 1 / r_max,
                                      "dmax": d_max})
    peer.build(shape)
    for v, s in zip(peer.variables, snapshot):
        v.assign(s)
    return peer


def _step(layer, x, w):
    return layer_step(layer, x, w)


CASES = [
    ((16, 6), -1, True, True),
    ((16, 6), 1, False, True),
    ((8, 5, 5, 4), -1, True, True),
    ((8, 4, 5, 5), 1, True, True),
    ((8, 5, 5, 4), -1, False, False),
    ((8, 4, 5, 5), 1, True, False),
]


@pytest.mark.parametrize("shape,axis,center,scale", CASES)
def test_matches_keras_renorm(shape, axis, center, scale):
    ours, peer = _pair(shape, axis, center, scale)
    w = _inputs(shape, seed=9)
    for step in range(4):
        x = _inputs(shape, seed=step)
        y1, g1 = _step(ours, x, w)
        y2, g2 = _step(peer, x, w)
        np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
        assert len(g1) == len(g2) == 1 + int(center) + int(scale)
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    state = [v for v in ours.variables
             if v.path.split("/")[-1] not in ("r_max", "d_max")]
    assert [v.path.split("/")[-1] for v in state] == [
        v.path.split("/")[-1] for v in peer.variables]
    assert len(state) == 7 - int(not center) - int(not scale)
    for a, b in zip(state, peer.variables):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5, atol=1e-6)


def test_clipping_is_active_in_parity_cases():
    """The parity cases would pass vacuously if r and d were never clipped."""
    ours, _ = _pair((16, 6), -1)
    x = _inputs((16, 6))
    std = np.sqrt(x.var(0) + ours.epsilon)
    r = std / numpy(ours.renorm_stddev)
    d = (x.mean(0) - numpy(ours.renorm_mean)) / numpy(ours.renorm_stddev)
    assert (np.abs(np.log(r)) > np.log(R_MAX)).any()
    assert (np.abs(d) > D_MAX).any()


def _np_batchnorm(x, layer, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    g = numpy(layer.gamma) if layer.scale else 1.0
    b = numpy(layer.beta) if layer.center else 0.0
    mean = numpy(layer.moving_mean).reshape(shape)
    var = numpy(layer.moving_variance).reshape(shape)
    return (x - mean) / np.sqrt(var + layer.epsilon) * np.reshape(g, shape if
            layer.scale else [1]) + np.reshape(b, shape if layer.center else [1])


@pytest.mark.parametrize("shape,axis,center,scale", CASES)
def test_inference_is_batchnorm_on_moving_statistics(shape, axis, center, scale):
    ours, _ = _pair(shape, axis, center, scale)
    x = _inputs(shape)
    np.testing.assert_allclose(numpy(ours(x, training=False)),
                               _np_batchnorm(x, ours, axis), rtol=1e-5,
                               atol=1e-5)


def test_r_max_1_d_max_0_is_batchnorm_in_training():
    x = _inputs((8, 3, 3, 5))
    ours = rc.BatchRenormalization(r_max=1.0, d_max=0.0)
    bn = keras.layers.BatchNormalization()
    for layer in (ours, bn):
        layer.build(x.shape)
    _random_state(ours, np.random.default_rng(3))
    bn.set_weights([numpy(v) for v in ours.variables[:4]])
    np.testing.assert_allclose(numpy(ours(x, training=True)),
                               numpy(bn(x, training=True)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_compiled_step_sees_new_clipping_without_retracing(jit):
    """The bounds are variables a compiled step reads: after set_clipping
    the same trace computes with the new bounds (as Keras's renorm layer
    built with them), on every backend's compiler."""
    layer = rc.BatchRenormalization(r_max=1.0, d_max=0.0)
    x = _inputs((16, 4))
    layer.build(x.shape)
    _random_state(layer, np.random.default_rng(2))
    snapshot = [numpy(v) for v in layer.variables]
    f, traces = compiled_training_call(layer, jit)

    def run():
        for v, s in zip(layer.variables, snapshot):
            v.assign(s)
        layer.set_clipping(r_max=bounds[0], d_max=bounds[1])
        return f(x)

    bounds = (1.0, 0.0)
    plain = run()
    traced = traces()
    bounds = (R_MAX, D_MAX)
    relaxed = run()
    bounds = (1.2, 0.1)
    third = run()
    # An independent reference: Keras's renorm built with these bounds.
    peers = []
    for r, d in ((R_MAX, D_MAX), (1.2, 0.1)):
        peers.append(numpy(_peer(x.shape, snapshot, r, d)(x, training=True)))
    assert traces() == traced  # nothing retraced after the first call
    assert np.abs(plain - relaxed).max() > 1e-2
    np.testing.assert_allclose(relaxed, peers[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(third, peers[1], rtol=1e-5, atol=1e-5)


def _np_microbatch(x, layer, m, axis):
    """NumPy reference of one microbatched training step."""
    eps, mom, rmom = layer.epsilon, layer.momentum, layer.renorm_momentum
    xc = np.moveaxis(x.astype(np.float64), axis, -1)
    c = xc.shape[-1]
    gamma = numpy(layer.gamma) if layer.scale else np.ones(c)
    beta = numpy(layer.beta) if layer.center else np.zeros(c)
    mu = numpy(layer.renorm_mean).astype(np.float64)
    sigma = np.maximum(numpy(layer.renorm_stddev), np.sqrt(eps))
    out = np.empty_like(xc)
    means, variances, sizes = [], [], []
    for start in range(0, len(xc), m):
        g = xc[start:start + m].reshape(-1, c)
        mean, var = g.mean(0), g.var(0)
        std = np.sqrt(var + eps)
        r = np.clip(std / sigma, 1 / layer.r_max, layer.r_max)
        d = np.clip((mean - mu) / sigma, -layer.d_max, layer.d_max)
        out[start:start + m] = (((xc[start:start + m] - mean) / std) * r + d) \
            * gamma + beta
        means.append(mean)
        variances.append(var)
        sizes.append(min(m, len(xc) - start))
    w = np.array(sizes, np.float64)[:, None] / sum(sizes)
    mean = (np.array(means) * w).sum(0)
    std = np.sqrt((np.array(variances) * w).sum(0) + eps)
    moving_std = numpy(layer.moving_stddev) * mom + std * (1 - mom)
    state = {
        "renorm_mean": numpy(layer.renorm_mean) * rmom + mean * (1 - rmom),
        "renorm_stddev": numpy(layer.renorm_stddev) * rmom + std * (1 - rmom),
        "moving_mean": numpy(layer.moving_mean) * mom + mean * (1 - mom),
        "moving_stddev": moving_std,
        "moving_variance": np.maximum(moving_std ** 2 - eps, 0),
    }
    return np.moveaxis(out, -1, axis), state


@pytest.mark.parametrize("shape,axis,m", [
    ((16, 6), -1, 4),
    ((12, 3, 4, 4), 1, 4),
    ((8, 4, 4, 3), -1, 2),
    ((10, 5), -1, 4),          # 4 + 4 + 2: a smaller last group
    ((7, 3, 3, 2), -1, 3),     # 3 + 3 + 1
])
def test_microbatches_match_numpy(shape, axis, m):
    layer = rc.BatchRenormalization(axis=axis, microbatch_size=m, r_max=R_MAX,
                                    d_max=D_MAX, momentum=0.9,
                                    renorm_momentum=0.8)
    layer.build(shape)
    _random_state(layer, np.random.default_rng(5))
    x = _inputs(shape, seed=4)
    expected, state = _np_microbatch(x, layer, m, axis)
    got = numpy(layer(x, training=True))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    for name, value in state.items():
        np.testing.assert_allclose(numpy(getattr(layer, name)), value,
                                   rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.tensorflow
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("batch", [12, 10])
def test_microbatches_with_unknown_batch_size(batch, jit):
    """Traced with an unknown batch size (TensorFlow's `fit` on arrays):
    whole groups and a ragged last group both match NumPy, with and
    without XLA."""
    import tensorflow as tf

    layer = rc.BatchRenormalization(microbatch_size=4, r_max=R_MAX,
                                    d_max=D_MAX)
    layer.build((None, 3, 3, 5))
    _random_state(layer, np.random.default_rng(8))
    x = _inputs((batch, 3, 3, 5), seed=batch)
    expected, state = _np_microbatch(x, layer, 4, -1)
    f = tf.function(lambda t: layer(t, training=True), jit_compile=jit,
                    input_signature=[tf.TensorSpec((None, 3, 3, 5))])
    np.testing.assert_allclose(f(x), expected, rtol=1e-4, atol=1e-4)
    for name, value in state.items():
        np.testing.assert_allclose(numpy(getattr(layer, name)), value,
                                   rtol=1e-5, atol=1e-5, err_msg=name)


def test_microbatch_gradients_match_per_group_keras_renorm():
    """Each group must behave as Keras's renorm applied to it alone."""
    shape, m = (12, 3, 3, 4), 4
    ours = rc.BatchRenormalization(microbatch_size=m, r_max=R_MAX, d_max=D_MAX)
    ours.build(shape)
    _random_state(ours, np.random.default_rng(6))
    snapshot = [numpy(v) for v in ours.variables]
    x = _inputs(shape, seed=3)
    w = _inputs(shape, seed=8)
    y1, g1 = _step(ours, x, w)
    n = len(ours.trainable_variables)
    for i in range(shape[0] // m):
        part = slice(i * m, (i + 1) * m)
        y2, g2 = _step(_peer(shape, snapshot), x[part], w[part])
        np.testing.assert_allclose(y1[part], y2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g1[0][part], g2[0], rtol=1e-4, atol=1e-5)
        totals = g2[1:] if i == 0 else [t + g for t, g in zip(totals,
                                                              g2[1:])]
    for i in range(n):
        np.testing.assert_allclose(g1[1 + i], totals[i], rtol=1e-4,
                                   atol=1e-4)


def _small_model(layer):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8)(inputs)
    x = layer(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)




@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_statistics_in_float32(policy):
    keras.mixed_precision.set_global_policy(policy)
    layer = rc.BatchRenormalization(r_max=R_MAX, d_max=D_MAX)
    x16 = keras.ops.cast(_inputs((16, 4, 4, 3)), layer.compute_dtype)
    y = layer(x16, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == layer.compute_dtype
    assert all(v.dtype == "float32" for v in layer.variables)
    keras.mixed_precision.set_global_policy("float32")
    ref = rc.BatchRenormalization(r_max=R_MAX, d_max=D_MAX)
    y32 = ref(keras.ops.cast(x16, "float32"), training=True)
    tol = 2e-2 if policy == "mixed_float16" else 8e-2
    np.testing.assert_allclose(numpy(keras.ops.cast(y, "float32")),
                               numpy(y32), atol=tol)
    for a, b in zip(layer.variables, ref.variables):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("microbatch", [None, 4])
def test_compiled_matches_eager(microbatch):
    x = _inputs((8, 4, 4, 3))
    layers = []
    for _ in range(2):
        layer = rc.BatchRenormalization(r_max=R_MAX, d_max=D_MAX,
                                        microbatch_size=microbatch)
        layer.build(x.shape)
        _random_state(layer, np.random.default_rng(7))
        layers.append(layer)
    eager = numpy(layers[0](x, training=True))
    compiled = compiled_training_call(layers[1], jit=True)[0](x)
    np.testing.assert_allclose(eager, compiled, rtol=1e-5, atol=1e-5)
    for a, b in zip(layers[0].variables, layers[1].variables):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5, atol=1e-6)


@pytest.mark.tensorflow
def test_mirrored_synchronized_uses_global_moments(mirrored):
    import tensorflow as tf

    strategy = mirrored
    x = _inputs((16, 5))
    with strategy.scope():
        layer = rc.BatchRenormalization(synchronized=True, r_max=R_MAX,
                                        d_max=D_MAX, momentum=0.5,
                                        renorm_momentum=0.5)
        layer.build(x.shape)
    ref = rc.BatchRenormalization(r_max=R_MAX, d_max=D_MAX, momentum=0.5,
                                  renorm_momentum=0.5)
    ref.build(x.shape)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(16)
    dist = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def step(batch):
        return strategy.run(lambda t: layer(t, training=True), args=(batch,))

    for batch in dist:
        out = step(batch)
    ours = np.concatenate([t.numpy() for t in
                           strategy.experimental_local_results(out)])
    np.testing.assert_allclose(ours, ref(x, training=True), rtol=1e-5,
                               atol=1e-5)
    for a, b in zip(layer.variables, ref.variables):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis,center,scale", CASES)
def test_from_batchnorm_and_back_keep_inference(shape, axis, center, scale):
    bn = keras.layers.BatchNormalization(axis=axis, center=center, scale=scale,
                                         epsilon=1e-3)
    bn.build(shape)
    rng = np.random.default_rng(11)
    for v in bn.variables:
        name = v.path.split("/")[-1]
        low = 0.1 if name in ("moving_variance", "gamma") else -2
        v.assign(rng.uniform(low, 3, v.shape).astype("float32"))
    x = _inputs(shape)
    ours = rc.BatchRenormalization.from_batchnorm(bn, r_max=2.0,
                                                  microbatch_size=2)
    assert ours.r_max == 2.0 and ours.microbatch_size == 2
    assert ours.axis == bn.axis and ours.epsilon == bn.epsilon
    np.testing.assert_array_equal(numpy(ours(x, training=False)),
                                  numpy(bn(x, training=False)))
    std = np.sqrt(numpy(bn.moving_variance).astype(np.float64) + 1e-3)
    np.testing.assert_allclose(numpy(ours.moving_stddev), std, rtol=1e-7)
    np.testing.assert_allclose(numpy(ours.renorm_stddev), std, rtol=1e-7)
    np.testing.assert_array_equal(numpy(ours.renorm_mean),
                                  numpy(bn.moving_mean))
    back = ours.to_batchnorm()
    assert type(back) is keras.layers.BatchNormalization
    assert not back.renorm
    np.testing.assert_array_equal(numpy(back(x, training=False)),
                                  numpy(bn(x, training=False)))


def test_first_training_step_keeps_pretrained_variance():
    """With renorm state initialised from the statistics, one step moves the
    moving variance by (1 - momentum) towards the batch, not to the default."""
    bn = keras.layers.BatchNormalization(momentum=0.99)
    bn.build((None, 3))
    bn.moving_variance.assign(np.array([4.0, 9.0, 0.25], "float32"))
    ours = rc.BatchRenormalization.from_batchnorm(bn, r_max=1, d_max=0)
    x = _inputs((32, 3))
    ours(x, training=True)
    bn(x, training=True)
    # Renorm averages the stddev, not the variance: compare with NumPy.
    std = np.sqrt(np.array([4.0, 9.0, 0.25]) + 1e-3)
    new_std = std * 0.99 + np.sqrt(x.var(0) + 1e-3) * 0.01
    np.testing.assert_allclose(numpy(ours.moving_variance),
                               new_std ** 2 - 1e-3, rtol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"r_max": 0.5}, "r_max=0.5"),
    ({"d_max": -1.0}, "d_max=-1.0"),
    ({"microbatch_size": 0}, "microbatch_size=0"),
    ({"microbatch_size": 2.5}, "microbatch_size=2.5"),
    ({"renorm_momentum": 1.5}, "renorm_momentum=1.5"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rc.BatchRenormalization(**kwargs)


def test_axis_out_of_range():
    layer = rc.BatchRenormalization(axis=3)
    with pytest.raises(ValueError, match="axis=3"):
        layer.build((2, 4))


def test_set_clipping_validates():
    layer = rc.BatchRenormalization()
    with pytest.raises(ValueError, match="r_max=0.9"):
        layer.set_clipping(r_max=0.9)


def test_keras_save_load_round_trip():
    layer = rc.BatchRenormalization(r_max=2.5, d_max=1.5, microbatch_size=4,
                                    renorm_momentum=0.9)
    model = _small_model(layer)
    model.build((None, 6))
    _random_state(layer, np.random.default_rng(3))
    x = _inputs((8, 6))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    new = loaded.layers[2]
    assert isinstance(new, rc.BatchRenormalization)
    assert new.get_config() == layer.get_config()
    for a, b in zip(new.variables, layer.variables):
        np.testing.assert_array_equal(numpy(a), numpy(b))
    np.testing.assert_array_equal(numpy(loaded(x)), numpy(model(x)))
    cfg = layer.get_config()
    assert rc.BatchRenormalization.from_config(cfg).get_config() == cfg


@pytest.mark.parametrize("jit", [False, True])
def test_fit_with_microbatches_and_ragged_last_batch(jit):
    """`fit` on arrays whose last batch is not a multiple of the
    microbatch (38 = 2 * 16 + 6: 4 + 2 in the last batch): the statistics
    after one epoch equal NumPy's step by step, with and without jit, on
    every backend (SGD at learning rate 0 keeps gamma and beta, so each
    step's statistics depend on the data alone)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(38, 6)).astype("float32") * 2 + 0.5
    y = rng.integers(0, 3, 38)
    inputs = keras.Input((6,))
    layer = rc.BatchRenormalization(microbatch_size=4, momentum=0.5,
                                    renorm_momentum=0.7, r_max=R_MAX,
                                    d_max=D_MAX)
    model = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
    model.compile(keras.optimizers.SGD(0.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    reference = rc.BatchRenormalization(microbatch_size=4, momentum=0.5,
                                        renorm_momentum=0.7, r_max=R_MAX,
                                        d_max=D_MAX)
    reference.build((None, 6))
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                        shuffle=False)
    assert np.isfinite(history.history["loss"]).all()
    for start in (0, 16, 32):
        _, state = _np_microbatch(x[start:start + 16], reference, 4, -1)
        for name, value in state.items():
            getattr(reference, name).assign(value.astype("float32"))
    for name in ("moving_mean", "moving_variance", "renorm_mean",
                 "renorm_stddev", "moving_stddev"):
        np.testing.assert_allclose(numpy(getattr(layer, name)),
                                   numpy(getattr(reference, name)),
                                   rtol=1e-5, atol=1e-5, err_msg=name)
