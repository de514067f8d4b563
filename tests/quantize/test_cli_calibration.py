"""Bad calibration input fails fast: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest

from cw_export.cli import main


def run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("content, message", [
    (b"", "no prompts"),
    (b"# only a comment\n\n   \n", "no prompts"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text"),
    (b"\xff\xfe\xfa bad utf8\n", "not UTF-8 text"),
])
def test_bad_calibration_file(tmp_path, capsys, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    out = tmp_path / "bundle"
    code, err = run(["--model", "tiny-random", "--target", "snapdragon-int8", "--calibration", str(path),
                     "--out", str(out), "--quiet"], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_calibration_file(tmp_path, capsys):
    code, err = run(["--target", "snapdragon-int8", "--calibration", str(tmp_path / "nope.txt"),
                     "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "no such file" in err


def test_quantization_flags_need_a_quantized_target(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n")
    code, err = run(["--target", "cpu-fp32", "--calibration", str(path), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "only apply to quantized targets" in err


def test_calibration_prompts_must_be_positive(tmp_path, capsys):
    code, err = run(["--target", "snapdragon-int8", "--calibration-prompts", "0", "--out", str(tmp_path / "b")],
                    capsys)
    assert code == 2 and "--calibration-prompts" in err


def test_default_target_is_snapdragon_int8():
    from cw_export.recipe import DEFAULT_TARGET, load_recipe

    assert DEFAULT_TARGET == "snapdragon-int8"
    recipe = load_recipe(DEFAULT_TARGET)
    assert recipe.quantized and recipe.quantization.backend == "ort"  # its graphs run on the QNN HTP (docs/qnn_htp.md)
    assert recipe.parity.final_latent_min_psnr_db > 0 and recipe.parity.graph_min_sqnr_db > 0


def test_soc_table_is_data_not_a_target():
    """recipes/socs.toml sits beside the targets but is not one (cw_export.quantize.qnn.context_binaries reads it)."""
    from cw_export.errors import RecipeError
    from cw_export.recipe import available_targets, load_recipe

    assert "socs" not in available_targets() and "snapdragon-int8" in available_targets()
    with pytest.raises(RecipeError, match="unknown target 'socs'"):
        load_recipe("socs")


def test_budget_flags_override_the_recipe(tmp_path, capsys):
    """--calibration-samples and --a8-sweep (the SD 1.5-size budget knobs) reach the recipe; both need a quantized
    target; a bad sweep depth is a usage error."""
    from cw_export.cli import _apply_quantization_flags, build_parser
    from cw_export.recipe import load_recipe

    args = build_parser().parse_args(["--calibration-samples", "4", "--a8-sweep", "off"])
    recipe = _apply_quantization_flags(load_recipe("snapdragon-int8"), args)
    assert recipe.quantization.calibration_samples == 4 and recipe.quantization.a8_layer_sweep == "off"
    code, err = run(["--target", "cpu-fp32", "--a8-sweep", "off", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--a8-sweep only apply to quantized targets" in err
    code, err = run(["--target", "snapdragon-int8", "--a8-sweep", "row", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--a8-sweep" in err and not (tmp_path / "b").exists()
    code, err = run(["--target", "snapdragon-int8", "--calibration-samples", "0", "--out", str(tmp_path / "b")],
                    capsys)
    assert code == 2 and "--calibration-samples" in err and not (tmp_path / "b").exists()


def test_mac_sweep_and_range_flags_are_checked(tmp_path, capsys):
    """--a8-range reaches the recipe; a bad range is a usage error, one line, exit 2, nothing written; the MAC sweep
    runs per block on the aimet backend (its encodings have no form for the conversions)."""
    from cw_export.cli import _apply_quantization_flags, build_parser
    from cw_export.recipe import load_recipe

    args = build_parser().parse_args(["--a8-range", "percentile"])
    assert _apply_quantization_flags(load_recipe("snapdragon-int8"), args).quantization.a8_range == "percentile"
    assert load_recipe("snapdragon-int8").quantization.a8_layer_sweep == "mac"
    from cw_export.quantize import get_backend
    from cw_export.quantize.stage import sweep_depth

    q = load_recipe("snapdragon-int8").quantization
    assert sweep_depth(q, get_backend("ort")) == "mac" and sweep_depth(q, get_backend("aimet")) == "block"
    code, err = run(["--target", "snapdragon-int8", "--a8-range", "mse", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--a8-range" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_the_model_declares_its_own_prompt_sets(tmp_path):
    """The built-in model calibrates on its train captions and gates on its held-out ones (its cw_export.json);
    --calibration beats the declaration; a model folder names a file of its own or a built-in set, nothing else."""
    from cw_export.cli import _apply_quantization_flags, build_parser
    from cw_export.errors import ModelError
    from cw_export.models.declared import MODEL_DEFAULTS_NAME, declared_prompt_sets
    from cw_export.prompts import load_prompt_set
    from cw_export.recipe import load_recipe

    recipe = _apply_quantization_flags(load_recipe("snapdragon-int8"), build_parser().parse_args([]))
    assert (recipe.quantization.calibration_set, recipe.parity.heldout_set) == ("shapes-train", "shapes-heldout")
    train, held = load_prompt_set("shapes-train"), load_prompt_set("shapes-heldout")
    assert len(train) == 64 and len(held) == 30 and not set(train) & set(held)
    own = tmp_path / "mine.txt"
    own.write_text("a red circle\n")
    args = build_parser().parse_args(["--calibration", str(own)])
    assert _apply_quantization_flags(load_recipe("snapdragon-int8"), args).quantization.calibration_set == str(own)
    tiny = _apply_quantization_flags(load_recipe("snapdragon-int8"), build_parser().parse_args(["--model",
                                                                                                "tiny-random"]))
    assert (tiny.quantization.calibration_set, tiny.parity.heldout_set) == ("default", "heldout")  # the recipe's

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "prompts.txt").write_text("a cat\n")
    (folder / MODEL_DEFAULTS_NAME).write_text('{"calibration_set": "prompts.txt", "heldout_set": "heldout"}')
    assert declared_prompt_sets(str(folder)) == {"calibration_set": str((folder / "prompts.txt").resolve()),
                                                 "heldout_set": "heldout"}
    (tmp_path / "outside.txt").write_text("secret\n")
    (folder / "link.txt").symlink_to(tmp_path / "outside.txt")
    for bad in ("../outside.txt", str(tmp_path / "outside.txt"), "link.txt", "missing.txt", 3):
        (folder / MODEL_DEFAULTS_NAME).write_text(json.dumps({"calibration_set": bad}))
        with pytest.raises(ModelError, match="calibration_set"):
            declared_prompt_sets(str(folder))
