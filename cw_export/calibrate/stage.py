"""The build's calibrate stage: the calibration prompts -> FP32 trajectories -> per-graph samples, with their record
for the manifest; and the prompt -> token ids / embeddings helpers calibration and parity share."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..prompts import load_prompt_set
from .collect import CalibrationSet, collect, settings_for

def text_encoder_fn(model):
    """prompt -> (encoder_hidden_states, pooled_text) as numpy [uncond, cond], from the FP32 torch text encoder."""
    from ..reference import text_embeddings

    def encode(prompt: str) -> tuple[np.ndarray, np.ndarray]:
        hidden, pooled = text_embeddings(model, prompt)
        return hidden.numpy(), pooled.numpy()

    return encode


def tokenizer_fn(model):
    """prompt -> the text encoder graph's feeds for [uncond, cond] (``input_ids`` [2, 77] int64, and
    ``input_ids_2`` with two tokenizers), as diffusers' pipeline tokenizes: calibration and parity run the graph,
    FP32 or quantized, on these ids."""

    def tokenize(prompt: str) -> dict[str, np.ndarray]:
        return {name: ids.numpy().astype(np.int64) for name, ids in model.text_feeds(["", prompt]).items()}

    return tokenize


def prompt_subset(source: str, count: int, what: str) -> list[str]:
    """The first ``count`` prompts of a set (all of them when it has fewer; the manifest records the number)."""
    prompts = load_prompt_set(source)
    if count < 1:
        raise InputError(f"{what}: the number of prompts must be >= 1, got {count}")
    return prompts[:count]


def check_prompt_sources(recipe) -> None:
    """Read the calibration and held-out prompt files up front: a bad file fails before any heavy work."""
    prompt_subset(recipe.quantization.calibration_set, recipe.quantization.calibration_prompts, "calibration")
    prompt_subset(recipe.parity.heldout_set, recipe.parity.heldout_prompts, "parity")


def calibrate_stage(model, recipe, manifest: dict, graphs: dict, adaptor_sha256: str | None,
                    progress: bool) -> tuple[CalibrationSet, dict]:
    """The calibration samples of every graph, and the manifest's record of where they came from."""
    q = recipe.quantization
    prompts = prompt_subset(q.calibration_set, q.calibration_prompts, "calibration")
    settings = settings_for(manifest, model.source["sha256"], prompts, q.calibration_seed, q.calibration_samples,
                            adaptor_sha256)
    calibration = collect(manifest, graphs, tokenizer_fn(model), prompts, settings, progress=progress)
    return calibration, {"prompt_set": q.calibration_set, **calibration.provenance()}
