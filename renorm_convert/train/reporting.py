"""Run records for people: a fine-tuning run's history (CSV per epoch and
per step, JSON) and its PNG, and an experiment's curves (CSV, JSON, PNG).
Every file is written atomically."""

import csv
import io as _io
import json
import os

import numpy as np

from renorm_convert.io import write_atomically


def history_prefix(path):
    """A records prefix without the ".csv" / ".json" a user may give."""
    prefix = os.fspath(path)
    for suffix in (".csv", ".json"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return prefix


def history_files(path):
    """The three files `write_history` writes for the prefix `path`."""
    base = history_prefix(path)
    return [base + suffix for suffix in (".csv", ".steps.csv", ".json")]


def write_history(epochs, steps, curve, path):
    """PATH.csv (per epoch), PATH.steps.csv (per step) and PATH.json of a
    run whose per-epoch history is `epochs` ({metric: [values]}), per-step
    log `steps` and validation curve `curve`."""
    per_epoch, per_step, whole = history_files(path)
    keys = list(epochs)
    rows = [{"epoch": i + 1, **{k: epochs[k][i] for k in keys
                                if i < len(epochs[k])}}
            for i in range(len(epochs.get("loss", [])))]
    write_atomically(per_epoch, _csv(rows))
    write_atomically(per_step, _csv(steps))
    payload = {"epochs": rows, "steps": steps, "validation_curve": curve}
    write_atomically(whole, json.dumps(payload, indent=1).encode())


def _csv(rows):
    buffer = _io.StringIO()
    if rows:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        # LF line ends, as every other file we write (csv writes CRLF).
        writer = csv.DictWriter(buffer, fieldnames=fields,
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue().encode()


def plot_history(epochs, steps, curve, curve_size, path, title=None):
    """A PNG of the run: training loss per step; validation accuracy from
    step 0 (the model before fine-tuning, marked) at a few points in every
    epoch, with the training accuracy per epoch; r_max / d_max per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    if steps:
        x = [s["step"] for s in steps]
        axes[0].plot(x, [s.get("loss") for s in steps], lw=0.8)
        axes[2].plot(x, [s.get("r_max", 1.0) for s in steps], label="r_max")
        axes[2].plot(x, [s.get("d_max", 0.0) for s in steps], label="d_max")
        axes[2].legend()
    axes[0].set(xlabel="training step", ylabel="loss (running mean in epoch)",
                title="training loss")
    axes[2].set(xlabel="training step", ylabel="bound",
                title="renorm clipping bounds r_max / d_max")
    ax = axes[1]
    if curve:
        ax.plot([p["step"] for p in curve],
                [100 * p["val_accuracy"] for p in curve], marker=".",
                color="tab:red",
                label=f"validation, {curve_size} images (inference mode)")
        for point, text, marker in ((curve[0], "before", "*"),
                                    (curve[-1], "after", "D")):
            ax.plot([point["step"]], [100 * point["val_accuracy"]],
                    marker=marker, markersize=12 if marker == "*" else 7,
                    color="black", linestyle="none",
                    label=f"{text} fine-tuning: "
                          f"{100 * point['val_accuracy']:.2f}%")
    epoch_steps = _epoch_end_steps(steps, len(epochs.get("loss", [])))
    if "accuracy" in epochs:
        values = epochs["accuracy"]
        ax.plot(epoch_steps[:len(values)], [100 * v for v in values],
                marker="o", color="tab:blue",
                linestyle="--" if len(values) > 1 else "none",
                label="training batches, per epoch (training mode)")
    ax.set(xlabel="training step", ylabel="top-1 accuracy (%)",
           title="accuracy during fine-tuning (step 0: the model as given)")
    ax.legend(fontsize=8, loc="lower right")
    for axis in axes:
        axis.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_atomically(path, _png(fig, dpi=90))


def _epoch_end_steps(steps, n_epochs):
    ends = {}
    for s in steps:
        ends[s["epoch"]] = s["step"]
    return [ends.get(e, e + 1) for e in range(n_epochs)]


def write_experiment(result, prefix):
    """PREFIX.csv (curves), PREFIX.json (everything), PREFIX.png (plot) of a
    `reproduce.run` result; returns the paths."""
    write_atomically(prefix + ".csv", _csv(result["curves"]))
    write_atomically(prefix + ".json", json.dumps(result, indent=1).encode())
    write_atomically(prefix + ".png", _png(experiment_figure(result), dpi=100))
    return [prefix + s for s in (".csv", ".json", ".png")]


def _png(fig, dpi):
    import matplotlib.pyplot as plt

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def _title(result):
    cfg = result["config"]
    what = (f"microbatches of {cfg['microbatch']}"
            if cfg["experiment"] == "microbatch" else
            f"non-i.i.d. batches: {cfg['classes_per_batch']} classes x "
            f"{cfg['batch_size'] // cfg['classes_per_batch']}")
    seeds = (f"mean ± std over {cfg['seeds']} seeds" if cfg["seeds"] > 1
             else "one seed")
    return [f"{cfg['data']}, model {cfg.get('model', 'cnn')}, batch "
            f"{cfg['batch_size']}, {what}",
            f"{cfg['steps']} steps; {seeds}"]


def experiment_figure(result):
    """The matplotlib figure of an experiment: validation accuracy of both
    arms against steps, and the paper's final accuracies as dashed lines."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"batch norm": "tab:blue", "batch renorm": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for variant, colour in colours.items():
        rows = [c for c in result["curves"] if c["variant"] == variant]
        if not rows:
            continue
        steps = sorted({r["step"] for r in rows})
        acc = [np.array([r["val_accuracy"] for r in rows
                         if r["step"] == s]) * 100 for s in steps]
        mean = np.array([a.mean() for a in acc])
        std = np.array([a.std() for a in acc])
        ax.plot(steps, mean, color=colour, marker=".", label=f"{variant} (ours)")
        ax.fill_between(steps, mean - std, mean + std, color=colour,
                        alpha=0.2)
        if all("val_accuracy_batch_statistics" in r for r in rows):
            batch = [np.mean([r["val_accuracy_batch_statistics"] for r in rows
                              if r["step"] == s]) * 100 for s in steps]
            ax.plot(steps, batch, color=colour, linestyle=":",
                    label=f"{variant}, training mode (batch statistics)")
    paper = result["paper"]
    for variant, colour in colours.items():
        if variant in paper:
            ax.axhline(paper[variant], color=colour, linestyle="--",
                       linewidth=1,
                       label=f"paper, {variant}: {paper[variant]:.1f} % "
                             "(ImageNet, final)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy (%)")
    ax.text(0.01, 0.01, "dotted: training mode (batch statistics) on "
            "i.i.d. test batches of 500", transform=ax.transAxes,
            fontsize=7, color="0.35")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    # Wrapped to the axes' width (a long dataset path or model name would
    # otherwise run off the figure's right edge).
    ax.set_title("\n".join(textwrap.fill(line, width=80)
                            for line in _title(result)), fontsize=10)
    fig.tight_layout()
    return fig
