"""Fixtures of the quantization tests: a private calibration cache and one small quantized (ort) bundle."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

TINY_CALIBRATION = {"calibration_prompts": 2, "calibration_samples": 8}  # keeps each build to about a minute
TINY_PARITY = {"heldout_prompts": 1}


def small_recipe(target: str = "snapdragon-w8a16", backend: str = "ort", **parity):
    from cw_export.recipe import load_recipe

    recipe = load_recipe(target).with_quantization(backend=backend, **TINY_CALIBRATION)
    return recipe.with_parity(**{**TINY_PARITY, **parity})


def build(recipe, out, allow_low_parity: bool = False, **options):
    from cw_export.build import BuildOptions, build_bundle

    return build_bundle(recipe, BuildOptions(model="tiny-random", out=out, progress=False,
                                             allow_low_parity=allow_low_parity, **options))



@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """Calibration data goes to a per-session folder, never to ~/.cache."""
    folder = tmp_path_factory.mktemp("cw-cache")
    old = os.environ.get("CW_EXPORT_CACHE")
    os.environ["CW_EXPORT_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("CW_EXPORT_CACHE", None)
    else:
        os.environ["CW_EXPORT_CACHE"] = old


@pytest.fixture(scope="session")
def low_parity_bundle(tmp_path_factory):
    """An ort W8A16 bundle built against impossible thresholds with --allow-low-parity: written, gate recorded as
    failed-but-allowed. (Tests that need a refusal build the same recipe without the flag.)"""
    recipe = small_recipe(graph_min_sqnr_db=200.0, final_latent_min_psnr_db=200.0)
    return build(recipe, tmp_path_factory.mktemp("lowparity") / "bundle", allow_low_parity=True)



@pytest.fixture(scope="session")
def w8a16_bundle(tmp_path_factory):
    """An ort W8A16 bundle at the recipe's own thresholds: text encoder and VAE decoder quantized too."""
    return build(small_recipe(), tmp_path_factory.mktemp("w8a16") / "bundle")


@pytest.fixture(scope="session")
def quant():
    """The helpers above, for test modules (pytest runs with --import-mode=importlib: no sys.path imports)."""
    return SimpleNamespace(build=build, small_recipe=small_recipe)
