"""Every keras.applications constructor with BatchNormalization goes through
convert, revert, save / load and fold with its inference output unchanged
within the tolerance its own measured sensitivity justifies (see
tests/zoo_models.py); one model per family also through the ONNX export in
onnxruntime (the export of every model is benchmarks/zoo.py's job: it takes
8 to 35 s a model).

One model per family runs by default; the family's other sizes (the same
blocks, more of them: 8 to 40 s each, 9 minutes together) are marked
`full_zoo` and run with `ALL=1 bash scripts/test.sh` (or `-m full_zoo`)."""

import gc
import re

import keras
import pytest

import zoo_models

# One per family: each has its own block structure (and export path).
EXPORTED = {
    "DenseNet121", "EfficientNetB0", "EfficientNetV2B0", "InceptionV3",
    "MobileNet", "MobileNetV2", "MobileNetV3Small", "NASNetMobile",
    "ResNet50", "ResNet50V2", "Xception",
}
# Families whose export only benchmarks/zoo.py runs, and why.
EXPORTED_BY_BENCHMARK = {
    "InceptionResNet": "its 55 M weights through tf2onnx's graph freezing "
                       "and grappler peak at 6 GB, more than the suite's "
                       "memory budget",
}


def test_zoo_lists_every_family():
    assert len(zoo_models.ZOO) >= 33
    assert EXPORTED <= set(zoo_models.ZOO)
    assert {family(name) for name in zoo_models.ZOO} == {
        family(name) for name in EXPORTED} | set(EXPORTED_BY_BENCHMARK)


def family(name):
    """ResNet101V2 -> ResNet, EfficientNetB3 -> EfficientNet."""
    return re.sub(r"(\d.*|[VB]\d.*|Small|Large|Mobile)$", "", name)


# The default run's model of each family: the one exported, and
# InceptionResNetV2 (its family's only member).
DEFAULT = EXPORTED | {"InceptionResNetV2"}


def test_the_default_run_covers_every_family():
    assert {family(name) for name in DEFAULT} == {
        family(name) for name in zoo_models.ZOO}


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    name if name in DEFAULT else pytest.param(name, marks=pytest.mark.full_zoo)
    for name in zoo_models.ZOO])
def test_zoo_model_whole_path(name, tmp_path):
    keras.backend.clear_session()
    gc.collect()
    r = zoo_models.check(name, str(tmp_path), export=name in EXPORTED)
    assert r["bn"] > 0
    # Every normalization layer is converted, then folded or listed with
    # its reason.
    assert r["converted"] == r["bn"]
    assert r["folded"] + len(r["unfolded"]) == r["bn"]
    assert all(r["unfolded"].values())
    # Conversion and revert copy weights exactly: the same float32
    # arithmetic, so no tolerance beyond rounding order.
    assert r["convert"] <= 1e-6, r
    assert r["revert"] <= 1e-6, r
    assert r["load"] <= 1e-6, r
    # Folding rewrites weights in float32: within the model's tolerance.
    assert r["fold"] <= r["tolerance"], r
    if name in EXPORTED:
        # The export folds what fold_plan planned, and onnxruntime's output
        # is the original Keras model's within the same tolerance.
        assert r["exported_folded"] == r["folded"], r
        assert r["onnx"] <= r["tolerance"], r
