"""renorm-convert: Batch Renormalization for existing Keras models.

Convert every BatchNormalization of a Keras model to BatchRenormalization
(keeping all weights and statistics), fine-tune it with the paper's r_max /
d_max schedule, and export it to ONNX with the normalization folded away.

Exit status: 0 success, 2 bad input or usage (one line says what and how to
fix it), 1 internal error.
"""

import argparse
import json
import os
import sys
import time

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


def _quiet_tensorflow():
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


def _progress(message):
    print(f"[renorm-convert] {message}", file=sys.stderr, flush=True)


def _load(args, path=None):
    from renorm_convert.io import import_custom_objects, load

    if getattr(args, "unsafe", False):
        _progress("warning: --unsafe: Python code in Lambda layers of the file "
                  "will run.")
    custom = import_custom_objects(getattr(args, "custom_objects", None))
    path = path or args.model
    _progress(f"loading {path}")
    return load(path, safe_mode=not getattr(args, "unsafe", False),
                custom_objects=custom)


def _layer_options(args):
    options = {}
    for key in ("r_max", "d_max", "renorm_momentum", "microbatch"):
        value = getattr(args, key, None)
        if value is not None:
            options["microbatch_size" if key == "microbatch" else key] = value
    return options


def _parity(reference, other, model):
    """Max abs inference difference on random inputs, and relative to the
    output scale."""
    import numpy as np

    from renorm_convert.export import sample_inputs

    xs = sample_inputs(model, batch=4)
    xs = xs[0] if len(xs) == 1 else xs
    import keras

    a = keras.tree.flatten(reference(xs, training=False))
    b = keras.tree.flatten(other(xs, training=False))
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(a, b))
    scale = max(float(np.abs(np.asarray(x)).max()) for x in a)
    return diff, diff / max(scale, 1e-12)


# --- subcommands ------------------------------------------------------------------

def cmd_inspect(args):
    """List every normalization layer of MODEL: its path, the layer producing
    its input, channels, and whether it can be folded for export."""
    from renorm_convert.fold import fold_plan
    from renorm_convert.graph import GraphError

    model = _load(args)
    try:
        plan = fold_plan(model)
    except GraphError as e:
        raise _usage(str(e))
    rows = [{
        "path": p["path"],
        "class": type(p["layer"]).__name__,
        "producer": p["producer"],
        "channels": p["channels"],
        "foldable": p["foldable"],
        "reason": p["reason"],
    } for p in plan]
    totals = {
        "normalization_layers": len(rows),
        "batch_normalization": sum(r["class"] == "BatchNormalization"
                                   for r in rows),
        "batch_renormalization": sum(r["class"] == "BatchRenormalization"
                                     for r in rows),
        "foldable": sum(r["foldable"] for r in rows),
        "layers": len(model._flatten_layers(include_self=False,
                                            recursive=True)),
        "parameters": int(model.count_params()),
    }
    if args.json:
        print(json.dumps({"model": model.name, "layers": rows,
                          "totals": totals}, indent=2))
        return EXIT_OK
    width = max([len(r["path"]) for r in rows] + [4])
    pwidth = max([len(r["producer"]) for r in rows] + [8])
    print(f"{'path':<{width}}  {'class':<20}  {'producer':<{pwidth}}  "
          f"{'channels':>8}  foldable")
    for r in rows:
        fold = "yes" if r["foldable"] else f"no: {r['reason']}"
        print(f"{r['path']:<{width}}  {r['class']:<20}  "
              f"{r['producer']:<{pwidth}}  {r['channels']:>8}  {fold}")
    print(f"\n{totals['normalization_layers']} normalization layers "
          f"({totals['batch_normalization']} BatchNormalization, "
          f"{totals['batch_renormalization']} BatchRenormalization), "
          f"{totals['foldable']} foldable; {totals['layers']} layers, "
          f"{totals['parameters']:,} parameters.")
    return EXIT_OK


def cmd_convert(args):
    """Swap every BatchNormalization of MODEL for a BatchRenormalization that
    keeps all its weights and statistics; write the result to -o OUT.keras and
    print the measured inference parity."""
    import renorm_convert as rc
    from renorm_convert.io import check_output, save_atomically

    check_output(args.output, [args.model], (".keras",))
    model = _load(args)
    _progress("converting")
    start = time.perf_counter()
    try:
        converted = rc.convert(model, include=args.include,
                               exclude=args.exclude, **_layer_options(args))
    except ValueError as e:
        raise _usage(str(e))
    elapsed = time.perf_counter() - start
    if not converted.renorm_converted:
        already = len(rc.schedule.renorm_layers(model))
        hint = (f" ({already} are BatchRenormalization already)"
                if already else "")
        selection = " matching --include/--exclude" if (
            args.include or args.exclude) else ""
        raise _usage(f"{args.model}: no BatchNormalization layer{selection} "
                     f"to convert{hint}; nothing written.")
    diff, rel = _parity(model, converted, model)
    save_atomically(converted, args.output)
    print(f"converted {len(converted.renorm_converted)} BatchNormalization "
          f"layers to BatchRenormalization in {elapsed:.2f} s")
    print(f"inference parity: max abs diff {diff:.3g} "
          f"({rel:.3g} of the output scale)")
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_revert(args):
    """Turn every BatchRenormalization of MODEL back into a plain
    BatchNormalization (current moving statistics), so the model can be used
    without this package; write it to -o OUT.keras."""
    import renorm_convert as rc
    from renorm_convert.io import check_output, save_atomically

    check_output(args.output, [args.model], (".keras",))
    model = _load(args)
    reverted = rc.revert(model)
    if not reverted.renorm_reverted:
        raise _usage(f"{args.model}: no BatchRenormalization layer to revert; "
                     "nothing written.")
    diff, rel = _parity(model, reverted, model)
    save_atomically(reverted, args.output)
    print(f"reverted {len(reverted.renorm_reverted)} layers to "
          "BatchNormalization")
    print(f"inference parity: max abs diff {diff:.3g} "
          f"({rel:.3g} of the output scale)")
    print(f"wrote {args.output}")
    return EXIT_OK


def cmd_export(args):
    """Export MODEL to ONNX with every foldable normalization folded into the
    preceding Conv/Dense layer, and (unless --no-verify) check the file with
    onnxruntime against Keras."""
    import renorm_convert as rc
    from renorm_convert.io import check_output

    check_output(args.output, [args.model], (".onnx",))
    model = _load(args)
    _progress("folding and converting with tf2onnx")
    start = time.perf_counter()
    report = rc.export_onnx(model, args.output, opset=args.opset,
                            verify=not args.no_verify)
    elapsed = time.perf_counter() - start
    print(format_export_report(report, elapsed))
    return EXIT_OK


def format_export_report(report, elapsed=None):
    lines = [f"wrote {report.path} ({report.file_size / 1e6:.2f} MB, opset "
             f"{report.opset}" + (f", {elapsed:.1f} s)" if elapsed else ")")]
    lines.append(f"folded {report.folded} normalization layers into their "
                 f"Conv/Dense; {len(report.unfolded)} kept as per-channel "
                 "scale-and-offset")
    for path, reason in report.unfolded.items():
        lines.append(f"  not folded: {path}: {reason}")
    ops = ", ".join(f"{k} {v}" for k, v in report.op_counts.items())
    lines.append(f"ONNX ops: {ops}")
    if report.max_abs_diff is not None:
        lines.append(f"onnxruntime vs Keras: max abs diff "
                     f"{report.max_abs_diff:.3g} ({report.relative_diff:.3g} "
                     "of the output scale)")
    return "\n".join(lines)


# --- parser ---------------------------------------------------------------------

class _Usage(Exception):
    pass


def _usage(message):
    return _Usage(message)


def _add_load_options(p):
    p.add_argument("--unsafe", action="store_true",
                   help="allow Lambda layers' Python code in the file to run "
                        "(Keras's safe_mode=False); only for files you trust")
    p.add_argument("--custom-objects", metavar="MODULE", action="append",
                   help="import this module (e.g. mypkg.layers) so the custom "
                        "layers it defines can be loaded; repeatable")


def _add_layer_options(p):
    p.add_argument("--r-max", type=float, dest="r_max",
                   help="r is clipped to [1/r_max, r_max] (default 3)")
    p.add_argument("--d-max", type=float, dest="d_max",
                   help="d is clipped to [-d_max, d_max] (default 5)")
    p.add_argument("--renorm-momentum", type=float, dest="renorm_momentum",
                   help="momentum of the renorm statistics (default 0.99)")
    p.add_argument("--microbatch", type=int, metavar="M",
                   help="normalize groups of M examples separately in "
                        "training (the paper's microbatches)")


def _doc(func):
    return func.__doc__.strip()


def build_parser():
    parser = argparse.ArgumentParser(
        prog="renorm-convert", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from renorm_convert import __version__

    parser.add_argument("--version", action="version",
                        version=f"renorm-convert {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="list normalization layers",
                       description=_doc(cmd_inspect))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_load_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="BatchNormalization -> "
                       "BatchRenormalization", description=_doc(cmd_convert))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.keras")
    _add_layer_options(p)
    p.add_argument("--include", metavar="RE",
                   help="convert only layers whose name matches RE")
    p.add_argument("--exclude", metavar="RE",
                   help="do not convert layers whose name matches RE")
    _add_load_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("revert", help="BatchRenormalization -> "
                       "BatchNormalization", description=_doc(cmd_revert))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.keras")
    _add_load_options(p)
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("export", help="ONNX with folded normalization",
                       description=_doc(cmd_export))
    p.add_argument("model", metavar="MODEL", help=".keras or .h5 file")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--opset", type=int, help="ONNX opset (tf2onnx's default "
                   "when omitted)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the onnxruntime-versus-Keras check")
    _add_load_options(p)
    p.set_defaults(func=cmd_export)

    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _quiet_tensorflow()
    from renorm_convert.convert import ConversionError
    from renorm_convert.export import ExportError
    from renorm_convert.io import UsageError

    from renorm_convert._logs import filtered_stderr

    try:
        with filtered_stderr():
            return args.func(args)
    except (_Usage, UsageError, ConversionError, ExportError) as e:
        print(f"renorm-convert {args.command}: error: {_one_line(e)}",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"renorm-convert {args.command}: interrupted; no output was "
              "written", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"renorm-convert {args.command}: error: {_one_line(e)}",
              file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # an internal error: say so, briefly
        if os.environ.get("RENORM_CONVERT_DEBUG"):
            raise
        print(f"renorm-convert {args.command}: internal error: "
              f"{_one_line(e)} (set RENORM_CONVERT_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(error):
    text = " ".join(str(error).split())
    return text if len(text) <= 400 else text[:397] + "..."


if __name__ == "__main__":
    sys.exit(main())
