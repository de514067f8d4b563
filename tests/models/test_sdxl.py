"""SDXL-structured models (two text encoders, text_time conditioning, 3 levels) through split, export and runtime,
on ``tiny-sdxl`` (seeded random weights at toy widths): the split composes to the UNet in torch and onnxruntime,
and the bundle at clock 1 equals diffusers' StableDiffusionXLPipeline step for step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cw_export.contract.graphs import HIGH_RES_IN, HIGH_RES_OUT, LOW_RES
from cw_export.runtime.pipeline import BundleRunner

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def sdxl_model():
    from cw_export.models.pipeline import load_model

    return load_model("tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_bundle(sdxl_fp32_bundle) -> Path:
    return sdxl_fp32_bundle


def _conditioning(model, latents_hw: tuple[int, int]):
    from cw_export.reference import added_conditioning, text_embeddings

    hidden, pooled = text_embeddings(model, PROMPT)
    added = added_conditioning(model, pooled, torch.zeros((1, 4, *latents_hw)))
    return hidden, pooled, added


def test_split_composes_to_the_unet_in_torch(sdxl_model):
    from cw_export.split import split_unet

    split = split_unet(sdxl_model.unet)
    assert split.text_time
    hidden, pooled, added = _conditioning(sdxl_model, (16, 16))
    sample = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([641.0, 641.0])
    with torch.no_grad():
        expected = sdxl_model.unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        ours = split.unet_forward(sample, timestep, hidden, pooled, added["time_ids"])
        # the added conditioning matters: without it (zero pooled text) the output moves
        other = split.unet_forward(sample, timestep, hidden, torch.zeros_like(pooled), added["time_ids"])
    assert torch.equal(ours, expected)
    assert float((other - expected).abs().max()) > 1e-3


def test_split_composes_to_the_unet_in_onnxruntime(sdxl_model, sdxl_bundle):
    """The bundle's three UNet graphs, fed as the runtime feeds them (host-side time and added-time features),
    give the torch UNet's noise prediction."""
    runner = BundleRunner(sdxl_bundle)
    manifest = runner.manifest
    assert manifest["wiring"]["step_inputs"][-1] == "add_time_features"
    assert set(manifest["wiring"]["graphs"][HIGH_RES_IN]["inputs"]) >= {"pooled_text", "add_time_features"}
    hidden, pooled = runner.encode_prompt(PROMPT)
    sample = np.random.default_rng(2).standard_normal((2, 4, 16, 16)).astype(np.float32)
    plan = runner._step_plan(manifest["schedule"]["steps"])
    slots = {"sample": sample, "time_features": plan.time_features[0], "encoder_hidden_states": hidden,
             "pooled_text": pooled, "add_time_features": plan.add_time_features}
    for graph in (HIGH_RES_IN, LOW_RES, HIGH_RES_OUT):
        runner.run_graph(graph, slots)
    from cw_export.reference import added_conditioning

    added = added_conditioning(sdxl_model, torch.from_numpy(pooled), torch.from_numpy(sample))
    with torch.no_grad():
        expected = sdxl_model.unet(torch.from_numpy(sample), torch.full((2,), float(plan.timesteps[0])),
                                   encoder_hidden_states=torch.from_numpy(hidden), added_cond_kwargs=added).sample
    rel = np.max(np.abs(slots["noise_pred"] - expected.numpy())) / np.max(np.abs(expected.numpy()))
    assert rel < 1e-4, rel


def test_clock_1_equals_stable_diffusion_xl_pipeline_step_for_step(sdxl_model, sdxl_bundle):
    """Tokenizers (numpy BPE, both), text encoders, empty negative prompt as zeros, time ids, DPM++ 2M: the
    bundle's clock-1 trajectory is diffusers' StableDiffusionXLPipeline's, step for step."""
    from cw_export.models.pipeline import diffusers_pipeline

    runner = BundleRunner(sdxl_bundle)
    manifest = runner.manifest
    steps, guidance = manifest["schedule"]["steps"], manifest["guidance_scale"]
    noise = np.random.default_rng(3).standard_normal(runner.latent_shape()).astype(np.float32)
    hidden, pooled = runner.encode_prompt(PROMPT)
    assert not hidden[0].any() and not pooled[0].any()  # force_zeros_for_empty_prompt, as the pipeline
    ours = runner.generate(hidden, pooled, noise, clock=1)

    pipe = diffusers_pipeline(sdxl_model)
    theirs: list[np.ndarray] = []

    def record(pipeline, i, t, kwargs):
        theirs.append(kwargs["latents"].numpy().copy())
        return kwargs

    height, width = manifest["latent"]["image_size"]
    with torch.no_grad():
        final = pipe(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                     latents=torch.from_numpy(noise), output_type="latent", callback_on_step_end=record).images
    assert len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours.step_latents, theirs)):
        rel = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert rel < 1e-4, (i, rel)
    np.testing.assert_allclose(ours.latents, final.numpy(), rtol=0, atol=1e-4 * float(np.max(np.abs(final.numpy()))))
    # and the clock matters: the bundle's clocked schedule leaves the unclocked trajectory
    clocked = runner.generate(hidden, pooled, noise)
    assert np.max(np.abs(clocked.latents - ours.latents)) > 1e-3


def test_negative_prompt_is_encoded_and_bundle_records_sdxl_fields(sdxl_bundle):
    runner = BundleRunner(sdxl_bundle)
    manifest = json.loads((sdxl_bundle / "manifest.json").read_text())
    assert manifest["wiring"]["text"]["input_2"] == "input_ids_2"
    assert manifest["add_time_features"]["time_ids"] == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]
    assert (sdxl_bundle / manifest["tokenizer_2"]["folder"] / "vocab.json").is_file()
    hidden, pooled = runner.encode_prompt(PROMPT, negative_prompt="blurry")
    assert np.abs(hidden[0]).max() > 0 and np.abs(pooled[0]).max() > 0


@pytest.mark.parametrize("damage, field", [
    (lambda m: m.pop("add_time_features"), "add_time_features: missing"),
    (lambda m: m["add_time_features"].update(time_ids="32"), "add_time_features.time_ids"),
    (lambda m: m["add_time_features"]["time_ids"].__setitem__(0, float("nan")), "add_time_features.time_ids[0]"),
    (lambda m: m.pop("tokenizer_2"), "tokenizer_2: missing"),
    (lambda m: m["tokenizer_2"].update(folder="../tokenizer"), "tokenizer_2.folder"),
    (lambda m: m["wiring"]["text"].update(empty_negative="random"), "wiring.text.empty_negative"),
])
def test_manifest_sdxl_fields_are_checked(sdxl_bundle, damage, field):
    """Every SDXL field the runtime reads is checked: a bad one is one BundleError naming it."""
    from cw_export.contract.schema import parse_manifest
    from cw_export.errors import BundleError

    manifest = json.loads((sdxl_bundle / "manifest.json").read_text())
    parse_manifest(manifest)
    damage(manifest)
    with pytest.raises(BundleError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_manifest(manifest)


def test_an_sdxl_folder_builds_the_bundle_of_the_built_in_model(sdxl_bundle, tmp_path):
    """`cw-export model --model tiny-sdxl` writes a StableDiffusionXLPipeline folder (two encoders and tokenizers,
    force_zeros_for_empty_prompt); a build from it has the built-in model's graphs byte for byte."""
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.cli import main
    from cw_export.recipe import load_recipe

    folder = tmp_path / "model"
    assert main(["model", "--model", "tiny-sdxl", "--out", str(folder)]) == 0
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    out = build_bundle(load_recipe("cpu-fp32"), BuildOptions(model=str(folder), out=tmp_path / "b", progress=False))
    ours, builtin = (json.loads((b / "manifest.json").read_text()) for b in (out, sdxl_bundle))
    assert ours["wiring"] == builtin["wiring"] and ours["add_time_features"] == builtin["add_time_features"]
    for name, entry in builtin["graphs"].items():
        assert (out / entry["file"]).read_bytes() == (sdxl_bundle / entry["file"]).read_bytes(), name


def _sdxl_lora(model, out: Path) -> Path:
    """A rank-4 LoRA (random up/down, peft) on the UNet's attention and both text encoders, in diffusers' SDXL
    format (``StableDiffusionXLPipeline.save_lora_weights``: unet, text_encoder, text_encoder_2 keys)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(0)
    model.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    text = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj"])
    inject_adapter_in_model(text, model.text_encoder)
    inject_adapter_in_model(text, model.text_encoder_2)
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model.text_encoder)),
        text_encoder_2_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model.text_encoder_2)))
    return out / "pytorch_lora_weights.safetensors"


def test_a_lora_fuses_into_the_unet_and_both_text_encoders_of_an_sdxl_model(tmp_path):
    """``--lora`` on SDXL: diffusers' SDXL loader puts it into the UNet, text_encoder and text_encoder_2; fused at
    scale 1 every one of them changes (and nothing else), at scale 0 the model is the original weight for weight."""
    pytest.importorskip("peft")
    from cw_export.models.lora import LoraSpec, check_loras, fuse_loras
    from cw_export.models.pipeline import load_model

    path = _sdxl_lora(load_model("tiny-sdxl"), tmp_path)

    def weights(model) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
                for name, module in model.components()}

    original = weights(load_model("tiny-sdxl"))
    fused_model = fuse_loras(load_model("tiny-sdxl"), check_loras((LoraSpec(path, 1.0),)))
    fused = weights(fused_model)
    changed = {name for name in original
               if any(not torch.equal(original[name][k], fused[name][k]) for k in original[name])}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}
    assert all(fused[name].keys() == original[name].keys() for name in original)  # adapter layers unloaded
    assert fused_model.source["sha256"] != load_model("tiny-sdxl").source["sha256"]
    zero = weights(fuse_loras(load_model("tiny-sdxl"), check_loras((LoraSpec(path, 0.0),))))
    assert all(torch.equal(original[n][k], zero[n][k]) for n in original for k in original[n])
