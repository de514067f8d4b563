"""Session settings every bundle session gets (cw_export.runtime.sessions)."""

from __future__ import annotations

from cw_export.export.to_onnx import ort_session
from cw_export.runtime.pipeline import BundleRunner


def test_bundle_sessions_run_without_the_cpu_memory_arena(fp32_bundle):
    """An arena keeps each session's peak activations for the session's lifetime, one session per graph (measured:
    SD 1.5 bundle at 256x256, peak RSS 4.94 GiB with it, 2.02 GiB without); every bundle session must go without."""
    runner = BundleRunner(fp32_bundle)
    for graph in ("text_encoder", "high_res_in", "low_res", "high_res_out"):
        assert runner.session(graph).get_session_options().enable_cpu_mem_arena is False, graph
    export_check = ort_session(fp32_bundle / "graphs" / "low_res.onnx")  # the export's parity session
    assert export_check.get_session_options().enable_cpu_mem_arena is False
