"""The parity gate: a refused bundle is never written; an allowed one records why; validate re-measures it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cw_export.errors import ParityError
from cw_export.parity.measure import failures, gate
from cw_export.contract.manifest import load_manifest, read_manifest


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
    assert "kept where parity requires" in manifest["graphs"]["text_encoder"]["quantization"]["reason"]
    assert len(parity["steps"]) == 8 and all(0.9 < r["guidance_ratio"] < 1.1 for r in parity["steps"])
    assert parity["final_latent_psnr_db"] == parity["steps"][-1]["latent_psnr_db"] > 25.0
    assert parity["prompt_aggregate"] == "median"  # the recipe's; one held-out prompt here
    assert parity["final_latent_psnr_db_per_prompt"] == [parity["final_latent_psnr_db"]]
    assert parity["image"]["vs_clockwork_fp32"]["psnr_db_per_prompt"] == [
        parity["image"]["vs_clockwork_fp32"]["psnr_db"]]
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
    from cw_export.parity.measure import compare

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


def test_image_parity_equals_an_independent_decode(low_parity_bundle, tiny_model):
    """The manifest's image numbers (one held-out prompt) equal PSNR/SSIM computed here from scratch: the bundle run
    by the runtime vs the torch clocked trajectory and the unclocked diffusers pipeline, both decoded by torch."""
    import torch

    from cw_export.calibrate.collect import unit_noise
    from cw_export.reference import decode_image, text_embeddings, torch_trajectory
    from cw_export.runtime.image import psnr, ssim
    from cw_export.runtime.pipeline import BundleRunner

    manifest = read_manifest(low_parity_bundle)
    parity = manifest["parity"]
    image = parity["image"]
    assert len(parity["prompts"]) == 1
    prompt, seed = parity["prompts"][0], parity["seeds"][0]
    noise = unit_noise(manifest["latent"]["shape"], seed)
    runner = BundleRunner(low_parity_bundle)
    hidden, pooled = text_embeddings(tiny_model, prompt)  # the build's parity uses the FP32 torch text encoder
    ours = runner.decode(runner.generate(hidden.numpy(), pooled.numpy(), noise).latents)
    schedule = manifest["schedule"]
    refs = {clock: decode_image(tiny_model, torch_trajectory(
        tiny_model, hidden, torch.from_numpy(noise), schedule["steps"], clock, manifest["guidance_scale"],
        manifest["sampler"]["name"]).latents) for clock in (1, schedule["clock"])}
    assert image["vs_full_fp32"]["psnr_db"] == pytest.approx(psnr(refs[1], ours), abs=0.05)
    assert image["vs_clockwork_fp32"]["psnr_db"] == pytest.approx(psnr(refs[schedule["clock"]], ours), abs=0.05)
    assert image["vs_clockwork_fp32"]["ssim"] == pytest.approx(ssim(refs[schedule["clock"]], ours), abs=1e-3)
    assert image["clockwork_fp32_vs_full_fp32"]["psnr_db"] == pytest.approx(
        psnr(refs[1], refs[schedule["clock"]]), abs=0.05)
    assert 20.0 < image["vs_clockwork_fp32"]["psnr_db"] < 200.0  # really quantized, really close
    assert parity["thresholds"]["image_min_psnr_db"] == 30.0 and parity["thresholds"]["image_min_ssim"] == 0.95


def test_image_gate_and_remeasure(low_parity_bundle):
    from cw_export.parity.measure import compare

    recorded = read_manifest(low_parity_bundle)["parity"]
    strict = SimpleNamespace(**{**vars(THRESHOLDS), "image_min_psnr_db": 200.0, "image_min_ssim": 1.01})
    found = failures(recorded, strict)
    assert any("image PSNR vs clockwork FP32" in f for f in found) and any("image SSIM" in f for f in found)
    tampered = json.loads(json.dumps(recorded))
    tampered["image"]["vs_full_fp32"]["ssim"] -= 0.01
    assert any(d.startswith("image vs_full_fp32") for d in compare(tampered, recorded))


def test_prompt_aggregate_keeps_one_chaotic_prompt_from_deciding():
    """Four prompts at 40 dB and one near a bifurcation (its latent moved 100x more): pooled MSE is decided by that
    prompt, the median is not; per-prompt values are kept either way."""
    from cw_export.parity.measure import AGGREGATES, step_table
    from cw_export.recipe import PROMPT_AGGREGATES

    assert set(AGGREGATES) == set(PROMPT_AGGREGATES)
    peak = np.ones((5, 1))
    mse = np.full((5, 1), 1e-4)
    mse[3, 0] = 1e-2
    ratios = np.array([[1.0], [1.0], [1.0], [1.5], [1.0]])
    pooled = step_table(mse, peak, ratios, ["full"], "pooled")[0]
    median = step_table(mse, peak, ratios, ["full"], "median")[0]
    assert median["latent_psnr_db"] == 40.0 and median["guidance_ratio"] == 1.0
    assert pooled["latent_psnr_db"] == pytest.approx(10 * np.log10(5 / (4e-4 + 1e-2)), abs=1e-3)  # ~26.8 dB
    assert pooled["guidance_ratio"] == pytest.approx(1.1)
    assert pooled["latent_psnr_db_per_prompt"] == median["latent_psnr_db_per_prompt"] == [40.0, 40.0, 40.0, 20.0, 40.0]


def test_recipe_rejects_unknown_prompt_aggregate():
    from cw_export.errors import RecipeError
    from cw_export.recipe import RECIPES_DIR, parse_recipe

    text = (RECIPES_DIR / "snapdragon-w8a16.toml").read_text(encoding="utf-8")
    assert 'prompt_aggregate = "median"' in text
    text = text.replace('prompt_aggregate = "median"', 'prompt_aggregate = "mean"')
    with pytest.raises(RecipeError, match="prompt_aggregate must be one of"):
        parse_recipe(text, "x.toml")


def test_a8_choice_that_fails_the_gate_falls_back_to_a16(tmp_path, quant):
    """snapdragon-int8 keeps 8-bit activations only where the bundle's gate allows: with the sweep's floors off,
    low_res goes to a8 whole (about 23 dB), the 30 dB graph gate refuses that bundle, and the build puts the a16
    low_res back, measures again and passes; the first try is recorded."""
    recipe = quant.small_recipe("snapdragon-int8").with_quantization(
        a8_min_sqnr_db=0.0, a8_min_guidance_sqnr_db=0.0, a8_layer_sweep="off")
    bundle = quant.build(recipe, tmp_path / "bundle")
    manifest = read_manifest(bundle)
    entry = manifest["graphs"]["low_res"]
    assert entry["precision"] == "w8a16" and entry["quantization"]["activation_bits"] == 16
    first = entry["quantization"]["gate_fallback"]
    assert first["precision"] == "w8a8" and first["reason"].startswith("a8: sensitivity sweep")
    assert any("low_res" in f for f in first["gate_failures"])
    assert "fell back to 16-bit" in entry["quantization"]["reason"]
    typed = load_manifest(bundle)  # the fallback's record reads back whole (one reader, one JSON form)
    assert typed.graphs["low_res"].to_dict() == entry and typed.graphs["low_res"].quantization.gate_fallback == first
    parity = manifest["parity"]
    assert parity["gate"] == {"passed": True, "failures": [], "allowed_by_flag": False}
    assert parity["graphs"]["low_res"]["sqnr_db"] >= 30.0
    import onnx

    qdq = onnx.load(str(bundle / "graphs" / "low_res.onnx"), load_external_data=False)
    bits = {n.input[2] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    zero_points = {i.name: i.data_type for i in qdq.graph.initializer if i.name in bits}
    assert onnx.TensorProto.UINT16 in zero_points.values()  # the graph on disk is the 16-bit one
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_same_input_guidance_ratio_sees_a_shrunk_guidance_signal(fp32_bundle, tiny_model):
    """A UNet whose cond output is pulled halfway to uncond has guidance ratio 0.5 at every step, measured on the
    FP32 trajectory's own step inputs (so trajectory drift cannot enter); an unchanged one has 1."""
    from cw_export.calibrate.collect import unit_noise
    from cw_export.runtime.pipeline import BundleRunner
    from cw_export.parity.measure import same_input_guidance_ratio
    from cw_export.calibrate.stage import text_encoder_fn
    from cw_export.export.torch_graphs import torch_graphs

    manifest = read_manifest(fp32_bundle)
    graphs = torch_graphs(tiny_model, manifest)
    original = graphs["high_res_out"]

    class HalfGuidance:
        def run(self, names, feeds):
            (noise,) = original.run(names, feeds)
            uncond, cond = np.split(noise, 2)
            return [np.concatenate([uncond, uncond + 0.5 * (cond - uncond)])]

    same = BundleRunner.from_sessions(manifest, graphs)
    half = BundleRunner.from_sessions(manifest, {**graphs, "high_res_out": HalfGuidance()})
    seen = {"same": [], "half": []}

    def on_step(i, kind, slots):
        seen["same"].append(same_input_guidance_ratio(manifest, same, kind, slots))
        seen["half"].append(same_input_guidance_ratio(manifest, half, kind, slots))

    hidden, pooled = text_encoder_fn(tiny_model)("a red square")
    BundleRunner.from_sessions(manifest, graphs).generate(hidden, pooled, unit_noise(manifest["latent"]["shape"], 0),
                                           on_step=on_step)
    assert len(seen["half"]) == manifest["schedule"]["steps"]
    np.testing.assert_allclose(seen["same"], 1.0, atol=1e-6)
    np.testing.assert_allclose(seen["half"], 0.5, atol=1e-5)


def test_fallback_reverts_one_graph_at_a_time_worst_first(monkeypatch):
    """Two graphs at 8 bits and a failing gate: the one with the lowest held-out SQNR goes back to 16 bits first;
    when the gate then passes, the other keeps its 8 bits; when it still fails, both go back."""
    from cw_export.bundle.writer import BuildRecords
    from cw_export.contract.schema import ParityRecord
    from cw_export.parity import stage
    from cw_export.quantize.fallback import A16Fallback

    def run(low_res_breaks_alone: bool):
        at8 = {"low_res", "adaptor"}
        reverted = []

        def measure(model, recipe, manifest, graphs, placed, allow, bundle):
            sqnr = {"low_res": 25.0 if "low_res" in at8 else 40.0, "adaptor": 33.0 if "adaptor" in at8 else 40.0}
            if not low_res_breaks_alone and "adaptor" in at8:
                sqnr["adaptor"] = 28.0
            found = numbers(graph_db=min(sqnr.values()))
            found["graphs"] = {n: {"sqnr_db": v} for n, v in sqnr.items()}
            return ParityRecord("set", "sha", {}, {}, gate(found, THRESHOLDS, allow), found)

        def fall_back(entries, bundle, held, failures):
            (name,) = held
            at8.discard(name)
            reverted.append(name)
            return {}

        monkeypatch.setattr(stage, "parity_stage", measure)
        monkeypatch.setattr(stage, "apply_fallbacks", fall_back)
        recipe = SimpleNamespace(parity=THRESHOLDS, quantization=SimpleNamespace(a8_gate_guidance_tolerance=0.0))
        records = BuildRecords({}, {}, {})
        held = {name: A16Fallback(Path(name), [], {}) for name in ("low_res", "adaptor")}  # whole graphs, no MAC mix
        parity = stage.gated_parity_stage(None, recipe, records, {}, {}, None, {}, held, False)
        return reverted, parity.gate

    assert run(low_res_breaks_alone=True) == (["low_res"], {"passed": True, "failures": [], "allowed_by_flag": False})
    reverted, verdict = run(low_res_breaks_alone=False)
    assert reverted == ["low_res", "adaptor"] and verdict["passed"]
