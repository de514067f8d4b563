"""Calibrate stage: FP32 trajectories on prompts captured as per-graph samples (``collect``); the build's stage
(``stage``)."""
