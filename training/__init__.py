"""Training: data loading, recurrent forecasters, the training loop, evaluation and ONNX export.

Everything here may import torch; nothing in `service/` may import this package.
"""
