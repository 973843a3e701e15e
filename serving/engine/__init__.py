"""The inference engine: one process per device owning the ONNX Runtime sessions (engine.py)."""
