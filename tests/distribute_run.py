"""The run test_distribute.py compares across devices and processes (and
distribute_worker.py runs): a converted CNN fine-tuned on non-i.i.d.
batches of scikit-learn's digits, two classes of 8 examples each per batch
of 16, so that the two halves of a batch (one device's part each) have
quite different moments."""

import keras
import numpy as np

import renorm_convert as rc
from renorm_convert import data

BATCH = 16
EPOCHS, STEPS = 2, 2


def model():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    return rc.convert(keras.Model(inputs, outputs, name="digits_cnn"))


def train(model, *, strategy=None, checkpoint_dir=None, microbatch=None):
    split = data.load_digits().subset(train=256, val=32, seed=0)
    model = rc.configure(model, momentum=0.9, microbatch_size=microbatch)
    batches = rc.data.training_batches(split, model, BATCH, non_iid_classes=2, seed=0,
                                     steps_per_epoch=STEPS)
    return rc.fine_tune(model, batches, epochs=EPOCHS, strategy=strategy,
                        checkpoint_dir=checkpoint_dir, verbose=0)


def state(model):
    """{index: value} of the model's weights and optimizer state."""
    variables = list(model.weights) + list(model.optimizer.variables)
    return {f"{i}": np.asarray(keras.ops.convert_to_numpy(v))
            for i, v in enumerate(variables)}
