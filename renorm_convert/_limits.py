"""Bounds that the command line checks while it parses its arguments, before
TensorFlow loads: this module imports nothing heavy."""

# tf2onnx 1.17 converts these opsets and onnxruntime runs what it writes;
# below 9, tf2onnx leaves variables as graph inputs (measured).
MIN_OPSET, MAX_OPSET = 9, 18
