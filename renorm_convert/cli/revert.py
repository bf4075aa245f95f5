"""Turn every BatchRenormalization of MODEL back into a plain
BatchNormalization (current moving statistics), so the model can be used
without this package; write it to -o OUT.keras."""

from renorm_convert.cli import _args
from renorm_convert.cli._args import EXIT_OK
from renorm_convert.cli._common import check_model_path, load_model, parity
from renorm_convert.cli._paths import check_output
from renorm_convert.errors import RenormConvertError

HELP = "BatchRenormalization -> BatchNormalization"


def add_arguments(p):
    _args.model_input(p)
    _args.output(p, ".keras")


def check(args):
    check_output(args.output, [args.model], (".keras",))
    check_model_path(args.model)


def run(args):
    import renorm_convert as rc
    from renorm_convert.io import save_atomically

    model = load_model(args)
    report = rc.revert_plan(model)
    reverted = rc.revert(model)
    if not report.swapped:
        raise RenormConvertError(
            f"{args.model}: no BatchRenormalization layer to "
            "revert; nothing written.")
    diff, rel = parity(model, reverted)
    save_atomically(reverted, args.output)
    print(f"reverted {len(report.swapped)} layers to BatchNormalization")
    print(f"inference parity: max abs diff {diff:.3g} "
          f"({rel:.3g} of the output scale)")
    print(f"wrote {args.output}")
    return EXIT_OK
