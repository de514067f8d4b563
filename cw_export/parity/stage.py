"""The build's parity stage: measure the quantized graphs on held-out prompts, gate, and apply the recipe's two
fallbacks (FP32 for once-per-image graphs, 16-bit activations for swept graphs) before the last, real verdict."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..calibrate.stage import prompt_subset, tokenizer_fn
from ..contract.schema import ParityRecord
from ..prompts import prompt_set_hash
from ..quantize.fallback import A16Fallback, apply_fallbacks, back_off_mac_mix, keep_fp32_where_parity_requires
from ..runtime.sessions import bundle_session, create_session, manifest_session_config
from .measure import ImageReferences, failures, gate, measure

def heldout_prompts(recipe) -> list[str]:
    return prompt_subset(recipe.parity.heldout_set, recipe.parity.heldout_prompts, "parity")


def image_references(model, manifest: dict, bundle: Path, provider: str = "cpu") -> ImageReferences:
    """The torch side of image parity (unclocked FP32 pipeline, torch VAE) and the bundle's own VAE decoder."""
    import torch

    from ..runtime.pipeline import BundleRunner
    from ..reference import decode_image, torch_trajectory

    decoder = manifest["wiring"]["decode"]["graph"]
    session = bundle_session(bundle, manifest, decoder, provider)
    schedule = manifest["schedule"]

    def full_fp32(text: tuple[np.ndarray, np.ndarray], noise: np.ndarray) -> np.ndarray:
        hidden, pooled = (torch.from_numpy(np.asarray(t)) for t in text)
        return torch_trajectory(model, hidden, torch.from_numpy(noise), schedule["steps"], 1,
                                manifest["guidance_scale"], manifest["sampler"]["name"], pooled_text=pooled).latents

    return ImageReferences(full_fp32=full_fp32, decode_fp32=lambda x: decode_image(model, x),
                           decode_bundle=BundleRunner.from_sessions(manifest, {decoder: session}).decode)


PARITY_THRESHOLDS = ("graph_min_sqnr_db", "step_min_psnr_db", "final_latent_min_psnr_db", "guidance_ratio_tolerance",
                     "image_min_psnr_db", "image_min_ssim")


def parity_stage(model, recipe, manifest: dict, graphs: dict, placed: dict[str, Path],
                 allow_low_parity: bool, bundle: Path) -> ParityRecord:
    """Measure parity of the graphs in ``placed`` with the manifest's session settings; gate; the record."""
    config = manifest_session_config(manifest)
    sessions = {name: create_session(path, config=config) for name, path in placed.items()}
    prompts = heldout_prompts(recipe)
    numbers = measure(manifest, graphs, sessions, tokenizer_fn(model), prompts, recipe.parity.seed,
                      images=image_references(model, manifest, bundle), aggregate=recipe.parity.prompt_aggregate)
    verdict = gate(numbers, recipe.parity, allow_low_parity)
    thresholds = {k: v for k, v in asdict(recipe.parity).items() if k in PARITY_THRESHOLDS}
    return ParityRecord(recipe.parity.heldout_set, prompt_set_hash(prompts), config, thresholds, verdict, numbers)


def gated_parity_stage(model, recipe, records, graphs: dict, placed: dict[str, Path], bundle: Path,
                       fp32_held: dict[str, Path], a16_held: dict[str, A16Fallback],
                       allow_low_parity: bool) -> ParityRecord:
    """Parity gate with the recipe's two fallbacks, each followed by a fresh measurement:

    1. "keep FP32 where parity requires": a text encoder / VAE decoder below the graph floor goes back to its FP32
       export (``fp32_held``, from ``hold_fp32``), with the measured reason in its entry;
    2. "8-bit activations wherever the gate allows": while the whole bundle fails the gate (with the recipe's
       ``a8_gate_guidance_tolerance`` where tighter), the 8-bit graph with the lowest held-out SQNR backs off, one
       graph at a time, so a graph whose 8 bits the gate tolerates keeps them when another one's do not: a MAC
       mix to the longest prefix of its sweep's order that holds (bisection, one measurement a probe), any other
       graph (or a mix no prefix of which holds) to 16 bits (``a16_held``, from ``quantize_stage``).

    ``records`` (``cw_export.bundle.writer.BuildRecords``) are the build's records so far: each fallback replaces
    graph entries in ``records.graphs``, and each measurement reads the manifest they assemble to.
    The gate stays open while a fallback may still change the bundle; the last measurement is gated for real."""

    def measured(allow: bool) -> ParityRecord:
        return parity_stage(model, recipe, records.manifest(), graphs, placed, allow, bundle)

    parity = measured(allow_low_parity or bool(a16_held) or bool(fp32_held))
    kept_fp32 = keep_fp32_where_parity_requires(records.graphs, bundle, fp32_held, placed, parity.graphs,
                                                recipe.parity.graph_min_sqnr_db)
    if kept_fp32:
        records.graphs.update(kept_fp32)
        parity = measured(allow_low_parity or bool(a16_held))
    elif fp32_held and not a16_held:  # measured with the gate held open for rule 1 only: gate for real now
        parity = parity.with_gate(gate(parity.measured, recipe.parity, allow_low_parity))
    remaining = dict(a16_held)
    aim = backoff_thresholds(recipe)
    while remaining and (found := failures(parity.measured, aim)):
        worst = min(remaining, key=lambda name: parity.graphs[name]["sqnr_db"])
        held = remaining.pop(worst)
        kept, shorter = _longest_holding_mix(worst, held, found, records, bundle, aim, lambda: measured(True))
        if kept:
            parity = shorter
        else:
            records.graphs.update(apply_fallbacks(records.graphs, bundle, {worst: held}, found))
            parity = measured(allow_low_parity or bool(remaining))
    if a16_held and not allow_low_parity:  # measured with the gate held open: gate for real now
        parity = parity.with_gate(gate(parity.measured, recipe.parity, allow_low_parity))
    return parity


def backoff_thresholds(recipe):
    """The thresholds the gate's fallbacks aim for: the recipe's, with ``a8_gate_guidance_tolerance`` where it is
    tighter (the CPU EP's guidance ratio measured 0.013-0.028 closer to 1 than the QNN HTP's on the built-in
    bundles: docs/quantization.md)."""
    tight = recipe.quantization.a8_gate_guidance_tolerance
    loose = recipe.parity.guidance_ratio_tolerance
    if tight > 0 and (loose <= 0 or tight < loose):
        return replace(recipe.parity, guidance_ratio_tolerance=tight)
    return recipe.parity


def _longest_holding_mix(name: str, held: A16Fallback, found: list[str], records, bundle: Path, aim,
                         measure) -> tuple[int, ParityRecord | None]:
    """Bisect the MAC mix of graph ``name`` (``held.macs``, in the sweep's order) for the longest prefix whose
    bundle keeps ``aim``; that prefix stays in the bundle. Returns (its length, its parity), or (0, None) when no
    prefix holds or the graph has no MAC mix (the caller then falls back to 16 bits)."""
    low, high, kept, best = 1, len(held.macs) - 1, 0, None
    last = None
    while low <= high:
        mid = (low + high + 1) // 2
        records.graphs.update(back_off_mac_mix(records.graphs, bundle, name, held, mid, found))
        last = mid, measure()
        if failures(last[1].measured, aim):
            high = mid - 1
        else:
            kept, best, low = mid, last[1], mid + 1
    if kept and last[0] != kept:  # the winner is not in the bundle now: put it back
        records.graphs.update(back_off_mac_mix(records.graphs, bundle, name, held, kept, found))
        best = measure()
    return kept, best
