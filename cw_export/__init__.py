"""cw-export: Clockwork-accelerated, quantized ONNX bundles of Stable Diffusion for Snapdragon NPUs.

Stages (one module each): models (load) -> split -> adaptor/distill -> calibrate -> quantize -> export -> bundle
-> runtime -> validate. ``cw_export.runtime`` imports only numpy, onnxruntime and the standard library so that a
bundle can be run where torch is not installed.
"""

__version__ = "0.1.0"
