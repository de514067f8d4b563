"""The once-per-image graphs (text_encoder, vae_decoder): calibrated from the same prompts/trajectories, quantized
by both backends with the int64 token ids left alone, parity-measured end to end, FP32 where parity requires."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from cw_export.runtime.pipeline import BundleRunner
from cw_export.calibrate.collect import CALIBRATION_FORMAT, collect, settings_for, unit_noise
from cw_export.errors import RecipeError
from cw_export.parity.measure import graph_sqnr
from cw_export.quantize import BACKENDS, GraphJob, check_settings, get_backend, graphs_to_quantize
from cw_export.recipe import load_recipe
from cw_export.contract.manifest import read_manifest
from cw_export.runtime.sessions import create_session, session_config

PROMPTS = ["a red square", "a blue circle"]
HELDOUT = ["a green triangle on the right", "two yellow stars"]


@pytest.fixture(scope="module")
def setup(tiny_model, fp32_bundle):
    from cw_export.calibrate.stage import tokenizer_fn
    from cw_export.export.torch_graphs import torch_graphs

    manifest = read_manifest(fp32_bundle)
    settings = settings_for(manifest, tiny_model.source["sha256"], PROMPTS, seed=0, samples_per_graph=64)
    graphs = torch_graphs(tiny_model, manifest)
    data = collect(manifest, graphs, tokenizer_fn(tiny_model), PROMPTS, settings)
    return manifest, graphs, data, settings


def test_calibration_captures_token_ids_and_final_latents(setup, tiny_model):
    """The text encoder's samples are each prompt's [uncond, cond] token ids, the VAE decoder's the final latents of
    that prompt's FP32 clocked trajectory, equal to the diffusers-scheduler reference computed here."""
    import torch

    from cw_export.reference import text_embeddings, torch_trajectory

    manifest, _, data, settings = setup
    steps = manifest["schedule"]["steps"]
    text, vae = data.graphs["text_encoder"], data.graphs["vae_decoder"]
    assert len(text) == len(vae) == len(PROMPTS)
    assert text.steps == [0] * len(PROMPTS) and vae.steps == [steps] * len(PROMPTS)
    for k, (ids, latents) in enumerate(zip(text, vae)):
        expected = tiny_model.tokenize(["", PROMPTS[k]]).numpy()
        assert ids["input_ids"].dtype == np.int64 and np.array_equal(ids["input_ids"], expected)
        hidden, _ = text_embeddings(tiny_model, PROMPTS[k])
        noise = unit_noise(manifest["latent"]["shape"], settings.seed + k)
        ref = torch_trajectory(tiny_model, hidden, torch.from_numpy(noise), steps, manifest["schedule"]["clock"],
                               manifest["guidance_scale"], manifest["sampler"]["name"]).latents
        rel = np.max(np.abs(latents["latents"] - ref)) / np.max(np.abs(ref))
        assert rel < 1e-3, rel
    assert data.provenance()["samples"]["vae_decoder"] == {"count": 2, "steps": [steps]}
    # an entry captured before these graphs were (format 1) has another key, so it is never reused
    assert CALIBRATION_FORMAT >= 2
    assert dataclasses.replace(settings, format=1).key() != settings.key()


def _heldout(graph: str, manifest, graphs, tiny_model) -> list[dict]:
    """Held-out inputs: other prompts' token ids, or the final latents of their FP32 clocked trajectories."""
    from cw_export.calibrate.stage import tokenizer_fn

    ids = [tokenizer_fn(tiny_model)(p) for p in HELDOUT]
    if graph == "text_encoder":
        return [dict(i) for i in ids]  # the text encoder graph's feeds (input_ids; SDXL: input_ids_2 too)
    runner = BundleRunner.from_sessions(manifest, graphs)
    return [{"latents": runner.generate(*runner.encode_ids(i), unit_noise(manifest["latent"]["shape"], 100 + k)).latents}
            for k, i in enumerate(ids)]


@pytest.mark.parametrize("graph", ["text_encoder", "vae_decoder"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backends_quantize_the_image_graphs(backend, graph, setup, tiny_model, fp32_bundle, tmp_path):
    manifest, graphs, data, _ = setup
    reference = graphs[graph]
    job = GraphJob(graph, fp32_bundle / "graphs" / f"{graph}.onnx", reference.module, reference.input_names,
                   reference.output_names, data.graphs[graph], 16)
    result = get_backend(backend).quantize_graph(job, load_recipe("snapdragon-w8a16").quantization,
                                                 tmp_path / "graphs")
    session = create_session(result.file, config=session_config("basic"))
    sqnr = graph_sqnr(session, reference, _heldout(graph, manifest, graphs, tiny_model))
    # measured on these held-out inputs (2 calibration prompts): text encoder 32.6 dB, VAE 50.5 dB (both backends)
    assert 30.0 <= sqnr["sqnr_db"] < 200.0, sqnr
    model = onnx.load(str(result.file))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    if graph == "text_encoder":
        (ids,) = model.graph.input
        assert ids.name == "input_ids" and ids.type.tensor_type.elem_type == onnx.TensorProto.INT64
        consumers = [n for n in model.graph.node if "input_ids" in n.input]
        assert consumers and not [n for n in consumers if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        if result.encodings is not None:  # aimet: no activation encoding for the token ids either
            encodings = json.loads(result.encodings.read_text())
            assert "input_ids" not in {e["name"] for e in encodings["activation_encodings"]}
        if backend == "ort":  # the -inf causal mask and its softmax stay float (min-max of -inf breaks the range)
            assert result.details["float_masked_softmax_nodes"]
    else:  # the upsampler's Resize scales stay float (a quantized 2.0 came back a hair off and moved rows)
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        resizes = [n for n in model.graph.node if n.op_type == "Resize"]
        assert resizes and all(producers.get(n.input[2]) != "DequantizeLinear" for n in resizes)


def test_recipes_name_the_image_graphs_precision():
    for target in ("snapdragon-int8", "snapdragon-w8a16", "snapdragon-w8a8"):
        q = load_recipe(target).quantization
        assert q.activation_bits["text_encoder"] == q.activation_bits["vae_decoder"] == 16, target
        assert {"text_encoder", "vae_decoder"} <= set(graphs_to_quantize(q, ["text_encoder", "vae_decoder"]))
    q = load_recipe("snapdragon-w8a16").quantization
    older = dataclasses.replace(q, activation_bits={"low_res": 16})  # a recipe that does not name them
    assert graphs_to_quantize(older, ["text_encoder", "low_res", "vae_decoder"]) == ["low_res"]
    with pytest.raises(RecipeError, match="activation_bits.text_encoder"):
        check_settings(dataclasses.replace(q, activation_bits={"text_encoder": 4}))
    with pytest.raises(RecipeError, match="a8 sweep does not cover 'vae_decoder'"):
        check_settings(dataclasses.replace(q, a8_candidates=["vae_decoder"]))
    assert load_recipe("cpu-fp32").quantization.activation_bits == {}


def test_bad_image_graph_bits_are_one_line_exit_2(tmp_path, capsys):
    from cw_export.cli import main
    from cw_export.recipe import RECIPES_DIR

    text = (RECIPES_DIR / "snapdragon-w8a16.toml").read_text(encoding="utf-8")
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text.replace("text_encoder = 16", "text_encoder = 12"), encoding="utf-8")
    out = tmp_path / "bundle"
    assert main(["--model", "tiny-random", "--target", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "activation_bits.text_encoder = 12" in err and "\n" not in err
    assert not out.exists()


def test_w8a16_bundle_quantizes_and_measures_the_image_graphs(w8a16_bundle):
    manifest = read_manifest(w8a16_bundle)
    parity = manifest["parity"]
    assert parity["gate"]["passed"]
    for name in ("text_encoder", "vae_decoder"):
        entry = manifest["graphs"][name]
        assert entry["precision"] == "w8a16", entry
        quant = entry["quantization"]
        assert quant["backend"] == "ort" and quant["activation_bits"] == 16 and quant["reason"]
        assert 30.0 <= parity["graphs"][name]["sqnr_db"] < 200.0  # tiny model: text encoder 30.9, VAE 47.4 dB
        assert parity["graphs"][name]["samples"] == len(parity["prompts"])
        assert manifest["calibration"]["samples"][name]["count"] == manifest["calibration"]["num_prompts"]
        ops = {n.op_type for n in onnx.load(str(w8a16_bundle / entry["file"])).graph.node}
        assert "QuantizeLinear" in ops
    readme = (w8a16_bundle / "README.md").read_text(encoding="utf-8")
    assert "`text_encoder`" in readme and "w8a16" in readme


def test_final_latent_parity_uses_the_quantized_text_encoder(w8a16_bundle, tiny_model):
    """The manifest's final-latent PSNR equals the bundle run end to end by the runtime (its own tokenizer and
    quantized text encoder) vs the FP32 torch clocked trajectory; with FP32 embeddings it would differ."""
    import torch

    from cw_export.reference import text_embeddings, torch_trajectory
    from cw_export.runtime.pipeline import BundleRunner

    manifest = read_manifest(w8a16_bundle)
    parity = manifest["parity"]
    prompt, seed = parity["prompts"][0], parity["seeds"][0]
    noise = unit_noise(manifest["latent"]["shape"], seed)
    runner = BundleRunner(w8a16_bundle)
    schedule = manifest["schedule"]
    hidden, _ = text_embeddings(tiny_model, prompt)
    ref = torch_trajectory(tiny_model, hidden, torch.from_numpy(noise), schedule["steps"], schedule["clock"],
                           manifest["guidance_scale"], manifest["sampler"]["name"]).latents

    def psnr(latents: np.ndarray) -> float:
        return float(10 * np.log10(np.max(np.abs(ref)) ** 2 / np.mean((latents.astype(np.float64) - ref) ** 2)))

    quantized_text = runner.generate(*runner.encode_prompt(prompt), noise).latents
    fp32_text = runner.generate(hidden.numpy(), text_embeddings(tiny_model, prompt)[1].numpy(), noise).latents
    assert parity["final_latent_psnr_db"] == pytest.approx(psnr(quantized_text), abs=0.05)
    assert abs(psnr(fp32_text) - psnr(quantized_text)) > 0.05  # the check above can tell the two apart


def test_validate_remeasures_the_image_graphs(w8a16_bundle, capsys):
    from cw_export.cli import main

    assert main(["validate", str(w8a16_bundle)]) == 0
    out = capsys.readouterr().out
    assert "PASS  quantized parity re-measured" in out and "5 graphs" in out


def test_image_graph_below_the_floor_is_kept_fp32_with_its_number(low_parity_bundle):
    """An impossible graph floor (200 dB): the text encoder and VAE decoder go back to their FP32 exports, the build
    is not failed for them, and each entry says why with the measured SQNR; parity is measured without them."""
    manifest = read_manifest(low_parity_bundle)
    parity = manifest["parity"]
    for name in ("text_encoder", "vae_decoder"):
        entry = manifest["graphs"][name]
        assert entry["precision"] == "fp32"
        quant = entry["quantization"]
        assert quant["backend"] is None
        tried = quant["parity_fallback"]
        assert tried["precision"] == "w8a16" and tried["graph_min_sqnr_db"] == 200.0
        assert 20.0 < tried["sqnr_db"] < 200.0
        assert quant["reason"].startswith("FP32: kept where parity requires")
        assert f"{tried['sqnr_db']:.2f} dB" in quant["reason"]
        ops = {n.op_type for n in onnx.load(str(low_parity_bundle / entry["file"])).graph.node}
        assert "QuantizeLinear" not in ops  # the FP32 export is what ships
        assert name not in parity["graphs"]
    assert "low_res" in parity["graphs"] and parity["gate"]["allowed_by_flag"]
