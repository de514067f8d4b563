"""`cw-export --model PATH --target snapdragon-int8` on a saved diffusers folder: the user's path, end to end."""

from __future__ import annotations

import pytest

from cw_export.cli import main
from cw_export.models.pipeline import folder_hash
from cw_export.contract.manifest import read_manifest


@pytest.mark.slow  # a whole snapdragon-int8 build through the CLI: ~4 minutes
def test_int8_build_from_a_saved_diffusers_folder(tmp_path, capsys):
    folder = tmp_path / "my-model"
    assert main(["model", "--model", "tiny-random", "--out", str(folder)]) == 0
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    bundle = tmp_path / "bundle"
    code = main(["--model", str(folder), "--target", "snapdragon-int8", "--quant-backend", "ort",
                 "--calibration-prompts", "2", "--parity-prompts", "1", "--out", str(bundle), "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(bundle)
    source = manifest["source_model"]
    assert source["kind"] == "folder" and source["path"] == str(folder)
    assert source["sha256"] == folder_hash(folder)
    for graph in ("high_res_in", "low_res", "high_res_out"):
        assert manifest["graphs"][graph]["precision"].startswith("w8a"), manifest["graphs"][graph]
    assert manifest["parity"]["gate"]["passed"]
    capsys.readouterr()
    assert main(["validate", str(bundle)]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_int8_build_of_a_model_whose_graph_drops_an_input(tmp_path):
    """The trained shapes model: its high_res_in has no cross-attention, so the export drops encoder_hidden_states.
    Calibration, both quantizers' torch side and parity must call the graph with what it kept (found: a TypeError),
    and the ort path must survive qnn_preprocess_model leaving nothing to rewrite (found: dangling external data)."""
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    recipe = load_recipe("snapdragon-w8a16").with_quantization(backend="ort", calibration_prompts=2,
                                                                calibration_samples=8)
    recipe = recipe.with_parity(heldout_prompts=1)
    bundle = build_bundle(recipe, BuildOptions(model="shapes", out=tmp_path / "b", progress=False,
                                               allow_low_parity=True))
    manifest = read_manifest(bundle)
    assert [s["name"] for s in manifest["graphs"]["high_res_in"]["inputs"]] == ["sample", "time_features"]
    assert manifest["graphs"]["high_res_in"]["precision"] == "w8a16"
    assert 20.0 < manifest["parity"]["graphs"]["high_res_in"]["sqnr_db"] < 200.0
