"""Numpy + onnxruntime runtime for cw-export bundles; imports only numpy, onnxruntime and the standard library."""
