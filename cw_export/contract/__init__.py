"""What a bundle is, shared by the build side and the runtime: the graphs and their wiring, the clock schedule and
the manifest's canonical bytes. Standard library only (no torch, no onnx), so the runtime can import it."""
