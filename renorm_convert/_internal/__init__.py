"""Private plumbing: every Keras / TensorFlow / tf2onnx hook, backend differences, option limits, log filtering."""
