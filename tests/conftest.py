"""Shared fixtures: the tiny random pipeline and one FP32 bundle of it, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # helper modules beside the tests (qdq_graphs, readme_lines)
FIXTURE_MODEL = "tiny-random"


@pytest.fixture(scope="session")
def tiny_model():
    from cw_export.models.pipeline import load_model

    return load_model(FIXTURE_MODEL)


def build_fp32_bundle(out: Path, **build_overrides) -> Path:
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    recipe = load_recipe("cpu-fp32").with_build(**build_overrides)
    return build_bundle(recipe, BuildOptions(model=FIXTURE_MODEL, out=out, progress=False))


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory) -> Path:
    """Read-only FP32 bundle (8 steps, clock 2, identity adaptor); tests that modify a bundle copy it first."""
    return build_fp32_bundle(tmp_path_factory.mktemp("fp32") / "bundle")


@pytest.fixture(scope="session")
def make_fp32_bundle():
    """The bundle builder itself, for tests that need a fresh or failing build."""
    return build_fp32_bundle


@pytest.fixture(scope="session")
def sdxl_fp32_bundle(tmp_path_factory) -> Path:
    """Read-only FP32 bundle of the SDXL-structured ``tiny-sdxl`` (8 steps, clock 2, identity adaptor)."""
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    out = tmp_path_factory.mktemp("sdxl") / "bundle"
    return build_bundle(load_recipe("cpu-fp32"), BuildOptions(model="tiny-sdxl", out=out, progress=False))
