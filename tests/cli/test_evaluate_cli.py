"""Tests for ``cw-export evaluate`` (cw_export/evaluate/command.py) on a small bundle of the shapes model.

One module-scoped run evaluates a 4-step FP32 bundle with a (briefly) distilled learned adaptor, so every variant the
command knows for such a bundle appears: real, full_fp32, clockwork_fp32, clockwork_fp32_learned, clockwork_fp32_cpu.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from user_errors import CliResult, assert_user_error

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cw_export.cli import main  # noqa: E402
from cw_export.models import shapes  # noqa: E402
from cw_export.models.pipeline import SHAPES_DIR  # noqa: E402

pytestmark = pytest.mark.skipif(not (SHAPES_DIR / "model_index.json").is_file(),
                                reason="trained shapes weights not present")

STEPS = 4
CAPTIONS = shapes.eval_captions("held_out")[:3]  # "a red triangle on the right", "a small red ...", "a large red ..."


@pytest.fixture(scope="module")
def learned_bundle(tmp_path_factory) -> dict:
    """A cpu-fp32 bundle of ``shapes`` (4 steps, clock 2) with a learned adaptor distilled for one epoch."""
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.distill.train import DistillOptions, distill
    from cw_export.recipe import load_recipe

    root = tmp_path_factory.mktemp("evaluate_cli")
    prompts = root / "train_captions.txt"
    prompts.write_text("\n".join(shapes.eval_captions("train")[::30]) + "\n", encoding="utf-8")
    checkpoint = root / "adaptor.safetensors"
    distill(DistillOptions(model="shapes", prompts=str(prompts), steps=STEPS, clock=2, epochs=1, lr=1e-3,
                           out=checkpoint, cache=root / "cache", progress=False))
    recipe = load_recipe("cpu-fp32").with_build(steps=STEPS, adaptor="learned")
    bundle = build_bundle(recipe, BuildOptions(model="shapes", out=root / "bundle", adaptor_checkpoint=checkpoint,
                                               progress=False))
    return {"root": root, "bundle": bundle, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def evaluated(learned_bundle) -> dict:
    """One evaluate run (3 held-out captions x 1) with --json and --images-out."""
    root, bundle = learned_bundle["root"], learned_bundle["bundle"]
    out_json, images = root / "eval.json", root / "images"
    code = main(["evaluate", str(bundle), "--repeats", "1", "--limit", str(len(CAPTIONS)), "--seed", "5",
                 "--adaptor-checkpoint", str(learned_bundle["checkpoint"]), "--json", str(out_json),
                 "--images-out", str(images)])
    assert code == 0
    return {"json": json.loads(out_json.read_text(encoding="utf-8")), "images": images, **learned_bundle}


def _png(path: Path) -> np.ndarray:
    from cw_export.runtime.image import decode_png

    return decode_png(path.read_bytes())


def test_json_has_every_variant_with_numbers_in_range(evaluated):
    result = evaluated["json"]
    assert set(result) == {"real", "full_fp32", "clockwork_fp32", "clockwork_fp32_learned", "clockwork_fp32_cpu"}
    for name, entry in result.items():
        assert "error" not in entry, (name, entry)
        assert 0.0 <= entry["prompt_accuracy"] <= 1.0, name
        assert np.isfinite(entry["frechet"]) and entry["frechet"] >= -1e-6, name
        assert entry["n"] == len(CAPTIONS)
        assert set(entry["attribute_accuracy"]) >= {"colour", "shape", "position"}
    assert result["real"]["prompt_accuracy"] == 1.0  # the classifier reads real samples (tests/test_evaluate.py)
    assert result["full_fp32"]["clock"] == 1 and result["clockwork_fp32"]["clock"] == 2
    assert result["clockwork_fp32_cpu"]["source"] == "bundle" and result["clockwork_fp32_cpu"]["adaptor"] == "learned"
    assert (evaluated["images"] / "captions.txt").read_text(encoding="utf-8").split("\n")[:3] == CAPTIONS


def test_bundle_images_are_what_cw_export_run_writes(evaluated, tmp_path):
    """Image i of the bundle variant is ``cw-export run --prompt caption_i --seed SEED+i``, byte for byte."""
    for i in (0, 2):
        out = tmp_path / f"run_{i}.png"
        assert main(["run", str(evaluated["bundle"]), "--prompt", CAPTIONS[i], "--seed", str(5 + i),
                     "--image-out", str(out), "--quiet"]) == 0
        assert out.read_bytes() == (evaluated["images"] / "clockwork_fp32_cpu" / f"{i:03d}.png").read_bytes()


def test_torch_learned_variant_matches_the_fp32_bundle(evaluated):
    """The FP32 bundle computes what torch computes with the same learned adaptor from the same noise."""
    images = evaluated["images"]
    for i in range(len(CAPTIONS)):
        bundle = _png(images / "clockwork_fp32_cpu" / f"{i:03d}.png").astype(int)
        torch_learned = _png(images / "clockwork_fp32_learned" / f"{i:03d}.png").astype(int)
        assert np.abs(bundle - torch_learned).max() <= 2, i


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    return assert_user_error(CliResult(code, *capsys.readouterr()), "")


def test_captions_the_classifier_cannot_read_are_one_line_exit_2(learned_bundle, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na photo of an astronaut riding a horse\n", encoding="utf-8")
    err = _one_line_error(capsys, ["evaluate", str(learned_bundle["bundle"]), "--prompts", str(prompts)])
    assert "astronaut" in err and "shapes" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n", encoding="utf-8")
    _one_line_error(capsys, ["evaluate", str(learned_bundle["bundle"]), "--prompts", str(empty)])


def test_bad_flags_are_one_line_exit_2(learned_bundle, tmp_path, capsys):
    bundle = str(learned_bundle["bundle"])
    assert "--provider" in _one_line_error(capsys, ["evaluate", bundle, "--provider", "npu"])
    assert "FP32" in _one_line_error(capsys, ["evaluate", bundle, "--provider", "qnn-htp"])
    assert "--json" in _one_line_error(capsys, ["evaluate", bundle, "--json", str(tmp_path / "no" / "x.json")])
    assert "not a bundle" in _one_line_error(capsys, ["evaluate", str(tmp_path)])


def test_bundle_of_another_model_is_one_line_exit_2(fp32_bundle, capsys):
    err = _one_line_error(capsys, ["evaluate", str(fp32_bundle)])
    assert "tiny-random" in err and "shapes" in err


def test_a_provider_that_cannot_run_the_bundle_is_recorded_not_faked(learned_bundle, monkeypatch, capsys):
    """What ``--provider qnn-htp`` does when the HTP refuses a graph (runtime.sessions raises one BundleError)."""
    from cw_export.errors import BundleError
    from cw_export.evaluate.bundle_variants import evaluate_bundle
    from cw_export.runtime import pipeline

    def refuse(self, graph):
        if self.provider == "qnn-htp":
            raise BundleError(f"graph {graph} cannot run fully on qnn-htp: unsupported op types LayerNormalization")
        return real_session(self, graph)

    real_session = pipeline.BundleRunner.session
    monkeypatch.setattr(pipeline.BundleRunner, "session", refuse)
    result = evaluate_bundle(learned_bundle["bundle"], CAPTIONS[:2], providers=("cpu", "qnn-htp"),
                             adaptor_checkpoint=learned_bundle["checkpoint"])
    htp = result["clockwork_fp32_htp"]
    assert htp["prompt_accuracy"] is None and htp["frechet"] is None
    assert "LayerNormalization" in htp["error"]
    assert result["clockwork_fp32_cpu"]["prompt_accuracy"] is not None
    assert "clockwork_fp32_htp not measured" in capsys.readouterr().err


def test_a_retrained_copy_of_the_shapes_model_is_accepted(tmp_path):
    """A folder with the shapes model's architecture (e.g. tools/train_builtin.py --out DIR after more training) is
    scored; a folder with another architecture is refused."""
    import shutil

    from cw_export.errors import InputError
    from cw_export.evaluate.bundle_variants import check_shapes_bundle

    retrained = tmp_path / "retrained"
    for part in ("unet", "text_encoder", "vae"):
        (retrained / part).mkdir(parents=True)
        shutil.copy(SHAPES_DIR / part / "config.json", retrained / part / "config.json")
    manifest = {"source_model": {"kind": "folder", "path": str(retrained), "sha256": "0" * 64}}
    check_shapes_bundle(tmp_path, manifest)
    config = json.loads((retrained / "unet" / "config.json").read_text())
    config["block_out_channels"] = [c * 2 for c in config["block_out_channels"]]
    (retrained / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="not the shapes model or a retrained copy"):
        check_shapes_bundle(tmp_path, manifest)


def test_shapes_builds_with_its_shipped_adaptor(tmp_path):
    """--model shapes --adaptor learned needs no distillation: the model ships its adaptor for the recipe schedule
    (DPM++ 2M, 8 steps, clock 2), the manifest records that file's sha256 and evaluate finds it without a flag."""
    import hashlib

    from cw_export.evaluate.bundle_variants import find_adaptor_checkpoint
    from cw_export.models.pipeline import SHAPES_ADAPTOR
    from cw_export.contract.manifest import read_manifest

    out = tmp_path / "b"
    assert main(["--model", "shapes", "--target", "cpu-fp32", "--adaptor", "learned", "--out", str(out),
                 "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest["adaptor"]["checkpoint_sha256"] == hashlib.sha256(SHAPES_ADAPTOR.read_bytes()).hexdigest()
    assert find_adaptor_checkpoint(manifest, None) == SHAPES_ADAPTOR
