"""cw_export.models.generated_cache: an architecture model read back from the build cache is the generated model,
with its weights file-backed (the SDXL INT8 build's memory, issue #21). The tiny SDXL configs stand in for the
published ones (the same code path; sdxl-arch's 13 GB would not fit a test)."""

from __future__ import annotations

import json

import pytest

from cw_export.errors import ModelError
from cw_export.models import configs, pipeline
from cw_export.models.generated_cache import generated_folder
from cw_export.models.pipeline import BUILTIN_SEED, load_generated_model
from cw_export.models.memory_check import _param_bytes, file_backed_weight_bytes


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, load_generated_model("tiny-sdxl", configs.TINY_SDXL, root)


def test_the_cached_model_is_the_generated_one(generated):
    _, model = generated
    reference = pipeline.build_tiny_sdxl_model()
    assert model.source == reference.source  # kind builtin, name, seed and the generated weights' hash
    assert model.folder is None  # generated: no folder defaults, no shipped adaptor
    assert model.scheduler_config == reference.scheduler_config
    assert model.tokenizer_files == reference.tokenizer_files and model.tokenizer_2_files == reference.tokenizer_2_files
    assert model.force_zeros_for_empty_prompt == reference.force_zeros_for_empty_prompt
    assert reference.tokenize(["a red circle"]).tolist() == model.tokenize(["a red circle"]).tolist()


def test_its_weights_are_file_backed_and_generated_ones_are_not(generated):
    _, model = generated
    total = sum(_param_bytes(module) for _, module in model.components())
    assert file_backed_weight_bytes(model) >= total > 0
    assert file_backed_weight_bytes(pipeline.build_tiny_sdxl_model()) == 0


def test_a_second_read_reuses_the_entry(generated, monkeypatch):
    root, model = generated
    from cw_export.models import generated_cache

    monkeypatch.setattr(generated_cache, "_generate_in_child", lambda *a, **k: pytest.fail("generated again"))
    assert load_generated_model("tiny-sdxl", configs.TINY_SDXL, root).source == model.source


def test_changed_cached_weights_are_refused(tmp_path):
    load_generated_model("tiny-sdxl", configs.TINY_SDXL, tmp_path)
    folder, sha256 = generated_folder("tiny-sdxl", configs.TINY_SDXL, BUILTIN_SEED, tmp_path)
    meta = folder.parent / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": "0" * 64}))
    with pytest.raises(ModelError, match="do not hash to what was generated"):
        load_generated_model("tiny-sdxl", configs.TINY_SDXL, tmp_path)


def test_other_configs_get_their_own_entry(tmp_path):
    changed = {**configs.TINY_SDXL, "unet": {**configs.TINY_SDXL["unet"], "norm_num_groups": 4}}
    assert configs.TINY_SDXL["unet"].get("norm_num_groups") != 4
    first, _ = generated_folder("tiny-sdxl", configs.TINY_SDXL, BUILTIN_SEED, tmp_path)
    second, _ = generated_folder("tiny-sdxl", changed, BUILTIN_SEED, tmp_path)
    assert first != second


def test_a_failed_generation_is_one_model_error_and_no_entry(tmp_path, monkeypatch):
    from cw_export.models import generated_cache

    monkeypatch.setattr(generated_cache, "WRITER_MODULE", "cw_export.models.no_such_writer")
    with pytest.raises(ModelError, match="generating tiny-sdxl failed: .*No module named"):
        generated_folder("tiny-sdxl", configs.TINY_SDXL, BUILTIN_SEED, tmp_path)
    assert list((tmp_path / generated_cache.CACHE_DIR).iterdir()) == []  # the half-written entry is gone


def test_the_seed_draws_the_weights_not_only_names_the_entry(generated, tmp_path):
    _, model = generated
    other = load_generated_model("tiny-sdxl", configs.TINY_SDXL, tmp_path, seed=BUILTIN_SEED + 7)
    assert other.source["seed"] == BUILTIN_SEED + 7 and model.source["seed"] == BUILTIN_SEED
    assert other.source["sha256"] != model.source["sha256"]
    assert other.source["sha256"] == pipeline.weights_hash(pipeline.build_from_configs(configs.TINY_SDXL,
                                                                                      seed=BUILTIN_SEED + 7))
