"""List every normalization layer of MODEL: its path, the layer producing its
input, channels, and whether it can be folded for export (into its producer,
or forward into the Conv / Dense layers consuming it), and why not."""

import json

from renorm_convert.cli import _args
from renorm_convert.cli._args import EXIT_OK
from renorm_convert.cli._common import check_model_path, load_model

HELP = "list normalization layers and where each folds"


def add_arguments(p):
    _args.model_input(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def check(args):
    check_model_path(args.model)


def run(args):
    import renorm_convert as rc
    from renorm_convert.transform.folding import fold_plan

    model = load_model(args, runs=False)
    plan = fold_plan(model)
    rows = [entry.as_dict() for entry in plan]
    totals = {
        "normalization_layers": len(rows),
        "batch_normalization": sum(r["class"] == "BatchNormalization"
                                   for r in rows),
        "batch_renormalization": sum(r["class"] == "BatchRenormalization"
                                     for r in rows),
        "foldable": sum(r["foldable"] for r in rows),
        "layers": len(list(rc.iter_layers(model))),
        "parameters": int(model.count_params()),
    }
    if args.json:
        print(json.dumps({"model": model.name, "layers": rows,
                          "totals": totals}, indent=2))
        return EXIT_OK
    if rows:
        width = max([len(r["path"]) for r in rows] + [4])
        pwidth = max([len(r["producer"]) for r in rows] + [8])
        print(f"{'path':<{width}}  {'class':<20}  {'producer':<{pwidth}}  "
              f"{'channels':>8}  foldable")
        for r in rows:
            fold = (f"no: {r['reason']}" if not r["foldable"]
                    else "yes" if r["into"] == "producer"
                    else "yes, forward into " + ", ".join(r["consumers"]))
            print(f"{r['path']:<{width}}  {r['class']:<20}  "
                  f"{r['producer']:<{pwidth}}  {r['channels']:>8}  {fold}")
        print()
    else:
        print(f"model '{model.name}' has no normalization layer (nothing "
              "to convert or fold).")
    print(f"{totals['normalization_layers']} normalization layers "
          f"({totals['batch_normalization']} BatchNormalization, "
          f"{totals['batch_renormalization']} BatchRenormalization), "
          f"{totals['foldable']} foldable; {totals['layers']} layers, "
          f"{totals['parameters']:,} parameters.")
    return EXIT_OK
