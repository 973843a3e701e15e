"""Trained runs -> verified ONNX models in a versioned model repository (python -m export)."""
