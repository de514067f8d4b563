"""The command-line contract: README Quickstart, exit codes, one-line errors, run/validate/model commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from user_errors import assert_refused, assert_user_error

REPO = Path(__file__).resolve().parents[2]


def cw(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cw_export.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_ci_runs_the_readme_test_line_verbatim():
    sys.path.insert(0, str(REPO / "tests"))
    from readme_lines import quickstart_lines

    lines = quickstart_lines()
    assert len(lines) == 2
    assert "cw-export" in lines[0] and "pytest" in lines[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert "readme_lines.py test" in ci
    printed = subprocess.run([sys.executable, str(REPO / "tests" / "readme_lines.py"), "test"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed == lines[1]


@pytest.mark.parametrize("args, fragment", [
    (["--clock", "0"], "--clock must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "4", "--clock", "5"], "larger than --steps"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--target", "no-such-target"], "unknown target 'no-such-target'"),
    (["--model", "/nonexistent/model"], "model folder not found"),
    (["--height", "100"], "must be divisible"),
    (["--bogus-flag"], "unrecognized arguments"),
])
def test_build_errors_are_one_line_exit_2_and_write_nothing(tmp_path, args, fragment):
    out = tmp_path / "bundle"
    result = cw("--model", "tiny-random", "--out", str(out), *args) if "--model" not in args else \
        cw("--out", str(out), *args)
    assert_refused(result, fragment, tmp_path)


def test_run_with_text_embeds_and_init_latents_matches_python_api(fp32_bundle, tiny_model, tmp_path):
    from cw_export.reference import text_embeddings
    from cw_export.runtime.pipeline import BundleRunner

    hidden, pooled = text_embeddings(tiny_model, "a yellow star at the bottom")
    np.savez(tmp_path / "emb.npz", uncond=hidden[:1].numpy(), cond=hidden[1:].numpy())
    noise = np.random.default_rng(3).standard_normal([1, 4, 16, 16]).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    result = cw("run", str(fp32_bundle), "--text-embeds", str(tmp_path / "emb.npz"), "--init-latents",
                str(tmp_path / "noise.npy"), "--steps", "4", "--clock", "2", "--latents-out",
                str(tmp_path / "out.npy"), "--quiet")
    assert result.returncode == 0, result.stderr
    expected = BundleRunner(fp32_bundle).generate(hidden.numpy(), None, noise, steps=4, clock=2).latents
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=0, atol=1e-6)


def test_run_with_prompt_and_seed_is_reproducible(fp32_bundle, tmp_path):
    outs = []
    for name in ("a.npy", "b.npy"):
        result = cw("run", str(fp32_bundle), "--prompt", "a red circle", "--seed", "5", "--latents-out",
                    str(tmp_path / name), "--quiet")
        assert result.returncode == 0, result.stderr
        outs.append(np.load(tmp_path / name))
    assert outs[0].shape == (1, 4, 16, 16) and np.array_equal(outs[0], outs[1]) and np.isfinite(outs[0]).all()


def test_run_negative_prompt_is_the_uncond_text_and_seed_is_float32_pcg64(fp32_bundle, tmp_path):
    from cw_export.runtime.pipeline import BundleRunner

    outs = {}
    for name, extra in (("plain", []), ("neg", ["--negative-prompt", "a green square"])):
        result = cw("run", str(fp32_bundle), "--prompt", "a red circle", "--seed", "5", *extra, "--steps", "4",
                    "--latents-out", str(tmp_path / f"{name}.npy"), "--quiet")
        assert result.returncode == 0, result.stderr
        outs[name] = np.load(tmp_path / f"{name}.npy")
    assert not np.array_equal(outs["plain"], outs["neg"])
    runner = BundleRunner(fp32_bundle)
    hidden, pooled = runner.encode_prompt("a red circle", "a green square")
    noise = np.random.default_rng(5).standard_normal(runner.latent_shape(), dtype=np.float32)
    expected = runner.generate(hidden, pooled, noise, steps=4).latents
    assert np.array_equal(outs["neg"], expected)


def test_run_help_documents_negative_prompt_seed_and_pooled_embeds():
    result = cw("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--negative-prompt" in text
    assert "numpy.random.default_rng(N).standard_normal(latent shape, dtype=float32)" in text
    assert "learned adaptor also require 'cond_pooled' and 'uncond_pooled'" in text


def test_run_prompt_to_png_with_onnxruntime_only(fp32_bundle, tmp_path):
    from cw_export.runtime.image import decode_png

    result = cw("run", str(fp32_bundle), "--prompt", "a blue square", "--seed", "2", "--image-out",
                str(tmp_path / "img.png"), "--latents-out", str(tmp_path / "lat.npy"), "--quiet")
    assert result.returncode == 0, result.stderr
    image = decode_png((tmp_path / "img.png").read_bytes())
    assert image.shape == (32, 32, 3) and image.std() > 0


@pytest.mark.parametrize("case, fragment", [
    ("bad_latent_shape", "init latents have shape [1, 4, 8, 8]"),
    ("bad_embeds_keys", "lack array(s) ['uncond']"),
    ("missing_bundle", "bundle folder not found"),
    ("latents_out_dir", "--latents-out is a folder"),
    ("empty_prompt", "--prompt must be a non-empty string"),
    ("no_output", "give --latents-out"),
    ("negative_with_embeds", "--negative-prompt needs --prompt"),
])
def test_run_errors(fp32_bundle, tmp_path, case, fragment):
    np.save(tmp_path / "small.npy", np.zeros([1, 4, 8, 8], np.float32))
    np.savez(tmp_path / "emb.npz", cond=np.zeros([1, 77, 32], np.float32))
    bundle, out = str(fp32_bundle), str(tmp_path / "out.npy")
    args = {
        "bad_latent_shape": [bundle, "--prompt", "x", "--init-latents", str(tmp_path / "small.npy")],
        "bad_embeds_keys": [bundle, "--text-embeds", str(tmp_path / "emb.npz"), "--seed", "1"],
        "missing_bundle": [str(tmp_path / "nope"), "--prompt", "x", "--seed", "1"],
        "latents_out_dir": [bundle, "--prompt", "x", "--seed", "1"],
        "empty_prompt": [bundle, "--prompt", "  ", "--seed", "1"],
        "no_output": [bundle, "--prompt", "x", "--seed", "1"],
        "negative_with_embeds": [bundle, "--text-embeds", str(tmp_path / "emb.npz"), "--negative-prompt", "y",
                                 "--seed", "1"],
    }[case]
    outputs = [] if case == "no_output" else ["--latents-out", str(tmp_path) if case == "latents_out_dir" else out]
    result = cw("run", *args, *outputs)
    assert_refused(result, fragment, tmp_path, {"small.npy", "emb.npz"})


def test_validate_passes_intact_bundle_and_fails_tampered(fp32_bundle, tmp_path):
    import shutil

    ok = cw("validate", str(fp32_bundle))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS  trajectory vs torch" in ok.stdout
    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle, copy)
    vocab = copy / "tokenizer" / "vocab.json"
    vocab.write_bytes(vocab.read_bytes().replace(b"a", b"b", 1))
    bad = cw("validate", str(copy))
    assert_user_error(bad, "failed 1 check(s): files sha256")
    assert "sha256 changed: tokenizer/vocab.json" in bad.stdout
    refused = cw("run", str(copy), "--prompt", "x", "--seed", "1", "--latents-out", str(tmp_path / "o.npy"))
    assert_user_error(refused, "failed its integrity check")


def test_model_command_writes_a_folder_diffusers_loads_and_we_build_from(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "model"
    result = cw("model", "--model", "tiny-random", "--out", str(folder))
    assert result.returncode == 0, result.stderr
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.unet.config.block_out_channels == [32, 64, 64] or tuple(pipe.unet.config.block_out_channels) == (32, 64, 64)
    again = cw("model", "--model", "tiny-random", "--out", str(folder))
    assert_user_error(again, "already exists")
    bundle = tmp_path / "bundle"
    built = cw("--model", str(folder), "--target", "cpu-fp32", "--out", str(bundle), "--quiet")
    assert built.returncode == 0, built.stderr
    check = cw("validate", str(bundle))
    assert check.returncode == 0 and "PASS  trajectory vs torch" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize("damage, fragment", [
    ("no_index", "no model_index.json"),
    ("corrupt_index", "corrupt model_index.json"),
    ("no_unet", "lacks component folder(s): unet"),
    ("corrupt_weights", "cannot load unet"),
])
def test_broken_model_folders(tmp_path, damage, fragment):
    import shutil

    folder = tmp_path / "model"
    assert cw("model", "--model", "tiny-random", "--out", str(folder)).returncode == 0
    if damage == "no_index":
        (folder / "model_index.json").unlink()
    elif damage == "corrupt_index":
        (folder / "model_index.json").write_text("{not json")
    elif damage == "no_unet":
        shutil.rmtree(folder / "unet")
    else:
        weights = next((folder / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "bundle"
    assert_refused(cw("--model", str(folder), "--out", str(out), "--target", "cpu-fp32"), fragment, tmp_path, {"model"})


def test_negative_prompt_that_is_not_utf8_is_an_input_error(fp32_bundle):
    from cw_export.errors import InputError
    from cw_export.runtime.pipeline import BundleRunner

    with pytest.raises(InputError, match="--negative-prompt is not UTF-8"):
        BundleRunner(fp32_bundle).encode_prompt("a red circle", "bad \udcff")
