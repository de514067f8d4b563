"""Export stage: torch graph wrappers (``wrappers``) and ONNX export with torch-vs-onnxruntime parity (``to_onnx``)."""
