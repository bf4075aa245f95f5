"""int8 ONNX: onnxruntime's static quantization (QDQ, per-channel int8
weights, uint8 activations) of a float ONNX model, after the layout rule of
`int8_layout` (narrow Convs widened with zeros, Concat inputs sharing their
output's scale). `export_onnx(..., quantize="int8")` calls it on the
folded float file; `quantize_onnx` on any file."""

import os

import numpy as np

from renorm_convert.errors import ExportError
from renorm_convert.io import write_atomically


def quantize_int8(float_payload, xs, input_names, batch=16):
    """The int8 model (serialized) of a serialized float ONNX model, calibrated
    on the input arrays `xs` (one per name in `input_names`): onnxruntime's
    static quantization, QDQ, per-channel int8 weights, uint8 activations,
    every Conv quantized; Convs too narrow for onnxruntime's fast int8 kernel
    are widened with zeros first (`int8_layout`: exact, checked on `xs`), and
    Concat inputs share their output's scale (QLinearConcat then copies)."""
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([
                {name: x[i:i + batch] for name, x in zip(input_names, xs)}
                for i in range(0, len(xs[0]), batch)])

        def get_next(self):
            return next(self._batches, None)

    import onnx

    from renorm_convert.onnx.int8_layout import (share_concat_scales,
                                                 widened_payload)

    float_payload = widened_payload(float_payload, [x[:batch] for x in xs])
    with tempfile.TemporaryDirectory(prefix="renorm-convert-int8-") as work:
        source = os.path.join(work, "float.onnx")
        with open(source, "wb") as f:
            f.write(float_payload)
        prepared = os.path.join(work, "prepared.onnx")
        try:  # shape inference and graph clean-up, as onnxruntime advises
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
        except Exception:
            prepared = source
        target = os.path.join(work, "int8.onnx")
        try:
            quantize_static(prepared, target, Reader(),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        except Exception as e:
            text = " ".join(str(e).split())[:200]
            raise ExportError(f"onnxruntime could not quantize the model: "
                              f"{type(e).__name__}: {text}") from None
        quantized = onnx.load(target)
    share_concat_scales(quantized)
    return quantized.SerializeToString()


def quantize_onnx(source, path, calibration):
    """Quantizes any float ONNX file `source` to int8 at `path` (written
    atomically) with `export_onnx(..., quantize="int8")`'s settings
    (onnxruntime's static quantization, QDQ, per-channel int8 weights,
    uint8 activations), calibrated on `calibration`: an array (a list of
    arrays for several inputs) as the file's inputs take them. For files
    made elsewhere, e.g. to compare with Keras's own export."""
    import onnx

    model = onnx.load(str(source))
    names = [i.name for i in model.graph.input]
    xs = calibration if isinstance(calibration, (list, tuple)) else [
        calibration]
    if len(xs) != len(names):
        raise ExportError(f"{{arg}}: {len(xs)} array(s) for a file with "
                          f"{len(names)} input(s) {names}.", "calibration",
                          f"{len(xs)} array(s)", quote=False)
    payload = quantize_int8(model.SerializeToString(),
                            [np.asarray(x, np.float32) for x in xs], names)
    write_atomically(path, payload)
