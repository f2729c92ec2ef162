"""Generated code for the KServe v2 / Open Inference Protocol (proto/inference); see gatecast.codegen."""
