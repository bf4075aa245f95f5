"""The keras.applications zoo through the whole path: the README's table.

For every keras.applications constructor with BatchNormalization (built with
``weights=None`` at a small input, 10 classes, logits out; moving statistics
calibrated by one training-mode pass over 64 random images so activations
stay in range), this runs convert, revert, save / load, fold and the ONNX
export, and prints one row per model:

  BN         BatchNormalization layers in the model
  conv.      how many `rc.convert` swapped
  folded     normalization layers folded into a Conv / Dense
  affine     left as a per-channel scale and offset (ChannelAffine),
             grouped by reason
  convert/clone  time of `rc.convert` over `keras.models.clone_model` of the
             same model in the same run (convert also copies every weight)
  parity     worst relative inference difference of converted, reverted,
             reloaded, folded and ONNX (onnxruntime) against the original
  tol.       10x the model's measured sensitivity (relative output change for
             a 1e-7 relative random change of every weight), at least 1e-5:
             what a float32 rewrite of the weights may move its output by

Examples::

    python benchmarks/zoo.py                        # every model, ~25 min
    python benchmarks/zoo.py --models ResNet50 MobileNetV3Small
    python benchmarks/zoo.py --no-export            # skip tf2onnx, ~8 min
"""

import collections
import gc
import json
import os
import re
import sys
import tempfile

import _common as common

sys.path.insert(0, os.path.join(common.ROOT, "tests"))


def _reason_kind(reason):
    """A reason without layer names, to group by."""
    for pattern, kind in ((r"comes from (\w+)", None),
                          (r"other consumers", "producer feeds others"),
                          (r"non-linear activation", "after an activation"),
                          (r"model input", "on a model input"),
                          (r"inside custom layer", "inside a custom layer")):
        match = re.search(pattern, reason)
        if match:
            return kind or f"after {match.group(1)}"
    return reason


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="constructor names (default: all with BN)")
    parser.add_argument("--no-export", action="store_true",
                        help="skip the ONNX export (the slowest step)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write every measurement here")
    args = parser.parse_args(argv)

    import keras

    import zoo_models

    names = args.models or zoo_models.ZOO
    unknown = sorted(set(names) - set(zoo_models.ZOO))
    if unknown:
        parser.error(f"not a keras.applications constructor with "
                     f"BatchNormalization: {', '.join(unknown)}")
    rows, failed = [], []
    workdir = tempfile.mkdtemp(prefix="renorm-zoo-")
    print(f"{'model':<18} {'BN':>4} {'conv.':>5} {'folded':>6} {'affine':>6}"
          f" {'convert/clone':>13} {'parity':>8} {'tol.':>8}  affine by reason",
          flush=True)
    for name in names:
        keras.backend.clear_session()
        gc.collect()
        try:
            r = zoo_models.check(name, workdir, export=not args.no_export)
        except Exception as e:  # report and go on with the others
            failed.append(name)
            print(f"{name:<18} FAILED: {type(e).__name__}: "
                  f"{' '.join(str(e).split())[:200]}", flush=True)
            continue
        keys = ["convert", "revert", "load", "fold"] + (
            [] if args.no_export else ["onnx"])
        r["parity"] = max(r[k] for k in keys)
        kinds = collections.Counter(_reason_kind(v)
                                    for v in r["unfolded"].values())
        by_reason = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
        ok = "" if r["parity"] <= r["tolerance"] else "  OVER TOLERANCE"
        print(f"{name:<18} {r['bn']:>4} {r['converted']:>5} {r['folded']:>6}"
              f" {len(r['unfolded']):>6} "
              f"{r['convert_s'] / r['clone_s']:>12.2f}x"
              f" {r['parity']:>8.1e} {r['tolerance']:>8.1e}  "
              f"{by_reason or '-'}{ok}", flush=True)
        rows.append(r)
    over = [r["model"] for r in rows if r["parity"] > r["tolerance"]]
    print(f"\n{len(rows)} of {len(names)} models through the whole path; "
          f"{len(over)} over tolerance{': ' + ', '.join(over) if over else ''}"
          f"{'; failed: ' + ', '.join(failed) if failed else ''}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed or over else 0


if __name__ == "__main__":
    sys.exit(main())
