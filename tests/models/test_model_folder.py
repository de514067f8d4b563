"""A model folder carries its Clockwork settings (docs/model_folder.md): ``cw_export.json`` and
``clockwork/adaptor.safetensors`` beside model_index.json, found by every build under the built-in's fit rules."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from user_errors import assert_refused

from cw_export.models.clockwork_folder import ADAPTOR_PATH
from cw_export.models.pipeline import MODEL_DEFAULTS_NAME, SHAPES_ADAPTOR, SHAPES_DIR

pytestmark = pytest.mark.skipif(not (SHAPES_DIR / "model_index.json").is_file() or not SHAPES_ADAPTOR.is_file(),
                                reason="trained shapes weights or adaptor not present")


def cw(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cw_export.cli", *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def builtin_folder(tmp_path_factory) -> Path:
    """``cw-export model --out DIR`` of the built-in model (read-only; tests that change it copy it)."""
    folder = tmp_path_factory.mktemp("model") / "shapes"
    result = cw("model", "--out", folder)
    assert result.returncode == 0, result.stderr
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def test_model_command_writes_the_adaptor_and_the_declared_settings(builtin_folder):
    assert (builtin_folder / ADAPTOR_PATH).read_bytes() == SHAPES_ADAPTOR.read_bytes()
    assert (builtin_folder / MODEL_DEFAULTS_NAME).read_bytes() == (SHAPES_DIR / MODEL_DEFAULTS_NAME).read_bytes()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(builtin_folder, local_files_only=True)  # still a diffusers folder
    assert pipe.unet.config.sample_size > 0


def test_build_from_the_written_folder_equals_the_builtin_build(builtin_folder, tmp_path):
    """The issue's bar: same adaptor and guidance, and (the FP32 export being deterministic) the same graphs."""
    built = {}
    for name, model in (("builtin", "builtin"), ("folder", builtin_folder)):
        out = tmp_path / name
        result = cw("--model", model, "--target", "cpu-fp32", "--out", out, "--quiet")
        assert result.returncode == 0, result.stderr
        built[name] = out
    a, b = (json.loads((built[n] / "manifest.json").read_text()) for n in ("builtin", "folder"))
    assert a["adaptor"]["kind"] == b["adaptor"]["kind"] == "learned"
    assert a["adaptor"] == b["adaptor"]
    assert a["adaptor"]["checkpoint_sha256"] == hashlib.sha256(SHAPES_ADAPTOR.read_bytes()).hexdigest()
    assert a["guidance_scale"] == b["guidance_scale"] == 4.0
    assert a["source_model"]["sha256"] == b["source_model"]["sha256"]
    assert (a["source_model"]["kind"], b["source_model"]["kind"]) == ("builtin", "folder")
    graphs = sorted(p.relative_to(built["builtin"]) for p in (built["builtin"] / "graphs").rglob("*") if p.is_file())
    assert graphs and "graphs/adaptor.onnx" in {g.as_posix() for g in graphs}
    for graph in graphs:
        assert (built["builtin"] / graph).read_bytes() == (built["folder"] / graph).read_bytes(), graph
    differing = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    # the source record, and the file table / manifest hash of README.md and report.html, which name the source
    assert differing <= {"source_model", "files", "manifest_sha256"}, differing
    assert {f for f in a["files"] if a["files"][f] != b["files"][f]} <= {"README.md", "report.html"}


def _recipe(guidance: float = 4.0):
    from cw_export.recipe import load_recipe

    return load_recipe("cpu-fp32").with_build(guidance_scale=guidance)


def test_the_folder_adaptor_is_found_under_the_builtins_fit_rules(builtin_folder, tmp_path):
    from cw_export.distill.for_build import shipped_checkpoint
    from cw_export.models.pipeline import load_model

    builtin, folder = load_model("builtin"), load_model(str(builtin_folder))
    ours, theirs = shipped_checkpoint(builtin, _recipe()), shipped_checkpoint(folder, _recipe())
    assert ours is not None and theirs is not None and ours.sha256 == theirs.sha256
    # both give it up where the adaptor was not distilled for the build (guidance, clock)
    for recipe in (_recipe(7.5), _recipe().with_build(clock=3)):
        assert shipped_checkpoint(builtin, recipe) is None and shipped_checkpoint(folder, recipe) is None
    # a folder without clockwork/ builds with the recipe's adaptor, as before
    bare = _copy(builtin_folder, tmp_path)
    shutil.rmtree(bare / "clockwork")
    assert shipped_checkpoint(load_model(str(bare)), _recipe()) is None


def test_an_adaptor_distilled_for_other_weights_is_not_used(builtin_folder, tmp_path):
    """A mismatched folder adaptor falls back exactly like the built-in's would: the build gets the recipe's."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = _copy(builtin_folder, tmp_path)
    path = folder / ADAPTOR_PATH
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    training = json.loads(metadata["training"])
    training["model_sha256"] = "0" * 64
    metadata["training"] = json.dumps(training, sort_keys=True)
    save_file(load_file(str(path)), str(path), metadata=metadata)
    out = tmp_path / "b"
    result = cw("--model", folder, "--target", "cpu-fp32", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adaptor"] == {"kind": "identity"} and manifest["guidance_scale"] == 4.0
    # asked for explicitly, the same checkpoint is refused with the fit rule's message
    refused = cw("--model", folder, "--target", "cpu-fp32", "--out", tmp_path / "c", "--adaptor", "learned",
                 "--adaptor-checkpoint", path)
    assert_refused(refused, "distilled for model sha256 000000000000", tmp_path, {"copy", "b"})


@pytest.mark.parametrize("damage, fragment", [
    ("unknown_key", "unknown key 'guidance'"),
    ("guidance_string", "guidance_scale must be a finite number"),
    ("not_an_object", "must be a JSON object"),
    ("not_json", "unreadable"),
    ("symlinked_json", "cw_export.json must be a regular file"),
    ("symlinked_adaptor", "adaptor.safetensors must be a regular file"),
    ("symlinked_clockwork", "clockwork must be a folder"),
    ("adaptor_is_a_folder", "adaptor.safetensors must be a regular file"),
    ("corrupt_adaptor", "cannot read adaptor checkpoint"),
])
def test_bad_clockwork_settings_are_refused_with_exit_2(builtin_folder, tmp_path, damage, fragment):
    folder = _copy(builtin_folder, tmp_path)
    defaults, adaptor = folder / MODEL_DEFAULTS_NAME, folder / ADAPTOR_PATH
    outside = tmp_path / "outside"
    outside.mkdir()
    if damage == "unknown_key":
        defaults.write_text(json.dumps({"guidance": 4}))
    elif damage == "guidance_string":
        defaults.write_text(json.dumps({"guidance_scale": "4"}))
    elif damage == "not_an_object":
        defaults.write_text("[4]")
    elif damage == "not_json":
        defaults.write_text("{guidance_scale: 4")
    elif damage == "symlinked_json":
        shutil.move(defaults, outside / "cw_export.json")
        defaults.symlink_to(outside / "cw_export.json")
    elif damage == "symlinked_adaptor":
        shutil.move(adaptor, outside / "adaptor.safetensors")
        adaptor.symlink_to(outside / "adaptor.safetensors")
    elif damage == "symlinked_clockwork":
        shutil.move(folder / "clockwork", outside / "clockwork")
        (folder / "clockwork").symlink_to(outside / "clockwork")
    elif damage == "adaptor_is_a_folder":
        adaptor.unlink()
        adaptor.mkdir()
    else:
        adaptor.write_bytes(adaptor.read_bytes()[:200])
    out = tmp_path / "b"
    assert_refused(cw("--model", folder, "--target", "cpu-fp32", "--out", out, "--quiet"), fragment, tmp_path,
                   {"copy", "outside"})


def test_distill_out_model_writes_a_folder_that_builds_with_the_new_adaptor(builtin_folder, tmp_path):
    from cw_export.distill.for_build import shipped_checkpoint
    from cw_export.models.pipeline import load_model

    env = {**os.environ, "CW_EXPORT_CACHE": str(tmp_path / "cache")}
    ckpt, out_model = tmp_path / "a.safetensors", tmp_path / "tuned"
    result = cw("distill", "--model", builtin_folder, "--num-prompts", "2", "--epochs", "1", "--guidance", "3",
                "--out", ckpt, "--out-model", out_model, "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert (out_model / ADAPTOR_PATH).read_bytes() == ckpt.read_bytes() != SHAPES_ADAPTOR.read_bytes()
    declared = json.loads((out_model / MODEL_DEFAULTS_NAME).read_text())
    assert declared["guidance_scale"] == 3.0
    assert declared["calibration_set"] == "shapes-train"  # the rest of the source's declarations kept
    found = shipped_checkpoint(load_model(str(out_model)), _recipe(3.0))
    assert found is not None and found.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert shipped_checkpoint(load_model(str(out_model)), _recipe(4.0)) is None


def test_distill_out_model_needs_a_model_folder(tmp_path):
    result = cw("distill", "--model", "tiny-random", "--out", tmp_path / "a.safetensors",
                "--out-model", tmp_path / "m", "--quiet")
    assert_refused(result, "is generated in code", tmp_path)
