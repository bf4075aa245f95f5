"""From measurements to advice: the findings (each with the number it
rests on), one conclusion, and the settings to train with.

The thresholds come from the validation study `benchmarks/diagnose.py`
(settings of the paper's Figures 2 and 3 whose renorm gain was measured
with the same seeds); the README shows its table.
"""

import math

# The headline score (the output shift of the user's batching; see
# `Diagnosis.score`) above which renorm gained in the study: measured on
# the models batch norm had trained, every setting where renorm gained at
# least 1 point scored 0.20 or more, every other 0.14 or less (11 of 11
# classified right at the midpoint). Untrained networks score lower with
# non-i.i.d. batches and higher with microbatches (README).
SHIFT_HELPS = 0.17
# Recalibrating the statistics gains at least this many top-1 points on
# the diagnosed examples (and lowers the loss): they are stale. Short
# fine-tunes of batch-norm models gain 1.2-1.4 points from it (README,
# benchmarks/recalibrate.py).
STALE_POINTS = 1.0
# Fewer batches than this never give a conclusion about batching.
MIN_BATCHES = 4
# Runs shorter than this many steps want momentum 0.9: 0.99 averages over
# ~100 steps of weights moving fast (the README's recalibration table).
SHORT_RUN_STEPS = 20_000

HELPS = "renorm likely helps"
FINE = "batch norm is fine here"
STALE = "your moving statistics are stale: recalibrate first"
TOO_FEW = "too few batches to tell"
NO_NORMALIZATION = "no normalization layer: nothing to diagnose"


def stability(score, se, count):
    """None when the score is known well enough to compare with
    SHIFT_HELPS, else (why, batches that would do)."""
    if count < MIN_BATCHES:
        return (f"{count} batch{'es' if count != 1 else ''}, fewer than "
                f"{MIN_BATCHES}", MIN_BATCHES)
    margin = abs(score - SHIFT_HELPS)
    if 2.0 * se <= margin:
        return None
    needed = count * (2.0 * se / max(margin, 1e-3)) ** 2
    return (f"the score {score:.3f} +/- {2 * se:.3f} (2 standard errors "
            f"over {count} batches) straddles the threshold "
            f"{SHIFT_HELPS:g}", min(int(math.ceil(needed)), 10_000))


def conclude(diagnosis):
    """(verdict, stale, findings): the verdict on the batching (HELPS,
    FINE or TOO_FEW), whether the moving statistics are stale (a
    conclusion of its own: recalibrate first, whatever the batching), and
    the findings, lines of text each with its number."""
    modes, gaps = diagnosis.modes, diagnosis.gaps
    findings = [
        f"output shift with your batching {diagnosis.score:.3f} (+/- "
        f"{diagnosis.score_se:.3f}), with i.i.d. batches of the same size "
        f"{diagnosis.iid_score:.3f}; in the validation study renorm gained "
        f"1 point or more where batch-norm models scored above "
        f"{SHIFT_HELPS:g} (benchmarks/diagnose.py)",
        f"top-1 in training mode with your batching "
        f"{_pct(modes['training_batching']['top1'])}, with i.i.d. batches "
        f"of the same size {_pct(modes['training_iid']['top1'])}, in "
        f"inference mode {_pct(modes['inference']['top1'])} (inference "
        f"minus your batching: {gaps['inference_minus_batching']:+.1f} "
        "points)",
    ]
    worst = diagnosis.worst_layers(1)
    if worst:
        layer = worst[0]
        findings.append(
            f"worst layer {layer.path}: d {_range(layer.d)}, r "
            f"{_range(layer.r)}; alone in training mode it shifts the "
            f"outputs by {_number(layer.contribution)}")
    drifted = max(diagnosis.layers, key=lambda l: max(l.drift.values()))
    findings.append(
        f"moving statistics against the data's: up to "
        f"{drifted.drift['mean']:.2f} sigma in the mean and "
        f"{100 * drifted.drift['stddev']:.0f}% in sigma ({drifted.path}); "
        f"recalibrated, top-1 is {_pct(modes['recalibrated']['top1'])} "
        f"({gaps['recalibrated_minus_inference']:+.1f} points)")
    # Top-1 on a few hundred examples moves in steps of a fraction of a
    # point: the loss must agree.
    stale = (gaps["recalibrated_minus_inference"] >= STALE_POINTS
             and modes["recalibrated"]["loss"] < modes["inference"]["loss"])
    unstable = stability(diagnosis.score, diagnosis.score_se,
                         diagnosis.settings["batches"])
    if unstable is not None:
        findings.append(f"not stable: {unstable[0]}; about {unstable[1]} "
                        "batches would tell")
        return TOO_FEW, stale, findings
    return (HELPS if diagnosis.score >= SHIFT_HELPS else FINE), stale, \
        findings


def conclusion(diagnosis):
    """The conclusion in one line, with the numbers it rests on."""
    if diagnosis.verdict == TOO_FEW:
        text = f"{TOO_FEW} (score {diagnosis.score:.3f} +/- " \
               f"{diagnosis.score_se:.3f})"
    else:
        text = f"{diagnosis.verdict} (score {diagnosis.score:.3f}, " \
               f"threshold {SHIFT_HELPS:g})"
    if diagnosis.stale:
        modes = diagnosis.modes
        text += (f"; {STALE} (rc.recalibrate gives top-1 "
                 f"{_pct(modes['recalibrated']['top1'])} against "
                 f"{_pct(modes['inference']['top1'])} here)")
    return text


def suggestions(settings):
    """Settings to convert and fine-tune with: microbatch size, momentum,
    and the schedule fitted to the run's length."""
    from renorm_convert.train.schedule import RenormSchedule

    steps = settings.get("steps")
    out = {"microbatch_size": settings.get("microbatch_size")}
    if steps is None:
        out["momentum"] = 0.9
        out["momentum_why"] = (f"runs shorter than {SHORT_RUN_STEPS} steps "
                               "want 0.9 (0.99 lags behind the weights); "
                               "give the run's length for a schedule")
        out["schedule"] = None
        return out
    short = steps < SHORT_RUN_STEPS
    out["momentum"] = 0.9 if short else 0.99
    out["momentum_why"] = (f"a run of {steps} steps is "
                           f"{'shorter' if short else 'not shorter'} than "
                           f"{SHORT_RUN_STEPS}")
    schedule = RenormSchedule.for_run(steps, r_max=settings["r_max"],
                                      d_max=settings["d_max"])
    out["schedule"] = {"warmup_steps": schedule.warmup_steps,
                       "d_max": schedule.d_max,
                       "d_max_steps": schedule.d_max_steps,
                       "r_max": schedule.r_max,
                       "r_max_steps": schedule.r_max_steps}
    return out


def _pct(value):
    return f"{100 * value:.1f}%"


def _number(value):
    return "(not measured)" if value is None else f"{value:.3f}"


def _range(s):
    return f"{s['median']:+.2f} [{s['p5']:+.2f}, {s['p95']:+.2f}]"
