"""A build refuses a checkpoint distilled for another model, sampler, step count or clock (PAPER.md: the adaptor is
tied to them), with one line and nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import save_file
from user_errors import assert_refused

from cw_export.build import BuildOptions, build_bundle
from cw_export.distill.checkpoint import read_checkpoint, save_checkpoint
from cw_export.errors import InputError
from cw_export.recipe import load_recipe


def _variant(trained_checkpoint, path, **training):
    checkpoint = read_checkpoint(trained_checkpoint)
    save_checkpoint(path, checkpoint.state_dict, checkpoint.config, {**checkpoint.training, **training},
                    checkpoint.epochs_done)
    return path


def _build(tmp_path, checkpoint, **build):
    recipe = load_recipe("cpu-fp32").with_build(adaptor="learned", **build)
    return build_bundle(recipe, BuildOptions(model="tiny-random", out=tmp_path / "bundle",
                                             adaptor_checkpoint=checkpoint, progress=False))


@pytest.mark.parametrize("training, fragment", [
    ({"steps": 4}, "distilled for steps 4 but the build uses steps 8"),
    ({"clock": 4}, "distilled for clock 4 but the build uses clock 2"),
    ({"sampler": "euler"}, "distilled for sampler 'euler' but the build uses sampler 'dpmpp_2m'"),
    ({"model_sha256": "0" * 64}, "distilled for model sha256 000000000000... but the build's model has sha256"),
])
def test_mismatched_checkpoint_is_refused(trained_checkpoint, tmp_path, training, fragment):
    checkpoint = _variant(trained_checkpoint, tmp_path / "other.safetensors", **training)
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")) as error:
        _build(tmp_path, checkpoint)
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]


def test_checkpoint_with_an_identity_build_is_refused(trained_checkpoint, tmp_path):
    recipe = load_recipe("cpu-fp32")
    with pytest.raises(InputError, match="--adaptor-checkpoint needs --adaptor learned"):
        build_bundle(recipe, BuildOptions(model="tiny-random", out=tmp_path / "b", adaptor_checkpoint=trained_checkpoint))


def test_foreign_safetensors_is_refused(tmp_path):
    import torch

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="not a cw-export adaptor checkpoint"):
        _build(tmp_path, tmp_path / "plain.safetensors")


def test_cli_refuses_a_mismatch_with_one_line_and_exit_2(trained_checkpoint, tmp_path):
    checkpoint = _variant(trained_checkpoint, tmp_path / "c4.safetensors", clock=4)
    result = subprocess.run([sys.executable, "-m", "cw_export.cli", "--model", "tiny-random", "--quiet",
                             "--out", str(tmp_path / "bundle"), "--adaptor", "learned",
                             "--adaptor-checkpoint", str(checkpoint)], capture_output=True, text=True)
    assert_refused(result, "distilled for clock 4", tmp_path, {"c4.safetensors"})
