"""Calibration capture: every graph gets its real inputs at exactly the steps where the runtime runs it."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from cw_export.contract.graphs import make_wiring
from cw_export.calibrate.collect import CalibrationData, collect, graph_steps, settings_for, stratified_selection
from cw_export.contract.manifest import read_manifest

PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_EXPORT_CACHE", str(tmp_path / "cache"))


def learned_manifest(manifest: dict) -> dict:
    """The FP32 bundle's manifest rewired for a learned adaptor (zero-initialised: numerically the identity)."""
    m = copy.deepcopy(manifest)
    shapes = {s["name"]: s["shape"] for g in ("high_res_in", "low_res") for s in m["graphs"][g]["outputs"]}
    pooled = [m["batch"], m["graphs"]["text_encoder"]["outputs"][1]["shape"][-1]]
    m["graphs"]["adaptor"] = {
        "inputs": [{"name": "r_in", "shape": shapes["r_in"], "dtype": "float32"},
                   {"name": "r_out_prev", "shape": shapes["r_out"], "dtype": "float32"},
                   {"name": "temb", "shape": shapes["temb"], "dtype": "float32"},
                   {"name": "pooled_text", "shape": pooled, "dtype": "float32"}],
        "outputs": [{"name": "r_out", "shape": shapes["r_out"], "dtype": "float32"}]}
    num_skips = sum(1 for s in m["graphs"]["high_res_in"]["outputs"] if s["name"].startswith("skip_"))
    m["wiring"] = make_wiring(num_skips, "learned")
    m["adaptor"] = {"kind": "learned"}
    return m


def capture(model, manifest, cap=64, prompts=PROMPTS):
    from cw_export.calibrate.stage import tokenizer_fn
    from cw_export.export.torch_graphs import torch_graphs

    settings = settings_for(manifest, model.source["sha256"], prompts, seed=0, samples_per_graph=cap)
    return collect(manifest, torch_graphs(model, manifest), tokenizer_fn(model), prompts, settings)


def test_each_graph_sees_inputs_only_at_its_steps(tiny_model, fp32_bundle):
    manifest = learned_manifest(read_manifest(fp32_bundle))
    data = capture(tiny_model, manifest)
    full, clocked = [0, 2, 4, 6], [1, 3, 5, 7]  # 8 steps, clock 2
    assert sorted(set(data.graphs["low_res"].steps)) == full
    assert sorted(set(data.graphs["adaptor"].steps)) == clocked
    assert sorted(set(data.graphs["high_res_in"].steps)) == list(range(8))
    assert len(data.graphs["high_res_in"]) == 8 * len(PROMPTS)  # cond and uncond are one [2, ...] sample
    sample = next(iter(data.graphs["low_res"]))
    assert set(sample) == {"r_in", "temb", "encoder_hidden_states"}
    assert sample["r_in"].shape[0] == 2
    adaptor = next(iter(data.graphs["adaptor"]))
    assert set(adaptor) == {"r_in", "r_out_prev", "temb", "pooled_text"}


def test_captured_inputs_are_the_trajectory_values(tiny_model, fp32_bundle):
    """low_res's r_in at (prompt, step) is exactly high_res_in's output on the high_res_in sample of that step;
    the second step's time features are those of the sampler table's second timestep (so the capture follows the
    real loop)."""
    from cw_export.export.torch_graphs import torch_graphs

    manifest = read_manifest(fp32_bundle)
    data = capture(tiny_model, manifest)
    graphs = torch_graphs(tiny_model, manifest)
    hri, low = data.graphs["high_res_in"], data.graphs["low_res"]
    hri_by_name = {p.name: p for p in hri.files}
    for path in low.files:
        feeds = CalibrationData.load(hri_by_name[path.name])
        temb, r_in = graphs["high_res_in"].run(["temb", "r_in"], feeds)
        lr = CalibrationData.load(path)
        np.testing.assert_allclose(lr["r_in"], r_in, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lr["temb"], temb, rtol=1e-5, atol=1e-6)
    from cw_export.runtime.time_features import sinusoidal_time_features

    step1 = [CalibrationData.load(f) for f, s in zip(hri.files, hri.steps) if s == 1][0]
    t1 = manifest["sampler"]["step_table"]["timesteps"][1]
    expected = sinusoidal_time_features(np.full(2, t1), manifest["time_features"])
    np.testing.assert_array_equal(step1["time_features"], expected)


def test_cap_is_stratified_over_steps(tiny_model, fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    data = capture(tiny_model, manifest, cap=4)
    for graph, reader in data.graphs.items():
        if graph not in graph_steps(manifest, 8, 2):  # text encoder, VAE decoder: one sample per prompt
            assert len(reader) == len(PROMPTS), graph
            continue
        assert len(reader) == 4
        steps = graph_steps(manifest, 8, 2)[graph]
        assert len(set(reader.steps)) == min(4, len(steps)), graph  # spread over steps, not the first ones
    keep = stratified_selection(num_prompts=10, steps=[0, 2, 4, 6], cap=8)
    assert sorted(s for _, s in keep) == [0, 0, 2, 2, 4, 4, 6, 6]
    assert len({p for p, _ in keep}) > 2  # different prompts at different steps
    # fewer samples than steps: the kept steps span the schedule (found at SD 1.5 size: 1 prompt, 4 samples kept
    # steps 0-3 only, and the late steps' activations fell outside the calibrated ranges: 13.8 dB instead of ~45)
    assert sorted(s for _, s in stratified_selection(1, list(range(8)), 4)) == [0, 2, 4, 6]
    assert sorted(s for _, s in stratified_selection(1, list(range(8)), 3)) == [0, 3, 6]
    assert sorted(s for _, s in stratified_selection(2, list(range(8)), 12)) == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7]


def test_cache_is_reused_and_keyed_by_settings(tiny_model, fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    first = capture(tiny_model, manifest, cap=4)
    again = capture(tiny_model, manifest, cap=4)
    assert not first.reused and again.reused and again.folder == first.folder
    other = capture(tiny_model, manifest, cap=4, prompts=PROMPTS[:1])
    assert other.folder != first.folder and not other.reused
    provenance = first.provenance()
    assert provenance["seeds"] == [0, 1] and provenance["steps"] == 8 and provenance["clock"] == 2
    assert len(provenance["prompts_sha256"]) == 64


def test_reader_protocol(tiny_model, fp32_bundle):
    data = capture(tiny_model, read_manifest(fp32_bundle), cap=4).graphs["low_res"]
    seen = []
    while (item := data.get_next()) is not None:
        seen.append(item)
    assert len(seen) == 4 and data.get_next() is None
    data.rewind()
    assert data.get_next() is not None
    assert len(data.subset(2)) == 2
