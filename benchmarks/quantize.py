"""int8 against float ONNX of the reference models: latency in onnxruntime on
the CPU, and accuracy on the 10,000 Fashion-MNIST test images.

For each reference model in ``renorm_convert/reference/`` (converted with ``rc.convert``; the
shipped weights are trained on Fashion-MNIST):

  float   rc.export_onnx(model, path)
  int8    rc.export_onnx(model, path, quantize="int8",
          calibration=256 training images)

Latency: one onnxruntime session per file, as a user runs it
(CPUExecutionProvider, intra_op_num_threads=2 by default, thread spinning
left on), batch 32 by default. The two sessions are measured in the same
process and interleaved: every round times a block of calls of each file
(after one untimed call), the order alternating from round to round, with a
pause before each block: an onnxruntime worker thread spins for some 50 ms
after a run, and on 2 cores the spinning threads of the session just timed
would otherwise slow down the next one. Reported: the median over rounds of
each block's median, and the ratio int8 / float as the median over rounds of
the ratio within a round (the machine's slow phases fall on both files of a
round alike).

``--baseline`` adds a third file, "plain int8": onnxruntime's static
quantization with the same settings but without `renorm_convert.onnx.int8_layout`
(no widening of narrow Convs, no shared Concat scales), as `export --int8`
made it before; timed in the same rounds, it shows what the layout rule
gains.

``--profile`` also prints onnxruntime's profile of one session per file:
per op type, the time its nodes took per run (median over interleaved
rounds run as for the latency), which is where the int8 file gains or loses
against the float one.

Example::

    python benchmarks/quantize.py            # about 2 minutes on 2 cores
    python benchmarks/quantize.py --rounds 5 --profile
"""

import collections
import json
import os
import sys
import tempfile
import time

import _common as common


def feed(session, x):
    return {session.get_inputs()[0].name: x}


def accuracy(session, x, y, batch=500):
    import numpy as np

    pred = np.concatenate([session.run(None, feed(session, x[i:i + batch]))[0]
                           for i in range(0, len(x), batch)])
    return float((pred.argmax(-1) == y).mean())


def latency_ms(sessions, x, rounds, calls, pause):
    """{name: [per-round median ms]}: interleaved blocks (module doc)."""
    import numpy as np

    times = {name: [] for name in sessions}
    for _, order in common.round_robin(sessions, rounds):
        for name in order:
            session = sessions[name]
            inputs = feed(session, x)
            time.sleep(pause)  # the other session's threads stop spinning
            session.run(None, inputs)
            block = common.time_calls(lambda: session.run(None, inputs), calls)
            times[name].append(1000 * float(np.median(block)))
    return times


def profile(files, x, args, work):
    """{name: {op type: ms per run}} from onnxruntime's profiler, the files
    run in interleaved rounds as for the latency."""
    import numpy as np

    sessions = common.ort_sessions(files, args.threads,
                                   profile_dir=work)
    latency_ms(sessions, x, args.profile_rounds, args.calls, args.pause)
    out = {}
    for name, session in sessions.items():
        with open(session.end_profiling()) as f:
            events = json.load(f)
        per_node = collections.defaultdict(list)
        op_of = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_node[e["name"]].append(e["dur"])
                op_of[e["name"]] = e["args"].get("op_name", "?")
        by_op = collections.Counter()
        for node, durations in per_node.items():
            by_op[op_of[node]] += float(np.median(durations)) / 1000
        out[name] = by_op
    return out


def export_plain_int8(model, path, calibration):
    """`export_onnx(quantize="int8")` with `int8_layout` switched off."""
    import renorm_convert as rc
    from renorm_convert.onnx import int8_layout

    saved = int8_layout.widened_payload, int8_layout.share_concat_scales
    int8_layout.widened_payload = lambda payload, sample: payload
    int8_layout.share_concat_scales = lambda model: 0
    try:
        rc.export_onnx(model, path, quantize="int8", calibration=calibration)
    finally:
        int8_layout.widened_payload, int8_layout.share_concat_scales = saved


def measure(split, work, args):
    """Exports each reference model's two files into `work`, measures them
    and prints their rows; returns the rows."""
    import numpy as np

    import renorm_convert as rc

    rows = []
    for model_name in common.REFERENCE_MODELS:
        model = rc.convert(common.load_reference(model_name))
        shape = rc.data.model_image_shape(model)
        calibration = np.asarray(rc.data.adapt(split.x_train, shape))
        test = np.asarray(rc.data.adapt(split.x_val, shape))
        kinds = ("float", "int8") + (("plain",) if args.baseline else ())
        files = {k: os.path.join(work, f"{model_name}_{k}.onnx")
                 for k in kinds}
        rc.export_onnx(model, files["float"])
        rc.export_onnx(model, files["int8"], quantize="int8",
                       calibration=calibration)
        if args.baseline:
            export_plain_int8(model, files["plain"], calibration)
        sessions = common.ort_sessions(files, args.threads)
        acc = {k: accuracy(s, test, split.y_val) for k, s in sessions.items()}
        times = latency_ms(sessions, test[:args.batch], args.rounds,
                           args.calls, args.pause)
        row = {
            "model": model_name,
            "float_ms": float(np.median(times["float"])),
            "int8_ms": float(np.median(times["int8"])),
            "ratio": common.paired(times["int8"], times["float"]),
            "float_acc": acc["float"], "int8_acc": acc["int8"],
            "float_mb": os.path.getsize(files["float"]) / 1e6,
            "int8_mb": os.path.getsize(files["int8"]) / 1e6,
        }
        if args.baseline:
            row.update(plain_ms=float(np.median(times["plain"])),
                       plain_ratio=common.paired(times["plain"],
                                                 times["float"]),
                       plain_acc=acc["plain"])
        rows.append(row)
        print(f"[{model_name}] float {row['float_ms']:.2f} ms, int8 "
              f"{row['int8_ms']:.2f} ms ({row['ratio']:.2f}x), accuracy "
              f"{100 * row['float_acc']:.2f}% / {100 * row['int8_acc']:.2f}%",
              flush=True)
        if args.profile:
            ops = profile(files, test[:args.batch], args, work)
            print(f"  onnxruntime profile, ms per run by op type (medians "
                  f"over {args.profile_rounds} interleaved rounds):")
            for k, by_op in ops.items():
                total = sum(by_op.values())
                parts = ", ".join(f"{op} {ms:.2f}"
                                  for op, ms in by_op.most_common(6))
                print(f"    {k:<9} {total:6.2f} ms: {parts}")
    return rows


def print_table(rows, args):
    common.print_rule()
    print(f"int8 vs float ONNX, onnxruntime CPU, intra_op_num_threads="
          f"{args.threads}, batch {args.batch}, {args.rounds} interleaved "
          f"rounds of {args.calls} calls; accuracy on "
          f"{args.test_images} test images")
    common.print_header(f"{'model':<18} {'float ms':>9} {'int8 ms':>8} "
                        f"{'ratio':>6} {'float acc':>10} {'int8 acc':>9} "
                        f"{'MB f/i8':>10}")
    for r in rows:
        print(f"{r['model']:<18} {r['float_ms']:>9.2f} {r['int8_ms']:>8.2f} "
              f"{r['ratio']:>5.2f}x {100 * r['float_acc']:>9.2f}% "
              f"{100 * r['int8_acc']:>8.2f}% "
              f"{r['float_mb']:>4.2f}/{r['int8_mb']:.2f}")
    for r in rows:
        if "plain_ms" in r:
            print(f"  {r['model']}: plain int8 (no int8_layout) "
                  f"{r['plain_ms']:.2f} ms ({r['plain_ratio']:.2f}x float), "
                  f"accuracy {100 * r['plain_acc']:.2f}%")
    verdicts = [r["ratio"] <= 0.7 and r["int8_acc"] >= r["float_acc"] - 0.01
                for r in rows]
    for r, ok in zip(rows, verdicts):
        print(common.verdict(ok, f"{r['model']}: int8 <= 0.70x float "
                                 "latency, at most 1 point of accuracy lost"))
    print(common.overall(verdicts))


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=10,
                        help="timed calls per file per round")
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds before each block (thread spinning)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2,
                        help="onnxruntime intra_op_num_threads")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--baseline", action="store_true",
                        help="also time plain int8 (without int8_layout)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-rounds", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    import renorm_convert as rc

    split = rc.data.load_source("fashion-mnist").subset(
        train=args.calibration, seed=0)
    args.test_images = len(split.y_val)
    with tempfile.TemporaryDirectory(prefix="renorm-quantize-") as work:
        rows = measure(split, work, args)
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
