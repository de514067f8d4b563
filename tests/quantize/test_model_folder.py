"""`cw-export --model PATH --target snapdragon-int8` on a saved diffusers folder: the user's path, end to end."""

from __future__ import annotations

from cw_export.cli import main
from cw_export.models.pipeline import folder_hash
from cw_export.runtime.manifest import read_manifest


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
