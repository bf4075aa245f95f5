"""How large is Figure 3's effect with our code? A study over architectures
and run lengths, 3 seeds each, paired by seed.

Each cell is ``renorm-convert reproduce non-iid --model M --steps S --seeds
3`` (Fashion-MNIST, batches of 32 made of 2 classes x 16, Adam 1e-3 cut x0.1
at 75 %, momentum 0.9, validation on 2000 i.i.d. test images): batch norm
(``BatchRenormalization`` held at r_max 1, d_max 0) and batch renorm
(``RenormSchedule.for_run``) from the same initialisation per seed. For every
cell it prints the final accuracy of both arms per seed, the paired
difference (mean, min, max), the accuracy of both arms in training mode
(i.i.d. test batches normalized by their own statistics: the paper's
mechanism), and the wall time of the whole cell.

Architectures (``renorm_convert.train.reproduce.MODELS``), shallowest first:
``cnn-plain`` (three blocks of one convolution, global pooling),
``cnn`` (two blocks of two convolutions, batch-normalized dense head),
``cnn-deep`` (three blocks of two convolutions, batch-normalized dense head).

The rule for the default of ``reproduce non-iid``, fixed before the study
ran: the deepest architecture at the longest run length studied whose
default run (3 seeds, both arms) finishes within 15 minutes on 2 CPU cores
(the cell's wall time on at most 2 threads, a bound). Not the largest
gain.

Results go to ``--out`` (one JSON per cell; a cell already there is not
run again, so an interrupted study resumes) and the table to stdout.

Example::

    python benchmarks/figure3.py --threads 1        # about 30 minutes
"""

import json
import os
import sys
import time

import _common as common

MODELS = ("cnn-plain", "cnn", "cnn-deep")
LENGTHS = (1500, 3000)
BUDGET_S = 15 * 60


def main(argv=None):
    parser = common.parser(__doc__)
    parser.add_argument("--out", default="runs/figure3_study")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--steps", nargs="+", type=int, default=list(LENGTHS))
    parser.add_argument("--seeds", type=int, default=3)
    common.add_threads(parser, "TensorFlow threads (0: all cores)")
    args = parser.parse_args(argv)

    common.set_threads(args.threads)
    from renorm_convert.train import reproduce

    os.makedirs(args.out, exist_ok=True)
    rows = []
    for steps in args.steps:
        for model in args.models:
            path = os.path.join(args.out, f"{model}_{steps}.json")
            if not os.path.exists(path):
                print(f"{model}, {steps} steps ...", flush=True)
                start = time.perf_counter()
                result = reproduce.run(reproduce.Config(
                    "non-iid", steps=steps, seeds=args.seeds, model=model),
                    progress=lambda line: print("  " + line, flush=True))
                result["wall_s"] = time.perf_counter() - start
                result["threads"] = args.threads or os.cpu_count()
                with open(path + ".tmp", "w") as f:
                    json.dump(result, f)
                os.replace(path + ".tmp", path)
            with open(path) as f:
                rows.append(summary(json.load(f)))
    print(table(rows))
    print(choose_default(rows))


def summary(result):
    """One table row of a reproduce result."""
    cfg = result["config"]
    last_step = max(c["step"] for c in result["curves"])
    final = {}
    for c in result["curves"]:
        if c["step"] == last_step:
            final.setdefault(c["variant"], {})[c["seed"]] = c
    seeds = sorted(final["batch norm"])
    bn = [100 * final["batch norm"][s]["val_accuracy"] for s in seeds]
    rn = [100 * final["batch renorm"][s]["val_accuracy"] for s in seeds]
    diff = [r - b for r, b in zip(rn, bn)]

    def train_mode(variant):
        return [100 * final[variant][s]["val_accuracy_batch_statistics"]
                for s in seeds]

    return {"model": cfg["model"], "steps": cfg["steps"], "bn": bn, "rn": rn,
            "diff": diff, "bn_train_mode": train_mode("batch norm"),
            "rn_train_mode": train_mode("batch renorm"),
            "wall_s": result["wall_s"], "threads": result["threads"]}


def _mean(values):
    return sum(values) / len(values)


def table(rows):
    lines = ["| model | steps | batch norm per seed | batch renorm per seed "
             "| renorm - norm: mean (min, max) | training mode: norm / "
             "renorm | wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = lambda v: " / ".join(f"{x:.1f}" for x in v)  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['steps']} | {per_seed(r['bn'])} % "
            f"| {per_seed(r['rn'])} % | {_mean(r['diff']):+.1f} "
            f"({min(r['diff']):+.1f}, {max(r['diff']):+.1f}) | "
            f"{_mean(r['bn_train_mode']):.1f} / "
            f"{_mean(r['rn_train_mode']):.1f} % | "
            f"{r['wall_s'] / 60:.1f} min on {r['threads']} thread(s) |")
    return "\n".join(lines)


def choose_default(rows):
    """The stated rule: deepest model, then longest run, that fits."""
    def fits(r):
        return r["threads"] <= 2 and r["wall_s"] <= BUDGET_S

    ranked = sorted(rows, key=lambda r: (MODELS.index(r["model"])
                                         if r["model"] in MODELS else -1,
                                         r["steps"]), reverse=True)
    for r in ranked:
        if fits(r):
            return (f"default by the rule: --model {r['model']} --steps "
                    f"{r['steps']} ({r['wall_s'] / 60:.1f} min on "
                    f"{r['threads']} thread(s))")
    return "no cell fits the 15-minute budget"


if __name__ == "__main__":
    sys.exit(main())
