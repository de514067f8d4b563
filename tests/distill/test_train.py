"""Training loop: determinism, resume == uninterrupted, the checkpoint's metadata and the loss log, user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from user_errors import assert_refused

from cw_export.distill.checkpoint import log_path, read_checkpoint, resume_path
from cw_export.distill.train import DistillOptions, distill
from cw_export.errors import InputError

SMALL = DistillOptions(model="tiny-random", num_prompts=3, steps=6, clock=2, epochs=3, batch_size=4, lr=1e-3,
                       seed=11, progress=False)  # 3 prompts x 3 adaptor steps = 9 pairs: batches of 4, 4, 1


def _small(tmp_path: Path, cache: Path, **changes) -> DistillOptions:
    return replace(SMALL, out=tmp_path / "adaptor.safetensors", cache=cache, **changes)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = read_checkpoint(a).state_dict, read_checkpoint(b).state_dict
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_resume_equals_uninterrupted_training(tiny_model, distill_cache, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = distill(_small(tmp_path / "a", distill_cache), model=tiny_model)
    first = distill(_small(tmp_path / "b", distill_cache, epochs=1), model=tiny_model)
    assert read_checkpoint(first.checkpoint).epochs_done == 1
    after_one_epoch = read_checkpoint(first.checkpoint).state_dict
    resumed = distill(_small(tmp_path / "b", distill_cache, resume=True), model=tiny_model)
    _same_weights(whole.checkpoint, resumed.checkpoint)
    assert [h["loss"] for h in resumed.log["history"]] == [h["loss"] for h in whole.log["history"]]
    assert json.loads(log_path(resumed.checkpoint).read_text())["epochs_done"] == 3
    # the seed decides everything: another seed trains to other weights
    other = distill(_small(tmp_path / "b", distill_cache, seed=12, overwrite=True, epochs=1), model=tiny_model)
    assert not torch.equal(read_checkpoint(other.checkpoint).state_dict["up.weight"], after_one_epoch["up.weight"])


def test_checkpoint_records_config_and_training_settings(tiny_model, distill_cache, tmp_path):
    result = distill(_small(tmp_path, distill_cache, epochs=2), model=tiny_model)
    checkpoint = read_checkpoint(result.checkpoint)
    t = checkpoint.training
    assert t["model_sha256"] == tiny_model.source["sha256"]
    assert (t["sampler"], t["steps"], t["clock"], t["guidance_scale"]) == ("dpmpp_2m", 6, 2, 7.5)
    assert (t["epochs"], t["seed"], t["lr"], t["batch_size"], t["num_prompts"]) == (2, 11, 1e-3, 4, 3)
    assert len(t["prompts_sha256"]) == 64 and t["adaptor_steps"] == [1, 3, 5]
    assert checkpoint.epochs_done == 2 and checkpoint.config.r_out_channels == 64
    log = json.loads(log_path(result.checkpoint).read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2] and log["teacher_data"]["pairs"] == 9
    assert all(h["pairs"] == 9 and h["loss"] > 0 for h in log["history"])
    assert resume_path(result.checkpoint).is_file()
    # only the adaptor trains: the teacher UNet is untouched
    assert not any(p.requires_grad for p in tiny_model.unet.parameters())


def test_resume_with_other_settings_is_refused(tiny_model, distill_cache, tmp_path):
    distill(_small(tmp_path, distill_cache, epochs=1), model=tiny_model)
    with pytest.raises(InputError, match="cannot resume .* lr 0.001"):
        distill(_small(tmp_path, distill_cache, lr=5e-4, resume=True), model=tiny_model)


@pytest.mark.parametrize("changes, fragment", [
    ({"clock": 1}, "never runs the adaptor"),
    ({"clock": 9}, "larger than --steps"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"lr": float("nan")}, "--lr must be a finite number > 0"),
    ({"sampler": "plms"}, "sampler 'plms' unknown"),
])
def test_bad_settings_are_input_errors(tmp_path, changes, fragment):
    with pytest.raises(InputError, match=fragment):
        distill(_small(tmp_path, tmp_path, **changes))


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "adaptor.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="pass --resume .* or --overwrite"):
        distill(_small(tmp_path, tmp_path))


def test_cli_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
    cmd = [sys.executable, "-m", "cw_export.cli", "distill", "--model", "tiny-random", "--quiet",
           "--out", str(tmp_path / "a.safetensors")]
    for extra, fragment in ((["--prompts", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
                            (["--clock", "1"], "never runs the adaptor")):
        result = subprocess.run(cmd + extra, capture_output=True, text=True, env=_env(tmp_path))
        assert_refused(result, fragment, tmp_path)


def _env(cache: Path) -> dict:
    import os

    return {**os.environ, "CW_EXPORT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
