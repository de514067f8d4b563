"""`--model builtin` is the trained shapes model, built with its own distilled adaptor unless told otherwise."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cw_export.models.pipeline import SHAPES_ADAPTOR, SHAPES_DIR, load_model

pytestmark = pytest.mark.skipif(not (SHAPES_DIR / "model_index.json").is_file() or not SHAPES_ADAPTOR.is_file(),
                                reason="trained shapes weights or adaptor not present")


def build(out: Path, *flags: str) -> dict:
    """`cw-export --target cpu-fp32` with the default model; returns the bundle's manifest."""
    result = subprocess.run([sys.executable, "-m", "cw_export.cli", "--target", "cpu-fp32", "--out", str(out),
                             "--quiet", *flags], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_builtin_is_the_trained_shapes_model():
    builtin, shapes = load_model("builtin"), load_model("shapes")
    assert builtin.source == shapes.source
    assert builtin.source["name"] == "shapes"  # a bundle records which weights it holds


def test_default_build_uses_the_shipped_adaptor(tmp_path):
    manifest = build(tmp_path / "b")
    assert manifest["source_model"]["name"] == "shapes"
    assert manifest["adaptor"]["kind"] == "learned"
    assert manifest["adaptor"]["checkpoint_sha256"] == hashlib.sha256(SHAPES_ADAPTOR.read_bytes()).hexdigest()
    assert "adaptor" in manifest["wiring"]["steps"]["clocked"]
    assert manifest["recipe"]["build"]["adaptor"] == "learned"  # the manifest's recipe says what was built


@pytest.mark.parametrize("flags", [("--adaptor", "identity"), ("--clock", "3")],
                         ids=["asked-for-identity", "schedule-the-adaptor-was-not-distilled-for"])
def test_recipe_adaptor_when_asked_or_when_the_shipped_one_does_not_fit(tmp_path, flags):
    manifest = build(tmp_path / "b", *flags)
    assert manifest["adaptor"] == {"kind": "identity"}
    assert "adaptor" not in manifest["graphs"]
