"""Accuracy after a short fine-tune, with the moving statistics as training
left them and recalibrated (`rc.recalibrate`, exact averages of the batch
moments over training batches with the final weights).

For each reference model in ``renorm_convert/reference/``, as it is (batch norm) and
converted (batch renorm), and each normalization momentum (0.99, Keras's
default, and 0.9): ``fine_tune``
for ``--epochs`` on ``--train-size`` Fashion-MNIST training images (Adam
1e-3, batch 32, seed 0), then top-1 accuracy on the full 10,000-image
Fashion-MNIST test set of the trained model, and of
``rc.recalibrate(trained, split, batches=--batches)``.

Example::

    python benchmarks/recalibrate.py              # about 6 minutes on 2 cores
"""

import sys

import _common as common


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--batches", type=int, default=100,
                        help="training batches for recalibration")
    args = parser.parse_args(argv)

    import renorm_convert as rc

    split = rc.data.load_source("fashion-mnist")
    train = split.subset(train=args.train_size, seed=0)
    print(f"{'model':<18} {'normalization':<14} {'momentum':>8} "
          f"{'trained':>8} {'recalibrated':>12}")
    for name in common.REFERENCE_MODELS:
        model = common.load_reference(name)
        for arm, start in (("batch norm", model),
                           ("batch renorm", rc.convert(model))):
            for momentum in (0.99, 0.9):
                history = rc.fine_tune(start, train, epochs=args.epochs,
                                       momentum=momentum, seed=0, verbose=0)
                trained = history.trained_model
                recalibrated = rc.recalibrate(trained, train,
                                              batches=args.batches)
                print(f"{name:<18} {arm:<14} {momentum:>8} "
                      f"{100 * rc.accuracy(trained, split):>7.2f}% "
                      f"{100 * rc.accuracy(recalibrated, split):>11.2f}%",
                      flush=True)


if __name__ == "__main__":
    sys.exit(main())
