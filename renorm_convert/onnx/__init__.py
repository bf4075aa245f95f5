"""ONNX export: per-backend conversion, graph passes, verification, int8 / float16."""
