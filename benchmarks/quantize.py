"""int8 against float ONNX of the reference models, and int8 of our folded
export against int8 of a plain export of the same model.

For each reference model in ``models/`` (converted with ``rc.convert``; the
shipped weights are trained on Fashion-MNIST):

  float        rc.export_onnx(model, path)                       (baseline)
  int8         rc.export_onnx(model, path, quantize="int8",
               calibration=256 training images)
  plain float  model.export(path, format="onnx"): Keras's own tf2onnx export,
               no folding (a Mul and an Add per normalization)
  plain int8   that file through `rc.quantize_onnx`, the same settings
               as quantize="int8" (onnxruntime's static QDQ, per-channel
               int8 weights, uint8 activations, MinMax calibration on the
               same 256 images in batches of 16, after `quant_pre_process`)

Reported: top-1 accuracy of each file on the 10,000 Fashion-MNIST test
images, file size, and onnxruntime latency at batch 1 and 32 as the median
over interleaved rounds (every file runs once per round, in turn, the order
rotating from round to round), with the ratio to the float file measured in
the same run.

Example::

    python benchmarks/quantize.py            # about 2 minutes on 2 cores
"""

import os
import sys
import tempfile

import _common as common



def measure(split, work, rounds):
    """Writes the four files of each reference model into `work` and
    prints their table."""
    import numpy as np
    import onnxruntime as ort

    import renorm_convert as rc

    for name in common.REFERENCE_MODELS:
        model = rc.convert(common.load_reference(name))
        shape = rc.data.model_image_shape(model)
        calibration = np.asarray(rc.data.adapt(split.x_train, shape))
        test = np.asarray(rc.data.adapt(split.x_val, shape))
        files = {k: os.path.join(work, f"{name}_{k.replace(' ', '_')}.onnx")
                 for k in ("float", "int8", "plain float", "plain int8")}
        rc.export_onnx(model, files["float"])
        rc.export_onnx(model, files["int8"], quantize="int8",
                       calibration=calibration)
        model.export(files["plain float"], format="onnx", verbose=False)
        rc.quantize_onnx(files["plain float"], files["plain int8"],
                         calibration)
        sessions = {k: ort.InferenceSession(
            f, providers=["CPUExecutionProvider"]) for k, f in files.items()}
        accuracy = {}
        for k, s in sessions.items():
            feed = s.get_inputs()[0].name
            pred = np.concatenate([s.run(None, {feed: test[i:i + 500]})[0]
                                   for i in range(0, len(test), 500)])
            accuracy[k] = float((pred.argmax(-1) == split.y_val).mean())
        latency = {}
        for batch in (1, 32):
            x = test[:batch]
            times = {k: [] for k in sessions}
            for s in sessions.values():
                s.run(None, {s.get_inputs()[0].name: x})
            for _, order in common.round_robin(sessions, rounds):
                for k in order:
                    s = sessions[k]
                    feed = {s.get_inputs()[0].name: x}
                    times[k] += common.time_calls(lambda: s.run(None, feed), 1)
            latency[batch] = {k: 1000 * float(np.median(v))
                              for k, v in times.items()}
        print(f"\n{name}")
        print(f"  {'file':<12} {'accuracy':>9} {'MB':>6} "
              f"{'ms b=1':>8} {'vs float':>8} {'ms b=32':>8} {'vs float':>8}")
        for k in files:
            print(f"  {k:<12} {100 * accuracy[k]:>8.2f}% "
                  f"{os.path.getsize(files[k]) / 1e6:>6.2f} "
                  f"{latency[1][k]:>8.3f} "
                  f"{latency[1][k] / latency[1]['float']:>7.2f}x "
                  f"{latency[32][k]:>8.3f} "
                  f"{latency[32][k] / latency[32]['float']:>7.2f}x",
                  flush=True)


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=256)
    args = parser.parse_args(argv)

    import renorm_convert as rc

    split = rc.data.load_source("fashion-mnist").subset(
        train=args.calibration, seed=0)
    with tempfile.TemporaryDirectory(prefix="renorm-quantize-") as work:
        measure(split, work, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
