"""The build's export stage: realistic example inputs (a real prompt, the first denoising step), every graph of the
registry exported to FP32 ONNX, and the torch-vs-onnxruntime check on them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import pause_point
from ..contract.graphs import BATCH, GRAPHS, HIGH_RES_IN
from ..errors import ParityError
from ..models.pipeline import SDModel
from ..progress import progress_bar
from ..recipe import Recipe
from ..split import split_unet
from .to_onnx import ExportResult, export_graph
from .torch_graphs import graph_modules

EXAMPLE_PROMPT = "a red triangle on the left of a blue square"


def example_inputs(model: SDModel, split, latent_h: int, latent_w: int, table: dict) -> dict:
    """Realistic inputs for export and parity: a real prompt's embeddings and the first step's noisy latents."""
    from ..reference import added_conditioning
    from .wrappers import text_graph

    generator = torch.Generator().manual_seed(0)
    ids = model.text_feeds(["", EXAMPLE_PROMPT])
    with torch.no_grad():
        hidden, pooled = text_graph(model)(**ids)
    channels = model.unet.config.in_channels
    latents = torch.randn((1, channels, latent_h, latent_w), generator=generator) * table["init_noise_sigma"]
    sample = torch.cat([latents, latents]) * float(table["input_scale"][0])
    timestep = torch.full((BATCH,), float(table["timesteps"][0]))
    added = added_conditioning(model, pooled, latents)
    # inputs a graph of this model does not read (a second tokenizer's ids, SDXL's added time features) get a
    # placeholder: the exporter drops them from the graph
    return {"input_ids": ids["input_ids"], "input_ids_2": ids.get("input_ids_2", ids["input_ids"]),
            "encoder_hidden_states": hidden, "pooled_text": pooled, "sample": sample,
            "time_features": split.time_features(timestep),
            "add_time_features": (torch.zeros((BATCH, 1)) if added is None
                                  else split.add_time_features(added["time_ids"]))}


def export_all(model: SDModel, recipe: Recipe, graphs_dir: Path, latent_hw_: tuple[int, int], table: dict,
               adaptor_state: dict | None, progress: bool) -> tuple[dict[str, ExportResult], int]:
    """Export every graph of the registry this bundle holds (cw_export.contract.graphs), each fed the example
    slots named by its registry inputs and asked for its registry outputs."""
    split = split_unet(model.unet)
    ex = example_inputs(model, split, *latent_hw_, table)
    ehs = ex["encoder_hidden_states"]
    modules = graph_modules(model, split, recipe.build.adaptor, adaptor_state)
    with torch.no_grad():
        temb, r_in, *skips = modules[HIGH_RES_IN](ex["sample"], ex["time_features"], ehs, ex["pooled_text"],
                                                  ex["add_time_features"])
        r_out = split.low_res(r_in, temb, ehs)
    slots = {**ex, "temb": temb, "r_in": r_in, "r_out": r_out, "r_out_prev": r_out,
             **dict(zip(split.skip_names, skips)), "latents": ex["sample"][:1] / table["init_noise_sigma"]}
    results = {}
    bar = progress_bar(modules.items(), enabled=progress, desc="export", unit="graph")
    for name, module in bar:
        bar.set_postfix_str(name)
        spec = GRAPHS[name]
        inputs = {slot: slots[slot] for slot in spec.input_names(split.num_skips)}
        results[name] = export_graph(module, inputs, spec.output_names(split.num_skips), graphs_dir / f"{name}.onnx",
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
