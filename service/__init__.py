"""The gRPC forecasting server. It runs ONNX graphs on onnxruntime and never imports torch."""
