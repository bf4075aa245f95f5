"""Trains the small reference models on Fashion-MNIST and saves them into
the package (renorm_convert/reference/), which ships them.

Pretrained ImageNet weights cannot be downloaded where this project is built
and tested, so it trains its own "pretrained" batch-norm models on real data
(Debian's dataset-fashion-mnist): an Inception-style network (parallel
branches joined by concatenation, BatchNormalization after every convolution)
and a small residual network. Deterministic under the seed; a few minutes on
2 CPU cores.

    python models/build.py            # both, into renorm_convert/reference/
    python models/build.py --epochs 1 --out /tmp/models
"""

import argparse
import json
import os
import sys
import tempfile
import time

import keras
import tensorflow as tf

import renorm_convert as rc
from renorm_convert import data


def conv_bn(x, filters, kernel, name, strides=1):
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same",
                            use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def inception_block(x, width, name):
    b1 = conv_bn(x, width, 1, f"{name}_b1")
    b2 = conv_bn(conv_bn(x, width, 1, f"{name}_b2a"), width, 3, f"{name}_b2b")
    b3 = conv_bn(conv_bn(x, width // 2, 1, f"{name}_b3a"), width // 2, 5,
                 f"{name}_b3b")
    b4 = keras.layers.MaxPooling2D(3, strides=1, padding="same",
                                   name=f"{name}_pool")(x)
    b4 = conv_bn(b4, width // 2, 1, f"{name}_b4")
    return keras.layers.Concatenate(name=f"{name}_concat")([b1, b2, b3, b4])


def inception_net(num_classes=10):
    inputs = keras.Input((28, 28, 1), name="image")
    x = conv_bn(inputs, 24, 3, "stem")
    x = inception_block(x, 16, "mixed1")
    x = keras.layers.MaxPooling2D(name="reduce1")(x)
    x = inception_block(x, 24, "mixed2")
    x = keras.layers.MaxPooling2D(name="reduce2")(x)
    x = inception_block(x, 32, "mixed3")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name="inception_fmnist")


def residual_block(x, filters, name, strides=1):
    shortcut = x
    y = conv_bn(x, filters, 3, f"{name}_1", strides=strides)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                            name=f"{name}_2_conv")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_2_bn")(y)
    if strides != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=strides,
                                       use_bias=False,
                                       name=f"{name}_proj_conv")(shortcut)
        shortcut = keras.layers.BatchNormalization(
            name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def resnet(num_classes=10):
    inputs = keras.Input((28, 28, 1), name="image")
    x = conv_bn(inputs, 16, 3, "stem")
    x = residual_block(x, 16, "block1")
    x = residual_block(x, 32, "block2", strides=2)
    x = residual_block(x, 64, "block3", strides=2)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name="resnet_fmnist")


BUILDERS = {"inception_fmnist": inception_net, "resnet_fmnist": resnet}


def replace_file(path, write):
    """Calls `write(tmp)` on a temporary file beside `path` (same suffix,
    which Keras's save needs) and renames it over `path`, so that `path` is
    the old file or the whole new one, never a half-written one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-build-", dir=directory,
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private to its owner
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(path, payload):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)

    replace_file(path, write)


def train(name, split, epochs, batch_size, seed):
    keras.utils.set_random_seed(seed)
    model = BUILDERS[name]()
    shape = data.model_image_shape(model)
    train_ds, steps = data.training_dataset(split, shape, batch_size,
                                            epochs=epochs, seed=seed)
    val_ds = data.evaluation_dataset(split, shape)
    model.compile(keras.optimizers.Adam(2e-3),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(train_ds, epochs=epochs, steps_per_epoch=steps,
              validation_data=val_ds, verbose=2)
    seconds = time.perf_counter() - start
    return model, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--out", default=os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "renorm_convert", "reference"))
    parser.add_argument("--only", choices=sorted(BUILDERS))
    args = parser.parse_args(argv)
    tf.config.experimental.enable_op_determinism()
    split = data.load_source(args.data)
    metrics_path = os.path.join(args.out, "metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    for name in ([args.only] if args.only else sorted(BUILDERS)):
        print(f"training {name} on {split.name} ({len(split.y_train)} images, "
              f"{args.epochs} epochs)", file=sys.stderr)
        model, seconds = train(name, split, args.epochs, args.batch_size,
                               args.seed)
        path = os.path.join(args.out, f"{name}.keras")
        replace_file(path, model.save)
        metrics[name] = {
            "file": os.path.basename(path),
            "data": split.name,
            "test_accuracy": round(rc.accuracy(model, split), 4),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "train_seconds": round(seconds, 1),
            "parameters": int(model.count_params()),
            "batch_normalization_layers": sum(
                isinstance(l, keras.layers.BatchNormalization)
                for l in model.layers),
            "file_bytes": os.path.getsize(path),
        }
        print(json.dumps({name: metrics[name]}, indent=1))
    write_bytes(metrics_path, (json.dumps(metrics, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
