"""The parity gate: a refused bundle is never written; an allowed one records why; validate re-measures it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from cw_export.errors import ParityError
from cw_export.parity import failures, gate
from cw_export.runtime.manifest import read_manifest


def numbers(graph_db=40.0, step_db=(40.0, 35.0), ratio=1.0):
    return {"graphs": {"low_res": {"sqnr_db": graph_db}, "high_res_in": {"sqnr_db": 50.0}},
            "steps": [{"step": i, "kind": "full", "latent_psnr_db": db, "guidance_ratio": ratio}
                      for i, db in enumerate(step_db)],
            "final_latent_psnr_db": step_db[-1]}


THRESHOLDS = SimpleNamespace(graph_min_sqnr_db=30.0, step_min_psnr_db=30.0, final_latent_min_psnr_db=30.0,
                             guidance_ratio_tolerance=0.05)


def test_gate_names_worst_graph_and_step():
    assert failures(numbers(), THRESHOLDS) == []
    with pytest.raises(ParityError, match=r"worst graph low_res.*worst step 2 .*--allow-low-parity"):
        gate(numbers(graph_db=20.0, step_db=(31.0, 25.0)), THRESHOLDS, allow_low_parity=False)
    verdict = gate(numbers(ratio=0.8), THRESHOLDS, allow_low_parity=True)
    assert not verdict["passed"] and verdict["allowed_by_flag"] and "guidance ratio" in verdict["failures"][0]


def test_refused_gate_leaves_nothing_at_out(tmp_path, low_parity_bundle, quant):
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="worst graph"):
        quant.build(quant.small_recipe(graph_min_sqnr_db=200.0, final_latent_min_psnr_db=200.0), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"


def test_allowed_bundle_records_precision_parity_and_session_options(low_parity_bundle):
    manifest = read_manifest(low_parity_bundle)
    parity = manifest["parity"]
    assert parity["gate"] == {"passed": False, "allowed_by_flag": True, "failures": parity["gate"]["failures"]}
    assert parity["gate"]["failures"]
    for name in ("high_res_in", "low_res", "high_res_out"):
        entry = manifest["graphs"][name]
        assert entry["precision"] == "w8a16" and entry["quantization"]["backend"] == "ort"
        assert entry["quantization"]["reason"]
        assert 25.0 < parity["graphs"][name]["sqnr_db"] < 200.0
    assert manifest["graphs"]["text_encoder"]["precision"] == "fp32"
    assert "text encoder" in manifest["graphs"]["text_encoder"]["quantization"]["reason"]
    assert len(parity["steps"]) == 8 and all(0.9 < r["guidance_ratio"] < 1.1 for r in parity["steps"])
    assert parity["final_latent_psnr_db"] == parity["steps"][-1]["latent_psnr_db"] > 25.0
    assert manifest["session_options"] == parity["session_options"] == {
        "graph_optimization_level": "basic", "disabled_optimizers": []}
    calibration = manifest["calibration"]
    assert calibration["num_prompts"] == 2 and calibration["seeds"] == [0, 1] and calibration["steps"] == 8


def test_validate_remeasures_the_manifest_numbers(low_parity_bundle, capsys):
    """Manifest numbers equal re-measured numbers (validate recomputes them from the source model)."""
    from cw_export.cli import main

    assert main(["validate", str(low_parity_bundle)]) == 0
    out = capsys.readouterr().out
    assert "PASS  quantized parity re-measured" in out
    assert "written with --allow-low-parity" in out


def test_validate_detects_changed_numbers(low_parity_bundle, tmp_path):
    from cw_export.parity import compare

    manifest = read_manifest(low_parity_bundle)
    recorded = manifest["parity"]
    tampered = json.loads(json.dumps(recorded))
    tampered["graphs"]["low_res"]["sqnr_db"] += 1.0
    assert compare(recorded, recorded) == []
    assert "low_res SQNR" in compare(tampered, recorded)[0]


def test_runtime_runs_the_quantized_bundle_with_recorded_options(low_parity_bundle):
    from cw_export.runtime.pipeline import BundleRunner

    runner = BundleRunner(low_parity_bundle)
    hidden, pooled = runner.encode_prompt("a red square")
    noise = np.random.default_rng(0).standard_normal(runner.latent_shape(), dtype=np.float32)
    trajectory = runner.generate(hidden, pooled, noise)
    assert np.isfinite(trajectory.latents).all()
    import onnxruntime as ort

    session = runner.session("low_res")
    assert session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
