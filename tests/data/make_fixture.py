"""Writes tests/data/renorm-<version>-<backend>.{keras,npz}: a small converted
model trained one epoch, and its outputs in inference and training mode.
Run with the version and backend to record, e.g.
`KERAS_BACKEND=jax python tests/data/make_fixture.py tests/data/renorm-0.2-jax`."""
import sys
import numpy as np, keras
import renorm_convert as rc
out = sys.argv[1]
keras.utils.set_random_seed(0)
inputs = keras.Input((6, 6, 3), name="img")
x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
x = keras.layers.BatchNormalization(name="bn")(x)
x = keras.layers.ReLU()(x)
x = keras.layers.GlobalAveragePooling2D()(x)
x = keras.layers.Dense(5, name="dense")(x)
x = keras.layers.BatchNormalization(name="bn_dense")(x)
model = keras.Model(inputs, x)
rng = np.random.default_rng(0)
for l in model.layers:
    if isinstance(l, keras.layers.BatchNormalization):
        for v in l.weights:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
conv = rc.convert(model, r_max=2.0, d_max=1.5, microbatch_size=2)
# Train a little so the renorm statistics differ from the moving ones.
xs = rng.normal(size=(8, 6, 6, 3)).astype("float32")
conv.compile("sgd", "mse")
conv.fit(xs, rng.normal(size=(8, 5)).astype("float32"), batch_size=4, verbose=0)
conv.save(out + ".keras")
np.savez(out + ".npz", x=xs[:3], x_train=xs[:4], y=keras.ops.convert_to_numpy(conv(xs[:3], training=False)),
         y_train=keras.ops.convert_to_numpy(conv(xs[:4], training=True)))
print("wrote", out, keras.backend.backend())
