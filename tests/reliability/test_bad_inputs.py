"""Bad inputs to every command: one line on stderr, exit code 2, no traceback, nothing written at the output path.

Cases already in tests/cli/test_cli.py (clock 0, steps 0, clock > steps, guidance nan, unknown target, missing model
folder, learned adaptor without checkpoint, height 100, unknown flag, init-latents shape, embeds keys, missing
bundle, latents-out folder, empty prompt, model folders without index / with corrupt index / without unet / with
corrupt unet weights) are not repeated here. Bundles with a changed, missing or extra byte: test_integrity.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import SUBPROCESS_ENV
from user_errors import assert_refused, assert_user_error

BUILD = ("--model", "tiny-random", "--target", "cpu-fp32", "--quiet")  # a later --model/--target wins


# --- build: flags and recipes (rejected before the model is loaded) ----------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--clock", "-1"], "--clock must be >= 1, got -1"),
    (["--steps", "2.5"], "--steps must be an integer, got '2.5'"),
    (["--guidance", "inf"], "--guidance must be a finite number >= 0"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
    (["--height", "-8"], "--height must be >= 0"),
    (["--adaptor", "magic"], "invalid choice: 'magic'"),
    (["--target", ""], "unknown target ''"),
])
def test_build_flag_errors(cw, tmp_path, args, fragment):
    assert_refused(cw(*BUILD, "--out", tmp_path / "bundle", *args), fragment, tmp_path)


@pytest.mark.parametrize("text, fragment", [
    ("schema_version = 1\nname = 'x'\ndescription = 'x'\n[build]\nstepz = 4\n", "unknown key(s) ['stepz'] in [build]"),
    ("schema_version = 1\nname = 'x'\ndescription = 'x'\n[build\n", "not valid TOML"),
    ("schema_version = 7\nname = 'x'\ndescription = 'x'\n", "schema_version 7 is not supported"),
    ("schema_version = 1\nname = 'x'\ndescription = 'x'\n[build]\nsteps = 'eight'\n", "steps must be int"),
])
def test_bad_recipe_files(cw, tmp_path, text, fragment):
    recipe = tmp_path / "recipes" / "bad.toml"
    recipe.parent.mkdir()
    recipe.write_text(text)
    assert_refused(cw(*BUILD, "--target", recipe, "--out", tmp_path / "out" / "bundle"), fragment, tmp_path,
                   {"recipes"})


def test_out_is_a_file(cw, tmp_path):
    target = tmp_path / "bundle"
    target.write_text("keep me")
    assert_refused(cw(*BUILD, "--out", target, "--overwrite"), "exists and is not a folder", tmp_path, {"bundle"})
    assert target.read_text() == "keep me"


def test_out_parent_missing(cw, tmp_path):
    assert_refused(cw(*BUILD, "--out", tmp_path / "no" / "bundle"), "parent folder of the output does not exist",
                   tmp_path)


def test_existing_bundle_needs_overwrite(cw, bundle_copy):
    before = (bundle_copy / "manifest.json").read_bytes()
    assert_refused(cw(*BUILD, "--out", bundle_copy), "use --overwrite to replace it", bundle_copy.parent, {"bundle"})
    assert (bundle_copy / "manifest.json").read_bytes() == before


def test_adaptor_checkpoint_missing(cw, tmp_path):
    result = cw(*BUILD, "--out", tmp_path / "bundle", "--adaptor", "learned", "--adaptor-checkpoint",
                tmp_path / "nope.safetensors")
    assert_refused(result, "adaptor checkpoint not found", tmp_path)


def test_read_only_output_folder(cw, tmp_path, mount_tmpfs):
    parent = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    assert_refused(cw(*BUILD, "--out", parent / "bundle"), "not writable", parent)


# --- build: calibration prompt files (--calibration, quantized targets) ------------------------------------------

def _prompt_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "prompts.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "comments_only":
        path.write_text("# header\n\n   \n# nothing else\n")
    elif kind == "binary":
        path.write_bytes(b"a cat\n\x00\x01\x02binary")
    elif kind == "latin1":
        path.write_bytes("a caf\xe9 at night\n".encode("latin-1"))
    elif kind == "huge":
        with open(path, "wb") as handle:
            handle.truncate(5 * 1024 * 1024)  # sparse: rejected by size before a byte is read
    elif kind == "fifo":
        os.mkfifo(path)  # never a regular file: would block a reader forever
    elif kind == "folder":
        path.mkdir()
    elif kind == "dangling_link":
        path.symlink_to(tmp_path / "gone.txt")
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("empty", "no prompts"),
    ("comments_only", "no prompts"),
    ("binary", "not UTF-8 text (NUL byte"),
    ("latin1", "not UTF-8 text (invalid byte"),
    ("huge", "too large"),
    ("fifo", "not a regular file"),
    ("folder", "is a directory"),
    ("dangling_link", "no such file"),
])
def test_bad_calibration_prompt_files(cw, tmp_path, kind, fragment):
    prompts = _prompt_file(tmp_path, kind)
    out = tmp_path / "out"
    out.mkdir()
    result = cw(*BUILD, "--target", "snapdragon-int8", "--calibration", prompts, "--out", out / "bundle")
    assert_refused(result, fragment, out)


def test_calibration_flag_on_fp32_target(cw, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    result = cw(*BUILD, "--target", "cpu-fp32", "--calibration", prompts, "--out", tmp_path / "bundle")
    assert_refused(result, "only apply to quantized targets", tmp_path, {"p.txt"})


# --- build: model folders and shapes (rejected after the model is loaded, before or while exporting) -------------

def _damaged_model(model_folder: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / "model"
    if damage == "empty_folder":
        folder.mkdir()
        return folder
    if damage == "is_a_file":
        folder.write_text("not a model")
        return folder
    shutil.copytree(model_folder, folder)
    if damage == "corrupt_text_encoder_config":
        (folder / "text_encoder" / "config.json").write_text("{ not json")
    elif damage == "no_scheduler_config":
        (folder / "scheduler" / "scheduler_config.json").unlink()
    elif damage == "empty_tokenizer":
        shutil.rmtree(folder / "tokenizer")
        (folder / "tokenizer").mkdir()
    elif damage == "truncated_vae":
        weights = next((folder / "vae").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:64])
    elif damage == "scheduler_config_list":
        (folder / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
    elif damage == "scheduler_config_nested":
        (folder / "scheduler" / "scheduler_config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif damage == "index_nested":
        (folder / "model_index.json").write_text("[" * 100_000 + "]" * 100_000)
    elif damage == "unknown_scheduler_class":
        _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="FooScheduler")
    elif damage == "sample_size_0":
        _edit_json(folder / "unet" / "config.json", sample_size=0)
    elif damage == "pickle_weights":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Unpickled(tmp_path)))
    return folder


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


class _Unpickled:
    """Unpickling this creates ``<folder>/unpickled``: proof that a pickle was (not) loaded."""

    def __init__(self, folder: Path) -> None:
        self.marker = str(folder / "unpickled")

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("damage, fragment", [
    ("empty_folder", "no model_index.json"),
    ("is_a_file", "model path is not a folder"),
    ("corrupt_text_encoder_config", "cannot load text_encoder"),
    ("no_scheduler_config", "cannot read scheduler config"),
    ("empty_tokenizer", "tokenizer"),
    ("truncated_vae", "cannot load vae"),
    ("scheduler_config_list", "scheduler_config.json must hold a JSON object, got a list"),
    ("scheduler_config_nested", "cannot read scheduler config in"),
    ("index_nested", "corrupt model_index.json"),
    ("unknown_scheduler_class", "scheduler _class_name 'FooScheduler'"),
    ("sample_size_0", "sample_size must be an integer >= 1"),
    ("pickle_weights", "has pickle weights only (diffusion_pytorch_model.bin)"),
])
def test_broken_model_folders(cw, model_folder, tmp_path, damage, fragment):
    folder = _damaged_model(model_folder, tmp_path, damage)
    out = tmp_path / "out"
    out.mkdir()
    line = assert_refused(cw(*BUILD, "--model", folder, "--out", out / "bundle"), fragment, out)
    assert not (tmp_path / "unpickled").exists(), "a pickle in the model folder was loaded"
    if damage == "unknown_scheduler_class":  # the line says what is supported
        assert "DPMSolverMultistepScheduler" in line and "PNDMScheduler" in line, line


def test_out_inside_the_model_folder(cw, model_folder, tmp_path):
    """A bundle written into the model folder would change the model's own hash (the bundle's provenance)."""
    from cw_export.models.pipeline import folder_hash

    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    before = folder_hash(folder)
    assert_user_error(cw(*BUILD, "--model", folder, "--out", folder / "unet" / "bundle"),
                      "is inside the model folder")
    assert folder_hash(folder) == before


def test_out_containing_the_model_folder(cw, model_folder, tmp_path):
    """--overwrite of a folder that holds the model would delete the model."""
    from cw_export.models.pipeline import folder_hash

    folder = Path(shutil.copytree(model_folder, tmp_path / "work" / "model"))
    before = folder_hash(folder)
    assert_refused(cw(*BUILD, "--model", folder, "--out", tmp_path / "work", "--overwrite"),
                   "contains the model folder", tmp_path / "work", {"model"})
    assert folder_hash(folder) == before


def test_unet_with_too_few_resolution_levels(cw, tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    from cw_export.models import configs
    from cw_export.models.pipeline import save_model

    two_levels = dict(configs.TINY_UNET, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64])
    folder = save_model(dataclasses.replace(tiny_model, unet=UNet2DConditionModel(**two_levels).eval()),
                        tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(cw(*BUILD, "--model", folder, "--out", out / "bundle"),
                   "UNet has 2 resolution levels; the Clockwork split needs at least 3", out)


@pytest.mark.parametrize("args, fragment", [
    (["--width", "36"], "--width 36 must be divisible by 8 (VAE factor 2 x UNet factor 4)"),
    (["--height", "20"], "--height 20 must be divisible by 8"),  # divisible by the VAE factor, not the UNet's
])
def test_size_not_divisible(cw, tmp_path, args, fragment):
    assert_refused(cw(*BUILD, "--out", tmp_path / "bundle", *args), fragment, tmp_path)


def test_corrupt_adaptor_checkpoint(cw, tmp_path):
    checkpoint = tmp_path / "adaptor.safetensors"
    checkpoint.write_bytes(b"\xff" * 100)
    result = cw(*BUILD, "--out", tmp_path / "bundle", "--adaptor", "learned", "--adaptor-checkpoint", checkpoint)
    assert_refused(result, "cannot read adaptor checkpoint", tmp_path, {"adaptor.safetensors"})


def test_not_enough_memory(cw, tmp_path, monkeypatch):
    import cw_export.models.memory_check as resources_check

    monkeypatch.setattr(resources_check, "available_memory_bytes", lambda: 64 * 1024**2)
    monkeypatch.setattr(resources_check, "resident_bytes", lambda **_: 0)  # the tiny build's estimate is mostly held
    line = assert_refused(cw(*BUILD, "--out", tmp_path / "bundle"),
                          "GiB of memory (0.0 GiB of it held already) but only 0.1 GiB is available", tmp_path)
    assert "needs an estimated 1.5 GiB" in line


def test_disk_full_during_export(cw, tmp_path, mount_tmpfs):
    """A 1 MiB file system: the first graph does not fit (a real ENOSPC, raised inside torch.onnx.export)."""
    parent = mount_tmpfs(tmp_path / "small", "size=1m")
    result = cw(*BUILD, "--out", parent / "bundle")
    assert_refused(result, f"no space left on device writing {parent / 'bundle'}", parent)


# --- run ------------------------------------------------------------------------------------------------------------

def _run_args(tmp_path: Path, case: str) -> list:
    noise = np.random.default_rng(0).standard_normal([1, 4, 16, 16]).astype(np.float32)
    embeds = np.zeros([1, 77, 32], np.float32)
    f = tmp_path / "input"
    text, seed = ["--prompt", "a red square"], ["--seed", "1"]
    if case == "latents_nan":
        noise[0, 0, 0, 0] = np.nan
        np.save(f.with_suffix(".npy"), noise)
        return [*text, "--init-latents", f.with_suffix(".npy")]
    if case == "latents_int":
        np.save(f.with_suffix(".npy"), noise.astype(np.int32))
        return [*text, "--init-latents", f.with_suffix(".npy")]
    if case == "latents_garbage":
        f.with_suffix(".npy").write_text("this is not numpy")
        return [*text, "--init-latents", f.with_suffix(".npy")]
    if case == "latents_missing":
        return [*text, "--init-latents", tmp_path / "missing.npy"]
    if case == "latents_channels":
        np.save(f.with_suffix(".npy"), np.zeros([1, 3, 16, 16], np.float32))
        return [*text, "--init-latents", f.with_suffix(".npy")]
    if case == "embeds_dim":
        narrow = np.zeros([1, 77, 16], np.float32)
        np.savez(f.with_suffix(".npz"), cond=narrow, uncond=narrow)
        return ["--text-embeds", f.with_suffix(".npz"), *seed]
    if case == "embeds_mismatch":
        np.savez(f.with_suffix(".npz"), cond=embeds, uncond=np.zeros([1, 76, 32], np.float32))
        return ["--text-embeds", f.with_suffix(".npz"), *seed]
    if case == "embeds_rank":
        np.savez(f.with_suffix(".npz"), cond=embeds[0], uncond=embeds[0])
        return ["--text-embeds", f.with_suffix(".npz"), *seed]
    if case == "embeds_npy":
        np.save(f.with_suffix(".npy"), embeds)
        return ["--text-embeds", f.with_suffix(".npy"), *seed]
    if case == "embeds_garbage":
        f.with_suffix(".npz").write_bytes(b"PK\x03\x04 not really a zip")
        return ["--text-embeds", f.with_suffix(".npz"), *seed]
    if case == "embeds_inf":
        bad = embeds.copy()
        bad[0, 0, 0] = np.inf
        np.savez(f.with_suffix(".npz"), cond=bad, uncond=embeds)
        return ["--text-embeds", f.with_suffix(".npz"), *seed]
    if case == "clock_gt_steps":
        return [*text, *seed, "--steps", "2", "--clock", "3"]
    if case == "guidance_nan":
        return [*text, *seed, "--guidance", "nan"]
    if case == "seed_text":
        return [*text, "--seed", "abc"]
    if case == "seed_negative":
        return [*text, "--seed", "-1"]
    if case == "latents_huge":  # finite, but the first step overflows float32
        np.save(f.with_suffix(".npy"), np.full([1, 4, 16, 16], 1e38, np.float32))
        return [*text, "--init-latents", f.with_suffix(".npy")]
    if case == "guidance_huge":  # finite as a float64 flag, infinite as the float32 the loop computes in
        return [*text, *seed, "--guidance", "1e300"]
    raise AssertionError(case)


@pytest.mark.parametrize("case, fragment", [
    ("latents_nan", "contains NaN or infinite values"),
    ("latents_int", "must hold one float array"),
    ("latents_garbage", "cannot read --init-latents"),
    ("latents_missing", "--init-latents file not found"),
    ("latents_channels", "init latents have shape [1, 3, 16, 16]; the bundle needs [1, 4, 16, 16]"),
    ("embeds_dim", "text embeddings have shape [2, 77, 16]; the bundle needs [2, 77, 32]"),
    ("embeds_mismatch", "differ in shape"),
    ("embeds_rank", "must be [1, seq, dim]"),
    ("embeds_npy", "must be an .npz"),
    ("embeds_garbage", "cannot read text embeddings"),
    ("embeds_inf", "contain NaN or infinite values"),
    ("clock_gt_steps", "--clock 3 is larger than --steps 2"),
    ("guidance_nan", "--guidance must be a finite number"),
    ("seed_text", "--seed must be an integer, got 'abc'"),
    ("seed_negative", "--seed must be >= 0, got -1"),
    ("latents_huge", "step 1 of 8 (full) produced NaN or infinite latents"),
    ("guidance_huge", "produced NaN or infinite latents: the inputs are far out of range (guidance 1e+300"),
])
def test_run_input_errors(cw, fp32_bundle, tmp_path, case, fragment):
    args = _run_args(tmp_path, case)
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "latents.npy"
    assert_refused(cw("run", fp32_bundle, *args, "--latents-out", out, "--quiet"), fragment, tmp_path, before)


def test_run_image_of_non_finite_pixels(cw, fp32_bundle, tmp_path):
    """Guidance 1e37 keeps the latents finite (1e36) but the VAE decoder overflows: no PNG of clipped NaNs."""
    out = tmp_path / "image.png"
    result = cw("run", fp32_bundle, "--prompt", "x", "--seed", "1", "--guidance", "1e37", "--image-out", out, "--quiet")
    assert_refused(result, "the VAE decoder produced NaN or infinite pixels", tmp_path)


def test_run_prompt_not_utf8(fp32_bundle, tmp_path):
    """Raw argv bytes that are not UTF-8 (the real console entry point: Python decodes them as lone surrogates)."""
    out = tmp_path / "latents.npy"
    done = subprocess.run([sys.executable, "-m", "cw_export.cli", "run", os.fsencode(fp32_bundle), "--prompt",
                           b"caf\xe9 \xff", "--seed", "1", "--latents-out", os.fsencode(out), "--quiet"],
                          capture_output=True, text=True, env={**os.environ, **SUBPROCESS_ENV}, timeout=300)
    assert_refused(done, "--prompt is not UTF-8 text", tmp_path)


def _output_clash(tmp_path: Path, bundle: Path, case: str) -> list:
    text, seed = ["--prompt", "x"], ["--seed", "1"]
    noise = tmp_path / "noise.npy"
    np.save(noise, np.zeros([1, 4, 16, 16], np.float32))
    if case == "image_over_bundle_file":
        return [*text, *seed, "--image-out", bundle / "README.md"]
    if case == "latents_new_file_in_bundle":
        return [*text, *seed, "--latents-out", bundle / "graphs" / "new.npy"]
    if case == "through_a_link_to_the_bundle":
        (tmp_path / "link").symlink_to(bundle)
        return [*text, *seed, "--image-out", tmp_path / "link" / "x.png"]
    if case == "latents_over_init_latents":
        return [*text, "--init-latents", noise, "--latents-out", tmp_path / "." / "noise.npy"]
    if case == "latents_over_text_embeds":
        embeds = tmp_path / "embeds.npz"
        np.savez(embeds, cond=np.zeros([1, 77, 32], np.float32), uncond=np.zeros([1, 77, 32], np.float32))
        return ["--text-embeds", embeds, *seed, "--latents-out", embeds]
    if case == "image_over_hard_link_of_input":
        os.link(noise, tmp_path / "alias.npy")
        return [*text, "--init-latents", noise, "--image-out", tmp_path / "alias.npy"]
    if case == "image_equals_latents":
        return [*text, *seed, "--latents-out", tmp_path / "out", "--image-out", tmp_path / "out"]
    raise AssertionError(case)


@pytest.mark.parametrize("case, fragment", [
    ("image_over_bundle_file", "is inside the bundle"),
    ("latents_new_file_in_bundle", "is inside the bundle"),
    ("through_a_link_to_the_bundle", "is inside the bundle"),
    ("latents_over_init_latents", "--latents-out and --init-latents name the same file"),
    ("latents_over_text_embeds", "--latents-out and --text-embeds name the same file"),
    ("image_over_hard_link_of_input", "--image-out and --init-latents name the same file"),
    ("image_equals_latents", "--image-out and --latents-out name the same file"),
])
def test_run_outputs_clash(cw, bundle_copy, tmp_path, case, fragment):
    """run writes neither into the bundle it just verified nor over its inputs or its other output."""
    from cw_export.contract.manifest import read_manifest, verify_bundle

    work = tmp_path / "work"
    work.mkdir()
    args = _output_clash(work, bundle_copy, case)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file() and not p.is_symlink()}
    assert_user_error(cw("run", bundle_copy, *args, "--quiet"), fragment)
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file() and not p.is_symlink()} == before
    assert verify_bundle(bundle_copy, read_manifest(bundle_copy)) == []


def test_run_needs_an_output(cw, fp32_bundle, tmp_path):
    assert_refused(cw("run", fp32_bundle, "--prompt", "x", "--seed", "1"), "--latents-out", tmp_path)


def test_run_output_on_full_disk(cw, fp32_bundle, tmp_path, mount_tmpfs):
    parent = mount_tmpfs(tmp_path / "small", "size=4k")  # one page: the 4224-byte .npy does not fit
    out = parent / "latents.npy"
    result = cw("run", fp32_bundle, "--prompt", "x", "--seed", "1", "--steps", "1", "--clock", "1",
                "--latents-out", out, "--quiet")
    assert_refused(result, f"no space left on device writing {out}", parent)


def test_run_output_on_read_only_file_system(cw, fp32_bundle, tmp_path, mount_tmpfs):
    parent = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    out = parent / "latents.npy"
    result = cw("run", fp32_bundle, "--prompt", "x", "--seed", "1", "--steps", "1", "--clock", "1",
                "--latents-out", out, "--quiet")
    assert_refused(result, f"read-only file system writing {out}", parent)


# --- validate and model -----------------------------------------------------------------------------------------

def test_validate_empty_folder(cw, tmp_path):
    assert_user_error(cw("validate", tmp_path), "not a bundle (no manifest.json)")


def test_validate_a_file(cw, tmp_path):
    (tmp_path / "bundle").write_text("x")
    assert_user_error(cw("validate", tmp_path / "bundle"), "bundle folder not found")


def test_validate_without_bundle_argument(cw):
    assert_user_error(cw("validate"), "the following arguments are required: bundle")


def test_model_command_rejects_folders_as_model(cw, model_folder, tmp_path):
    assert_refused(cw("model", "--model", model_folder, "--out", tmp_path / "m"), "must be a built-in model", tmp_path)


def test_model_command_out_is_a_file(cw, tmp_path):
    (tmp_path / "m").write_text("keep")
    assert_user_error(cw("model", "--out", tmp_path / "m", "--overwrite"), "exists and is not a folder")
    assert (tmp_path / "m").read_text() == "keep"


def test_manifest_with_wrong_structure_is_one_line(cw, bundle_copy):
    """A hand-edited manifest (valid JSON, right schema, wrong types) is a bundle error, not a crash."""
    from cw_export.contract.manifest import manifest_bytes

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"] = ["graphs/low_res.onnx"]
    (bundle_copy / "manifest.json").write_bytes(manifest_bytes(manifest))
    assert_user_error(cw("validate", bundle_copy), "manifest")
    out = bundle_copy.parent / "o.npy"
    assert_refused(cw("run", bundle_copy, "--prompt", "x", "--seed", "1", "--latents-out", out, "--no-verify"),
                   "manifest", bundle_copy.parent, {"bundle"})


def test_manifest_nested_too_deeply(cw, bundle_copy, tmp_path):
    """A manifest.json of 100,000 nested lists is one line (not a RecursionError) for validate and run."""
    (bundle_copy / "manifest.json").write_text('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_user_error(cw("validate", bundle_copy), "nested too deeply")
    assert_refused(cw("run", bundle_copy, "--prompt", "x", "--seed", "1", "--latents-out", tmp_path / "o.npy"),
                   "nested too deeply", tmp_path, {"bundle"})


@pytest.mark.parametrize("edit, fragment", [
    ({"schedule": None}, "manifest schedule: must be an object, got NoneType"),
    ({"latent": {"shape": [1]}}, "manifest latent.shape: must be [1, channels, height, width], got [1]"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_resigned_manifest_with_fields_run_cannot_use(cw, bundle_copy, tmp_path, command, edit, fragment):
    """Re-signed (every hash consistent), so only the field checks can refuse it: validate refuses what run could
    not run, and run refuses it before reading anything else (even with --no-verify)."""
    from cw_export.contract.manifest import manifest_bytes

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / "manifest.json").write_bytes(manifest_bytes({**manifest, **edit}))
    out = tmp_path / "o.npy"
    args = ["--prompt", "x", "--seed", "1", "--latents-out", out, "--no-verify"] if command == "run" else []
    assert_refused(cw(command, bundle_copy, *args), fragment, tmp_path, {"bundle"})
