"""`--model builtin` is the trained shapes model, built with its own distilled adaptor unless told otherwise."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from user_errors import assert_refused

from cw_export.models.declared import MODEL_DEFAULTS_NAME, declared_guidance
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


def test_default_build_uses_the_shipped_adaptor_and_the_declared_guidance(tmp_path):
    manifest = build(tmp_path / "b")
    assert manifest["source_model"]["name"] == "shapes"
    declared = json.loads((SHAPES_DIR / MODEL_DEFAULTS_NAME).read_text())["guidance_scale"]
    assert manifest["guidance_scale"] == declared != 7.5  # the model's own, not the recipe's 7.5
    assert manifest["adaptor"]["kind"] == "learned"
    assert manifest["adaptor"]["checkpoint_sha256"] == hashlib.sha256(SHAPES_ADAPTOR.read_bytes()).hexdigest()
    assert "adaptor" in manifest["wiring"]["steps"]["clocked"]
    assert manifest["recipe"]["build"]["adaptor"] == "learned"  # the manifest's recipe says what was built


@pytest.mark.parametrize("flags", [("--adaptor", "identity"), ("--clock", "3"), ("--guidance", "7.5")],
                         ids=["asked-for-identity", "schedule-the-adaptor-was-not-distilled-for",
                              "guidance-the-adaptor-was-not-distilled-for"])
def test_recipe_adaptor_when_asked_or_when_the_shipped_one_does_not_fit(tmp_path, flags):
    manifest = build(tmp_path / "b", *flags)
    assert manifest["adaptor"] == {"kind": "identity"}
    assert "adaptor" not in manifest["graphs"]


def test_validate_finds_the_shipped_adaptor_weights_by_checksum():
    """`validate` re-measures a learned-adaptor bundle's parity only against the FP32 adaptor it was built with."""
    from cw_export.validate.parity import shipped_adaptor_state

    model = load_model("builtin")
    sha = hashlib.sha256(SHAPES_ADAPTOR.read_bytes()).hexdigest()
    state = shipped_adaptor_state(model, {"adaptor": {"kind": "learned", "checkpoint_sha256": sha}})
    assert state and all(hasattr(v, "shape") for v in state.values())
    assert shipped_adaptor_state(model, {"adaptor": {"kind": "learned", "checkpoint_sha256": "0" * 64}}) is None
    assert shipped_adaptor_state(load_model("tiny-random"), {"adaptor": {"checkpoint_sha256": sha}}) is None


def test_declared_guidance_of_a_model_folder(tmp_path):
    """A folder's cw_export.json declares its guidance; none for generated models; a bad value is one ModelError."""
    from cw_export.errors import ModelError

    assert declared_guidance("tiny-random") is None and declared_guidance(str(tmp_path)) is None
    (tmp_path / MODEL_DEFAULTS_NAME).write_text('{"guidance_scale": 3}')
    assert declared_guidance(str(tmp_path)) == 3.0
    for bad in ('{"guidance_scale": -1}', '{"guidance_scale": "high"}', "[1, 2"):
        (tmp_path / MODEL_DEFAULTS_NAME).write_text(bad)
        with pytest.raises(ModelError, match=MODEL_DEFAULTS_NAME):
            declared_guidance(str(tmp_path))


def test_bad_declared_guidance_is_one_line_exit_2_and_nothing_written(tmp_path):
    folder = tmp_path / "model"
    made = subprocess.run([sys.executable, "-m", "cw_export.cli", "model", "--model", "tiny-random", "--out",
                           str(folder)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    (folder / MODEL_DEFAULTS_NAME).write_text('{"guidance_scale": "strong"}')
    out = tmp_path / "bundle"
    result = subprocess.run([sys.executable, "-m", "cw_export.cli", "--model", str(folder), "--target", "cpu-fp32",
                             "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert_refused(result, "guidance_scale must be a finite number", tmp_path, {"model"})


def test_an_explicit_checkpoint_at_another_guidance_is_used_with_a_warning(capsys):
    """--adaptor-checkpoint is the user's choice: another guidance is said on stderr, not refused."""
    from cw_export.build import check_adaptor_checkpoint
    from cw_export.distill.checkpoint import read_checkpoint
    from cw_export.recipe import load_recipe

    distilled_at = read_checkpoint(SHAPES_ADAPTOR).training["guidance_scale"]
    recipe = load_recipe("cpu-fp32").with_build(adaptor="learned")
    check_adaptor_checkpoint(recipe.with_build(guidance_scale=distilled_at), SHAPES_ADAPTOR)
    assert capsys.readouterr().err == ""
    check_adaptor_checkpoint(recipe.with_build(guidance_scale=distilled_at + 3.5), SHAPES_ADAPTOR)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and f"guidance {distilled_at:g}" in err
