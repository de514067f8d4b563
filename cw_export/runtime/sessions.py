"""onnxruntime sessions for bundle graphs, per execution provider.

``cpu`` is plain onnxruntime. Session options are returned with the session so that what parity was measured
under can be recorded (onnxruntime's graph optimisations change QDQ numerics; PLATFORM.md).
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import InputError

PROVIDERS = ("cpu",)


def session_options(disabled_optimizers: list[str] | None = None, threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def create_session(path: Path, provider: str = "cpu", options: ort.SessionOptions | None = None):
    """An InferenceSession for one graph file on the named provider."""
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider '{provider}'; available: {', '.join(PROVIDERS)}")
    return ort.InferenceSession(str(path), options or session_options(), providers=["CPUExecutionProvider"])
