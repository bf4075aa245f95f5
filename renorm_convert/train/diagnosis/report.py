"""A diagnosis as a result object: per-layer records, the model-level
numbers, findings, the conclusion and suggested settings; as a dict (JSON),
as text a person reads, and as a PNG."""

import dataclasses
import io
import json

from renorm_convert.io import write_atomically

# The layer table shows at most this many layers, the worst first.
TABLE_ROWS = 12
MODES = (("inference", "inference (moving statistics)"),
         ("training_batching", "training mode, your batching"),
         ("training_iid", "training mode, i.i.d. batches of that size"),
         ("recalibrated", "inference, recalibrated statistics"))


@dataclasses.dataclass
class LayerRecord:
    """One normalization layer, over every batch (group) it saw.

    `r` and `d`: median and 5-95 % range against the statistics the layer
    corrects towards (its moving statistics for batch norm), unclipped;
    `clipped_default` / `clipped`: shares of r and d values that clipping
    would change at the default bounds (r_max 3, d_max 5) and at the
    bounds asked for; `deviation`: root mean square of d and log r against
    the data's own statistics; `drift`: moving statistics against the
    data's (mean shift in sigmas, relative sigma error); `contribution`:
    the output shift when only this layer uses batch statistics (None
    where not measured)."""

    path: str
    class_name: str
    depth: int
    channels: int
    r: dict
    d: dict
    clipped_default: dict
    clipped: dict
    deviation: float
    drift: dict
    contribution: float = None


@dataclasses.dataclass
class Diagnosis:
    """What `diagnose` measured and concluded.

    `score` is the headline: how much of the model's predicted probability
    moves to other classes (`measures.output_shifts`) when every normalization
    layer uses the statistics of the user's batches instead of the data's
    own (inference after recalibration), mean over batches, with its
    standard error `score_se`; `iid_score` is the same for i.i.d. batches
    of the same size (the floor a batch of that size gives). `modes`:
    top-1 and loss per mode on the same examples; `gaps`: differences in
    top-1 points. `verdict` is the `verdict` module's conclusion about
    the batching (HELPS, FINE, TOO_FEW; NO_NORMALIZATION), `stale`
    whether the moving statistics should be recalibrated first, and
    `conclusion` says both in one line with their numbers."""

    model: str
    settings: dict
    layers: list
    modes: dict = None
    gaps: dict = None
    score: float = None
    score_se: float = None
    iid_score: float = None
    examples: int = 0
    verdict: str = None
    stale: bool = None
    conclusion: str = None
    findings: list = dataclasses.field(default_factory=list)
    suggestions: dict = None
    seconds: float = None

    @property
    def has_normalization(self):
        return bool(self.layers)

    def worst_layers(self, count=None):
        """Layers by how much they alone move the outputs, then by how far
        their statistics stray."""
        ranked = sorted(self.layers, key=lambda l: (
            -(l.contribution if l.contribution is not None else -1.0),
            -l.deviation))
        return ranked[:count]

    def as_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.as_dict(), indent=1)

    def describe(self, rows=TABLE_ROWS):
        """The diagnosis as text: settings, conclusion, findings, the
        layer table (worst first, at most `rows`), the modes, and the
        suggested settings."""
        if not self.has_normalization:
            return f"model '{self.model}': {self.conclusion}."
        s = self.settings
        lines = [f"diagnosis of '{self.model}': {s['batches']} batches of "
                 f"{s['batch_size']} ({_batching(s)}), {self.examples} "
                 "examples", f"conclusion: {self.conclusion}"]
        lines += [f"  - {text}" for text in self.findings]
        lines += ["", *self._layer_table(rows), "", *self._mode_table(),
                  "", *self._suggestion_lines()]
        return "\n".join(lines)

    def _layer_table(self, rows):
        s = self.settings
        shown = self.worst_layers(rows)
        width = max([len(l.path) for l in shown] + [5])
        columns = (("r median [5%, 95%]", 22), ("d median [5%, 95%]", 24),
                   ("clipped r/d at 3/5", 20),
                   (f"at {s['r_max']:g}/{s['d_max']:g}", 12),
                   ("drift mu / sigma", 18), ("alone", 0))
        lines = [f"normalization layers, worst first ({len(shown)} of "
                 f"{len(self.layers)}):",
                 f"{'layer':<{width}}  " + "".join(
                     f"{title:<{size}}" for title, size in columns)]
        for l in shown:
            cells = (_range(l.r), _range(l.d), _shares(l.clipped_default),
                     _shares(l.clipped),
                     f"{l.drift['mean']:.2f} / {100 * l.drift['stddev']:.0f}%",
                     "-" if l.contribution is None
                     else f"{l.contribution:.3f}")
            lines.append(f"{l.path:<{width}}  " + "".join(
                f"{cell:<{size}}" for cell, (_, size) in zip(cells,
                                                             columns)))
        return lines

    def _mode_table(self):
        lines = ["mode (same examples)                           top-1     "
                 "loss"]
        for key, label in MODES:
            mode = self.modes[key]
            lines.append(f"{label:<46} {100 * mode['top1']:6.2f}%  "
                         f"{mode['loss']:7.4f}")
        return lines

    def _suggestion_lines(self):
        g = self.suggestions
        micro = g["microbatch_size"]
        lines = ["suggested settings: microbatch "
                 + ("none" if micro is None else str(micro))
                 + f", momentum {g['momentum']:g} ({g['momentum_why']})"]
        plan = g["schedule"]
        if plan is not None:
            lines.append(
                f"  schedule: {plan['warmup_steps']} steps at r_max 1, "
                f"d_max 0, then d_max -> {plan['d_max']:g} by step "
                f"{plan['d_max_steps']} and r_max -> {plan['r_max']:g} by "
                f"step {plan['r_max_steps']}")
        return lines

    def write_plot(self, path):
        """A PNG: per-layer r and d ranges against depth with the clipping
        bounds, and the top-1 of each mode."""
        write_atomically(path, _figure_png(self))


def _batching(s):
    parts = [f"{s['non_iid_classes']} classes per batch"
             if s["non_iid_classes"] else "i.i.d."]
    parts.append(f"microbatches of {s['microbatch_size']}"
                 if s["microbatch_size"] else "no microbatches")
    return ", ".join(parts)


def _range(s):
    return f"{s['median']:.2f} [{s['p5']:.2f}, {s['p95']:.2f}]"


def _shares(shares):
    return f"{100 * shares['r']:.0f}% / {100 * shares['d']:.0f}%"


def _figure_png(diagnosis):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = diagnosis.settings
    layers = sorted(diagnosis.layers, key=lambda l: l.depth)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8),
                             gridspec_kw={"width_ratios": [1, 1, 0.8]})
    for ax, key, default, asked in ((axes[0], "r", 3.0, s["r_max"]),
                                    (axes[1], "d", 5.0, s["d_max"])):
        _ranges(ax, layers, key)
        bounds = [(default, "--", f"clip bound, default {default:g}")]
        if asked != default:
            bounds.append((asked, ":", f"clip bound asked, {asked:g}"))
        for bound, style, label in bounds:
            low = 1.0 / bound if key == "r" else -bound
            ax.axhline(bound, color="tab:red", ls=style, label=label)
            ax.axhline(low, color="tab:red", ls=style)
        # The bounds sit far out; a log (r) or symmetric log (d) axis
        # keeps both them and the ranges, usually near 1 and 0, legible.
        if key == "r":
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=0.5)
        ax.legend(fontsize=7, loc="upper right")
    _modes(axes[2], diagnosis)
    fig.suptitle(f"'{diagnosis.model}' ({_batching(s)}): "
                 f"{diagnosis.conclusion}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _ranges(ax, layers, key):
    """Each layer's 5-95 % range of r or d as a bar, its median a dot."""
    depth = [l.depth for l in layers]
    values = [getattr(l, key) for l in layers]
    ax.vlines(depth, [v["p5"] for v in values], [v["p95"] for v in values],
              lw=4, alpha=0.6, label="5-95 % over batches and channels")
    ax.plot(depth, [v["median"] for v in values], "k.", label="median")
    ax.set(xlabel="normalization layer, in depth order", ylabel=key,
           title=f"{key} against each layer's moving statistics")
    ax.grid(alpha=0.3)


def _modes(ax, diagnosis):
    """Top-1 of each mode on the same examples, with the gaps."""
    labels = [label for _, label in MODES]
    top1 = [100 * diagnosis.modes[key]["top1"] for key, _ in MODES]
    rows = range(len(top1))[::-1]
    ax.barh(rows, top1, color=["tab:blue", "tab:orange", "tab:green",
                               "tab:gray"])
    ax.set_yticks(rows, labels, fontsize=8)
    for row, value in zip(rows, top1):
        ax.text(value, row, f" {value:.1f}%", va="center", fontsize=8)
    ax.set_xlim(0, 112)
    gaps = diagnosis.gaps
    ax.set(xlabel="top-1 (%) on the same examples",
           title=f"modes: inference minus your batching "
                 f"{gaps['inference_minus_batching']:+.1f} points,\n"
                 f"score {diagnosis.score:.3f} (i.i.d. batches "
                 f"{diagnosis.iid_score:.3f})")
    ax.title.set_fontsize(9)
