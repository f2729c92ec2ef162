"""gatecast: gated recurrent forecasters, trained with PyTorch and served over gRPC on onnxruntime.

This package holds what training and serving share and what never needs torch: the generated
API (`gatecast.v1`), the model manifest, and the command line.
"""

__version__ = "0.1.0"
