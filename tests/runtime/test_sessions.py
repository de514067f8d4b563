"""Session settings every bundle session gets (cw_export.runtime.sessions)."""

from __future__ import annotations

from cw_export.export.to_onnx import ort_session
from cw_export.runtime.pipeline import BundleRunner


def test_build_sessions_go_without_an_arena_and_the_runner_shares_one(fp32_bundle):
    """A per-session arena keeps each session's peak activations for the session's lifetime, one session per graph
    (measured: SD 1.5 bundle at 256x256, peak RSS 4.94 GiB with it, 2.02 GiB without): the build's sessions go
    without. The runtime's sessions share one arena registered in onnxruntime's environment (high-res graphs
    10-20% faster than without an arena, docs/benchmarks.md); ``arena="off"`` gives the build's setting."""
    import pytest

    from cw_export.errors import InputError
    from cw_export.runtime.sessions import session_options

    shared, off = BundleRunner(fp32_bundle), BundleRunner(fp32_bundle, arena="off")
    for graph in ("text_encoder", "high_res_in", "low_res", "high_res_out"):
        assert shared.session(graph).get_session_options().get_session_config_entry(
            "session.use_env_allocators") == "1", graph
        options = off.session(graph).get_session_options()
        assert options.enable_cpu_mem_arena is False, graph
        with pytest.raises(RuntimeError, match="does not have configuration"):  # no entry: the session's own
            options.get_session_config_entry("session.use_env_allocators")
    export_check = ort_session(fp32_bundle / "graphs" / "low_res.onnx")  # the export's parity session
    assert export_check.get_session_options().enable_cpu_mem_arena is False
    with pytest.raises(InputError, match="arena setting 'per-session' unknown"):
        session_options(arena="per-session")


def test_the_shared_arena_changes_no_bit_of_the_trajectory(fp32_bundle):
    import numpy as np

    shared, off = BundleRunner(fp32_bundle), BundleRunner(fp32_bundle, arena="off")
    hidden, pooled = off.encode_prompt("a red square")
    noise = np.random.default_rng(7).standard_normal(off.latent_shape(), dtype=np.float32)
    for clock in (1, 2):
        a = shared.generate(hidden, pooled, noise, steps=4, clock=clock)
        b = off.generate(hidden, pooled, noise, steps=4, clock=clock)
        assert [s.tobytes() for s in a.step_latents] == [s.tobytes() for s in b.step_latents], clock
        assert a.latents.tobytes() == b.latents.tobytes() and a.guidance_ratios == b.guidance_ratios, clock


def test_thread_count_is_a_speed_setting_only(fp32_bundle):
    """``BundleRunner(threads=N)`` sets every session's intra-op threads and changes no bit of the trajectory."""
    import numpy as np

    default, one = BundleRunner(fp32_bundle), BundleRunner(fp32_bundle, threads=1)
    assert one.session("low_res").get_session_options().intra_op_num_threads == 1
    hidden, pooled = default.encode_prompt("a red square")
    noise = np.random.default_rng(5).standard_normal(default.latent_shape(), dtype=np.float32)
    for clock in (1, 2):
        a = default.generate(hidden, pooled, noise, steps=4, clock=clock)
        b = one.generate(hidden, pooled, noise, steps=4, clock=clock)
        assert a.latents.tobytes() == b.latents.tobytes(), clock
        assert [s.tobytes() for s in a.step_latents] == [s.tobytes() for s in b.step_latents], clock


def test_repeated_images_reuse_the_step_plan_bit_for_bit(fp32_bundle):
    """The step table and time features are computed once per runner and step count; a second image, another step
    count in between, and a fresh runner give the same bytes (and the shared time features are read-only)."""
    import numpy as np
    import pytest

    runner = BundleRunner(fp32_bundle)
    hidden, pooled = runner.encode_prompt("a blue circle")
    noise = np.random.default_rng(6).standard_normal(runner.latent_shape(), dtype=np.float32)
    seen = []
    first = runner.generate(hidden, pooled, noise, steps=4, clock=2,
                            on_step=lambda i, kind, slots: seen.append(slots["time_features"]))
    runner.generate(hidden, pooled, noise, steps=3, clock=1)
    again = runner.generate(hidden, pooled, noise, steps=4, clock=2)
    fresh = BundleRunner(fp32_bundle).generate(hidden, pooled, noise, steps=4, clock=2)
    assert first.latents.tobytes() == again.latents.tobytes() == fresh.latents.tobytes()
    with pytest.raises(ValueError):
        seen[0][0, 0] = 1.0
