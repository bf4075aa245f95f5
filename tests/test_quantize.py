"""int8 and float16 ONNX of a trained reference model, on real images."""

import os

import keras
import numpy as np
import onnx
import pytest

import renorm_convert as rc
from renorm_convert import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained():
    if not os.path.isdir(data.FASHION_MNIST_DIR) and not os.environ.get("CI"):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    model = rc.convert(keras.models.load_model(
        os.path.join(ROOT, "models", "resnet_fmnist.keras")))
    split = data.load_fashion_mnist().subset(train=256, val=500, seed=0)
    shape = data.model_image_shape(model)
    return (model, np.asarray(data.adapt(split.x_train, shape)),
            np.asarray(data.adapt(split.x_val, shape)), split.y_val)


def test_int8_keeps_accuracy_and_is_smaller(trained, tmp_path):
    model, calibration, x, y = trained
    report = rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8",
                            calibration=calibration, verify=x, labels=y)
    assert report.quantized == "int8"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "BatchNormalization" not in ops
    assert report.file_size < 0.5 * report.float_file_size
    # The float file is verified against Keras as always.
    assert report.logits_relative_diff <= 1e-5
    # int8 against float, on validation images calibration never saw.
    assert report.int8_top1_agreement >= 0.95
    assert report.float_accuracy >= 0.85
    assert report.int8_accuracy >= report.float_accuracy - 0.02
    assert report.int8_latency_ms > 0 and report.float_latency_ms > 0


def test_int8_needs_calibration(trained, tmp_path):
    model = trained[0]
    with pytest.raises(rc.ExportError, match="needs calibration="):
        rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8")
    with pytest.raises(rc.ExportError, match="calibration=: inputs"):
        rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8",
                       calibration=np.zeros((4, 5, 5, 1), "float32"))
    assert not (tmp_path / "q.onnx").exists()


def test_float16_within_its_tolerance(trained, tmp_path):
    model, _, x, y = trained
    report = rc.export_onnx(model, tmp_path / "h.onnx", precision="float16",
                            verify=x[:64])
    saved = onnx.load(str(tmp_path / "h.onnx"))
    types = {i.data_type for i in saved.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    # Inputs and outputs stay float32.
    assert saved.graph.input[0].type.tensor_type.elem_type == \
        onnx.TensorProto.FLOAT
    assert report.tolerance == rc.export.FLOAT16_TOLERANCE
    assert report.logits_relative_diff <= report.tolerance
    assert report.top1_agreement >= 0.95


def test_quantize_onnx_is_export_int8_for_any_file(trained, tmp_path):
    import onnxruntime

    model, calibration, x, _ = trained
    rc.export_onnx(model, tmp_path / "f.onnx", verify=False)
    rc.export_onnx(model, tmp_path / "q.onnx", quantize="int8",
                   calibration=calibration, verify=False)
    rc.quantize_onnx(tmp_path / "f.onnx", tmp_path / "again.onnx",
                     calibration)

    def run(name):
        session = onnxruntime.InferenceSession(
            str(tmp_path / name), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x[:64]})[0]

    # Same settings, same calibration, same float model: the same int8 file.
    np.testing.assert_array_equal(run("again.onnx"), run("q.onnx"))
    assert not np.array_equal(run("again.onnx"), run("f.onnx"))
    with pytest.raises(rc.ExportError, match="1 input"):
        rc.quantize_onnx(tmp_path / "f.onnx", tmp_path / "x.onnx",
                         [calibration, calibration])
    assert not (tmp_path / "x.onnx").exists()
