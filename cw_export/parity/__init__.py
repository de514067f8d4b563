"""Parity stage: quantized-vs-FP32 numbers measured in onnxruntime (``measure``), the gate, and the build's stage."""
