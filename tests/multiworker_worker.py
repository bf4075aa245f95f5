"""One worker of the two-worker test (run by test_multi_worker_two_processes):
fine-tunes a converted model on scikit-learn's digits under
MultiWorkerMirroredStrategy and saves its final weights. TensorFlow only.

Usage: multiworker_worker.py INDEX PORT0 PORT1 OUT.npz [CHECKPOINT_DIR]
"""

import json
import os
import sys

index, port0, port1, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
checkpoint_dir = sys.argv[5] if len(sys.argv) > 5 else None
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{port0}", f"127.0.0.1:{port1}"]},
    "task": {"type": "worker", "index": index},
})
os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

# Collective ops must be configured before TensorFlow's first op.
strategy = tf.distribute.MultiWorkerMirroredStrategy()

import renorm_convert as rc  # noqa: E402
from renorm_convert import data  # noqa: E402

keras.utils.set_random_seed(0)
inputs = keras.Input((8, 8, 1))
x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
x = keras.layers.BatchNormalization(synchronized=True)(x)
x = keras.layers.ReLU()(x)
x = keras.layers.GlobalAveragePooling2D()(x)
outputs = keras.layers.Dense(10, activation="softmax")(x)
model = rc.configure(rc.convert(keras.Model(inputs, outputs)), momentum=0.9)
split = data.load_digits().subset(train=256, val=64)
result = rc.fine_tune(model, rc.data.training_batches(split, model, 32),
                      validation=split, epochs=2, strategy=strategy,
                      verbose=0, checkpoint_dir=checkpoint_dir)
trained = result.model
np.savez(out, *[v.numpy() for v in trained.weights],
         steps=int(trained.optimizer.iterations.numpy()),
         loss=result.history["loss"][-1])
print("worker", index, "done")
