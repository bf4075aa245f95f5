"""Swap every BatchNormalization of MODEL for a BatchRenormalization that
keeps all its weights and statistics; write the result to -o OUT.keras and
print the measured inference parity. The bounds given here are the layers'
own; `finetune` replaces them with its schedule unless told not to
(--schedule off)."""

import time

from renorm_convert.cli import _args, progress
from renorm_convert.cli._args import EXIT_OK
from renorm_convert.cli._common import check_model_path, load_model, parity
from renorm_convert.cli._paths import check_output
from renorm_convert.errors import RenormConvertError

HELP = "BatchNormalization -> BatchRenormalization"


def add_arguments(p):
    _args.model_input(p)
    _args.output(p, ".keras")
    _args.layer_options(p)
    g = p.add_argument_group("which layers")
    _args.option(g, "--include", metavar="RE",
                 help="convert only layers whose name matches RE")
    _args.option(g, "--exclude", metavar="RE",
                 help="do not convert layers whose name matches RE")


def check(args):
    check_output(args.output, [args.model], (".keras",))
    check_model_path(args.model)


def run(args):
    import renorm_convert as rc
    from renorm_convert.io import save_atomically

    model = load_model(args)
    progress("converting")
    start = time.perf_counter()
    report = rc.convert_plan(model, include=args.include,
                             exclude=args.exclude)
    converted = rc.convert(model, include=args.include, exclude=args.exclude,
                           **_args.layer_kwargs(args))
    elapsed = time.perf_counter() - start
    if not report.swapped:
        already = len(rc.renorm_layers(model))
        hint = (f" ({already} are BatchRenormalization already)"
                if already else "")
        selection = " matching --include/--exclude" if (
            args.include or args.exclude) else ""
        raise RenormConvertError(f"{args.model}: no BatchNormalization layer"
                        f"{selection} to convert{hint}; nothing written.")
    diff, rel = parity(model, converted)
    save_atomically(converted, args.output)
    print(f"converted {len(report.swapped)} BatchNormalization layers to "
          f"BatchRenormalization in {elapsed:.2f} s")
    print(f"inference parity: max abs diff {diff:.3g} "
          f"({rel:.3g} of the output scale)")
    print(f"wrote {args.output}")
    return EXIT_OK
