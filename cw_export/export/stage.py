"""The build's export stage: realistic example inputs (a real prompt, the first denoising step), every graph of the
registry exported to FP32 ONNX, and the torch-vs-onnxruntime check on them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adaptor import build_adaptor, default_adaptor_config
from ..atomic import pause_point
from ..contract.graphs import BATCH
from ..errors import ParityError
from ..models.pipeline import SDModel
from ..progress import progress_bar
from ..recipe import Recipe
from ..split import split_unet
from .to_onnx import ExportResult, export_graph
from .wrappers import TextEncoderGraph, VaeDecoderGraph

EXAMPLE_PROMPT = "a red triangle on the left of a blue square"


def example_inputs(model: SDModel, split, latent_h: int, latent_w: int, table: dict) -> dict:
    """Realistic inputs for export and parity: a real prompt's embeddings and the first step's noisy latents."""
    generator = torch.Generator().manual_seed(0)
    ids = model.tokenize(["", EXAMPLE_PROMPT])
    with torch.no_grad():
        text = model.text_encoder(input_ids=ids, return_dict=True)
    channels = model.unet.config.in_channels
    latents = torch.randn((1, channels, latent_h, latent_w), generator=generator) * table["init_noise_sigma"]
    sample = torch.cat([latents, latents]) * float(table["input_scale"][0])
    timestep = torch.full((BATCH,), float(table["timesteps"][0]))
    return {"input_ids": ids, "encoder_hidden_states": text.last_hidden_state, "pooled_text": text.pooler_output,
            "sample": sample, "time_features": split.time_features(timestep)}


def export_all(model: SDModel, recipe: Recipe, graphs_dir: Path, latent_hw_: tuple[int, int], table: dict,
               adaptor_state: dict | None, progress: bool) -> tuple[dict[str, ExportResult], int]:
    """Export text_encoder, high_res_in, low_res, high_res_out (and the learned adaptor)."""
    split = split_unet(model.unet)
    ex = example_inputs(model, split, *latent_hw_, table)
    ehs = ex["encoder_hidden_states"]
    parts = split.graph_modules()
    with torch.no_grad():
        temb, r_in, *skips = parts["high_res_in"](ex["sample"], ex["time_features"], ehs)
        r_out = split.low_res(r_in, temb, ehs)
    skip_inputs = dict(zip(split.skip_names, skips))
    jobs = {
        "text_encoder": (TextEncoderGraph(model.text_encoder), {"input_ids": ex["input_ids"]},
                         ["encoder_hidden_states", "pooled_text"]),
        "high_res_in": (parts["high_res_in"], {"sample": ex["sample"], "time_features": ex["time_features"],
                                               "encoder_hidden_states": ehs}, ["temb", "r_in", *split.skip_names]),
        "low_res": (parts["low_res"], {"r_in": r_in, "temb": temb, "encoder_hidden_states": ehs}, ["r_out"]),
        "high_res_out": (parts["high_res_out"], {"r_out": r_out, "temb": temb, "encoder_hidden_states": ehs,
                                                 **skip_inputs}, ["noise_pred"]),
        "vae_decoder": (VaeDecoderGraph(model.vae), {"latents": ex["sample"][:1] / table["init_noise_sigma"]},
                        ["image"]),
    }
    if recipe.build.adaptor == "learned":
        config = default_adaptor_config(model.unet, model.text_encoder.config.hidden_size)
        adaptor = build_adaptor(config, adaptor_state)
        jobs["adaptor"] = (adaptor, {"r_in": r_in, "r_out_prev": r_out, "temb": temb,
                                     "pooled_text": ex["pooled_text"]}, ["r_out"])
    results = {}
    bar = progress_bar(jobs.items(), enabled=progress, desc="export", unit="graph")
    for name, (module, inputs, outputs) in bar:
        bar.set_postfix_str(name)
        results[name] = export_graph(module, inputs, outputs, graphs_dir / f"{name}.onnx",
                                     opset=recipe.export.opset, simplify=recipe.export.simplify)
        pause_point("export")
    return results, split.num_skips


def check_fp32_parity(results: dict[str, ExportResult], recipe: Recipe) -> None:
    limit = recipe.parity.graph_max_rel_diff
    failing = {n: r.parity["max_rel_diff"] for n, r in results.items() if r.parity["max_rel_diff"] > limit}
    if failing:
        worst = max(failing, key=failing.get)
        raise ParityError(f"graph {worst}: onnxruntime differs from torch by {failing[worst]:.2e} "
                          f"(relative) > {limit:.0e}; {len(failing)} graph(s) failing")
