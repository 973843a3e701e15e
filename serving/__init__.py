"""The rnnserve server: ONNX Runtime models behind dynamic batching, KServe V1/V2 REST, metrics."""
