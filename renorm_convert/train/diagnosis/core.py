"""`diagnose`: the passes over the data, and the diagnosis built from them."""

import logging
import time

import numpy as np

from renorm_convert.errors import check_integer
from renorm_convert.evaluation import check_labels_fit, outputs_probabilities
from renorm_convert.layers import (check_d_max, check_microbatch_size,
                                   check_r_max)
from renorm_convert.train.diagnosis import measures, verdict
from renorm_convert.train.diagnosis.batching import as_split, draw
from renorm_convert.train.diagnosis.probe import (Probe, normalization_paths,
                                                  reference_statistics,
                                                  working_copy)
from renorm_convert.train.diagnosis.report import Diagnosis, LayerRecord
from renorm_convert.transform.recalibration import recalibrate

_log = logging.getLogger("renorm_convert")

# Batches over which each layer's contribution is measured (one pass per
# layer and batch: the costliest part).
CONTRIBUTION_BATCHES = 2


def diagnose(model, data, *, batch_size=32, microbatch_size=None,
             non_iid_classes=None, batches=16, steps=None, r_max=3.0,
             d_max=5.0, seed=0):
    """Whether batch renormalization will help `model` on `data`, batched
    as training will batch it. Nothing is trained; `model` is not changed.

    Batch norm fails where the statistics a layer sees in training differ
    from the moving averages it uses at inference. This measures that, on
    `batches` batches drawn as `fine_tune` draws them (i.i.d., or
    `non_iid_classes` classes per batch; microbatches of
    `microbatch_size`), every normalization layer computing batch norm
    (BatchRenormalization layers held at r_max 1, d_max 0):

    * per layer: r = sigma_B / sigma and d = (mu_B - mu) / sigma against
      its statistics (median, 5-95 %), the shares clipping would change
      at the default bounds and at `r_max` / `d_max`, how far the moving
      statistics drifted from the data's, and how far the outputs move
      when only that layer uses batch statistics;
    * for the model, on the same examples: top-1 and loss in inference
      mode, in training mode with this batching, in training mode with
      i.i.d. batches of the same size, and after `recalibrate`;
    * the headline score (`Diagnosis.score`), findings, a conclusion
      ("renorm likely helps", "batch norm is fine here", "your moving
      statistics are stale: recalibrate first", "too few batches to
      tell") and settings to fine-tune with.

    Args:
        model: A Keras classifier (one image input, one output of class
            scores) with BatchNormalization or BatchRenormalization layers.
        data: A `data.Split` (its training part is read) or (images,
            labels) arrays the model takes as they are.
        batch_size: Examples per training batch.
        microbatch_size: Groups normalized on their own within each batch;
            None: each layer's own setting (none for batch norm).
        non_iid_classes: Each batch drawn from this many classes.
        batches: How many batches to measure.
        steps: The planned run's length, for the suggested momentum and
            schedule.
        r_max, d_max: The bounds to report clipped shares at (the
            schedule's final bounds).
        seed: Seeds which examples form the batches.

    Returns:
        A `Diagnosis`. A model without normalization gives one without
        layers, saying so. Progress is logged (logger "renorm_convert").

    Example:
    >>> split = rc.data.load_source("fashion-mnist")
    >>> print(rc.diagnose(model, split, non_iid_classes=2).describe())
    """
    start = time.perf_counter()
    split = as_split(data)
    settings = {"batch_size": batch_size,
                "microbatch_size": check_microbatch_size(microbatch_size),
                "non_iid_classes": non_iid_classes,
                "batches": check_integer(batches, "batches"),
                "steps": check_integer(steps, "steps",
                                       none="when the run's length is "
                                            "not known"),
                "r_max": check_r_max(r_max), "d_max": check_d_max(d_max),
                "seed": check_integer(seed, "seed", minimum=0)}
    if not normalization_paths(model):
        return Diagnosis(model.name, settings, [], stale=False,
                         verdict=verdict.NO_NORMALIZATION,
                         conclusion=verdict.NO_NORMALIZATION)
    check_labels_fit(model, split)
    examples = draw(split, model, batch_size,
                    non_iid_classes=non_iid_classes,
                    microbatch_size=settings["microbatch_size"],
                    count=settings["batches"], seed=seed)
    result = _measure(model, examples, settings)
    result.seconds = time.perf_counter() - start
    return result


def _measure(model, examples, settings):
    count = examples.count
    work = working_copy(model, settings["microbatch_size"])
    if settings["microbatch_size"] is None:
        # A converted model's layers train with their own microbatches.
        sizes = {layer.microbatch_size
                 for _, layer in normalization_paths(work)}
        settings["microbatch_size"] = sizes.pop() if len(sizes) == 1 \
            else None
    _log.info(f"diagnose: pass 1 of 5: the data's statistics (i.i.d. "
              f"batches, {count} of {examples.batch_size})")
    recalibrated = recalibrate(
        work, (examples.iid_batch(i) for i in range(count)),
        batch_size=examples.batch_size)
    data_stats = {path: reference_statistics(layer)
                  for path, layer in normalization_paths(recalibrated)}
    references = {path: reference_statistics(layer)
                  for path, layer in normalization_paths(work)}
    user = [examples.user_batch(i) for i in range(count)]
    probabilities = outputs_probabilities(model)

    def log_p(outputs):
        return measures.log_probabilities(np.concatenate(outputs),
                                          probabilities)

    with Probe(work) as probe:
        _log.info("diagnose: pass 2 of 5: training mode, your batching")
        batching = log_p(probe.outputs(user, "all", record=True))
        _log.info("diagnose: pass 3 of 5: training mode, i.i.d. batches of "
                  "the same size")
        iid = np.empty_like(batching)
        iid[examples.iid_order] = log_p(probe.outputs(
            [examples.iid_batch(i) for i in range(count)], "all"))
        _log.info("diagnose: pass 4 of 5: inference mode, with the moving "
                  "and with the data's statistics")
        inference = log_p(probe.outputs(user))
        moments = probe.moments
    with Probe(recalibrated) as probe:
        reference = log_p(probe.outputs(user))
        contributions = _contributions(probe, user, reference, log_p)
    layers = [_layer_record(depth, path, layer, moments[path],
                            references[path], data_stats[path],
                            contributions.get(path), settings)
              for depth, (path, layer) in enumerate(
                  normalization_paths(work))]
    return _diagnosis(model.name, settings, layers, examples, {
        "inference": inference, "training_batching": batching,
        "training_iid": iid, "recalibrated": reference})


def _contributions(probe, user, reference, log_p):
    """{path: output shift} with only that layer using the batch's
    statistics and every other the data's (the probe's model is the
    recalibrated one): each layer's share of the score. Over the first
    CONTRIBUTION_BATCHES batches."""
    batches = user[:CONTRIBUTION_BATCHES]
    rows = sum(len(x) for x in batches)
    paths = [path for path, _ in probe.entries]
    _log.info(f"diagnose: pass 5 of 5: each of the {len(paths)} layers "
              f"alone in training mode ({len(batches)} batches each)")
    return {path: float(measures.output_shifts(
                log_p(probe.outputs(batches, {path})),
                reference[:rows]).mean())
            for path in paths}


def _layer_record(depth, path, layer, moments, reference, data, alone,
                  settings):
    mean = np.concatenate([m for m, _ in moments])
    variance = np.concatenate([v for _, v in moments])
    eps = reference["epsilon"]
    r, d = measures.corrections(mean, variance, reference["mean"],
                                reference["stddev"], eps)
    data_sigma = np.sqrt(data["moving_variance"] + eps)
    r_data, d_data = measures.corrections(mean, variance,
                                          data["moving_mean"], data_sigma,
                                          eps)
    return LayerRecord(
        path=path, class_name=type(layer).__name__, depth=depth,
        channels=int(mean.shape[-1]), r=measures.summary(r),
        d=measures.summary(d),
        clipped_default=measures.clipped_share(r, d, 3.0, 5.0),
        clipped=measures.clipped_share(r, d, settings["r_max"],
                                       settings["d_max"]),
        deviation=measures.deviation(r_data, d_data),
        drift=measures.drift(reference["moving_mean"],
                             reference["moving_variance"],
                             data["moving_mean"], data["moving_variance"],
                             eps),
        contribution=alone)


def _diagnosis(name, settings, layers, examples, log_ps):
    modes = {}
    for key, values in log_ps.items():
        top1, loss = measures.top1_and_loss(values, examples.y)
        modes[key] = {"top1": top1, "loss": loss}
    points = {key: 100 * mode["top1"] for key, mode in modes.items()}
    gaps = {"inference_minus_batching":
            points["inference"] - points["training_batching"],
            "iid_minus_batching":
            points["training_iid"] - points["training_batching"],
            "inference_minus_iid":
            points["inference"] - points["training_iid"],
            "recalibrated_minus_inference":
            points["recalibrated"] - points["inference"]}
    shifts = measures.batch_means(measures.output_shifts(
        log_ps["training_batching"], log_ps["recalibrated"]),
        examples.batch_size)
    result = Diagnosis(
        name, settings, layers, modes=modes, gaps=gaps,
        score=float(shifts.mean()),
        score_se=float(shifts.std(ddof=1) / np.sqrt(len(shifts)))
        if len(shifts) > 1 else float("inf"),
        iid_score=float(measures.output_shifts(
            log_ps["training_iid"], log_ps["recalibrated"]).mean()),
        examples=len(examples.y))
    result.verdict, result.stale, result.findings = verdict.conclude(result)
    result.conclusion = verdict.conclusion(result)
    result.suggestions = verdict.suggestions(settings)
    return result
