"""``cw-export --lora FILE [--lora-scale F]``: LoRA weights fused into the UNet and text encoder at build time
(docs/lora.md), on a LoRA this test makes with peft for the built-in model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from user_errors import assert_refused

from cw_export.models.pipeline import SHAPES_ADAPTOR, SHAPES_DIR

pytestmark = pytest.mark.skipif(not (SHAPES_DIR / "model_index.json").is_file() or not SHAPES_ADAPTOR.is_file(),
                                reason="trained shapes weights or adaptor not present")
pytest.importorskip("peft")


def cw(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cw_export.cli", *map(str, args)], capture_output=True, text=True)


def make_lora(out: Path, seed: int = 0) -> Path:
    """A rank-4 LoRA on the UNet's attention projections and the text encoder's, random up and down matrices
    (peft ``init_lora_weights=False``), saved in diffusers' format."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from cw_export.models.pipeline import load_model

    model = load_model("builtin")
    torch.manual_seed(seed)
    model.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # transformers' own add_adapter wants peft >= 0.22; peft's injection works with what is installable here
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), model.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model.text_encoder)))
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return make_lora(tmp_path_factory.mktemp("lora"))


def build(out: Path, *flags) -> dict:
    result = cw("--target", "cpu-fp32", "--out", out, "--quiet", *flags)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def base_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "bundle"
    build(out)
    return out


def files_of(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


def test_a_lora_changes_the_output_and_is_recorded(base_bundle, lora, tmp_path):
    out = tmp_path / "fused"
    manifest = build(out, "--lora", lora, "--lora-scale", "0.8")
    base = json.loads((base_bundle / "manifest.json").read_text())
    assert manifest["loras"] == [{"file": str(lora.absolute()), "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(),
                                  "scale": 0.8}]
    # both components took it: their graphs with attention layers differ from the base bundle's (this UNet has
    # its attention below the Clockwork cut, in low_res); the VAE takes no LoRA
    for graph in ("text_encoder", "low_res"):
        assert (out / f"graphs/{graph}.onnx").read_bytes() != (base_bundle / f"graphs/{graph}.onnx").read_bytes()
    assert (out / "graphs/vae_decoder.onnx").read_bytes() == (base_bundle / "graphs/vae_decoder.onnx").read_bytes()
    # the fused weights are another model: their own identity, and the base's adaptor (distilled on the unfused
    # weights) no longer fits them
    assert manifest["source_model"]["base_sha256"] == base["source_model"]["sha256"] != manifest["source_model"]["sha256"]
    assert base["adaptor"]["kind"] == "learned" and manifest["adaptor"] == {"kind": "identity"}
    latents = {}
    for name, bundle in (("base", base_bundle), ("fused", out)):
        path = tmp_path / f"{name}.npy"
        ran = cw("run", bundle, "--prompt", "a large red circle on the left", "--seed", "0", "--latents-out", path)
        assert ran.returncode == 0, ran.stderr
        latents[name] = path.read_bytes()
    assert latents["base"] != latents["fused"]
    # validate re-measures against the source model with the recorded LoRA fused in again
    check = cw("validate", out)
    assert check.returncode == 0 and "PASS  trajectory vs torch" in check.stdout, check.stdout + check.stderr


def test_a_zero_scale_lora_gives_the_original_bundle_byte_for_byte(base_bundle, lora, tmp_path):
    """Every file equal but manifest.json, whose only other field is the LoRA record (and its own hash)."""
    out = tmp_path / "zero"
    manifest = build(out, "--lora", lora, "--lora-scale", "0")
    ours, base = files_of(out), files_of(base_bundle)
    assert set(ours) == set(base)
    assert [name for name in ours if ours[name] != base[name]] == ["manifest.json"]
    base_manifest = json.loads(base["manifest.json"])
    assert manifest.pop("loras") == [{"file": str(lora.absolute()),
                                      "sha256": hashlib.sha256(lora.read_bytes()).hexdigest(), "scale": 0.0}]
    manifest.pop("manifest_sha256"), base_manifest.pop("manifest_sha256")
    assert manifest == base_manifest
    assert manifest["adaptor"]["kind"] == "learned"  # the weights are unchanged, so the shipped adaptor still fits


def test_fused_identity_keys_the_caches_by_each_lora_and_scale():
    from cw_export.contract.schema import LoraRecord
    from cw_export.models.lora import fused_identity

    base = "b" * 64
    one, two = LoraRecord("a.safetensors", "1" * 64, 1.0), LoraRecord("b.safetensors", "2" * 64, 0.5)
    assert fused_identity(base, ()) == fused_identity(base, (LoraRecord("a", "1" * 64, 0.0),)) == base
    ids = {fused_identity(base, loras) for loras in [(one,), (two,), (one, two), (two, one),
                                                      (LoraRecord("a", "1" * 64, 0.9),)]}
    assert len(ids) == 5 and base not in ids
    assert fused_identity(base, (one,)) == fused_identity(base, (LoraRecord("elsewhere", "1" * 64, 1.0),))


def test_the_manifest_reader_checks_the_lora_record(fp32_bundle):
    from cw_export.contract.schema import LoraRecord, parse_manifest
    from cw_export.errors import BundleError

    data = json.loads((fp32_bundle / "manifest.json").read_text())
    assert parse_manifest(data).loras == ()
    good = {"file": "/x/a.safetensors", "sha256": "a" * 64, "scale": 0.5}
    assert parse_manifest({**data, "loras": [good]}).loras == (LoraRecord("/x/a.safetensors", "a" * 64, 0.5),)
    for bad, fragment in (({**good, "sha256": "xyz"}, "loras[0].sha256"), ({**good, "scale": "1"}, "loras[0].scale"),
                          ({**good, "extra": 1}, "loras[0].extra"), ("a", "loras[0]")):
        with pytest.raises(BundleError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            parse_manifest({**data, "loras": [bad]})


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no such file"),
    ("pickle", "is a pickle file"),
    ("symlink", "is a symlink"),
    ("corrupt", "is not a readable safetensors file"),
    ("scale_first", "--lora-scale must follow the --lora FILE"),
    ("two_scales", "has two --lora-scale values"),
    ("scale_nan", "--lora-scale must be a finite number"),
    ("scale_huge", "--lora-scale for"),
    ("other_architecture", "cannot load LoRA"),
])
def test_bad_loras_are_refused_with_exit_2_and_nothing_written(lora, tmp_path, case, fragment):
    out = tmp_path / "b"
    flags = ["--lora", tmp_path / "x.safetensors"]
    if case == "pickle":
        (tmp_path / "x.bin").write_bytes(b"\x80\x04K\x01.")
        flags = ["--lora", tmp_path / "x.bin"]
    elif case == "symlink":
        (tmp_path / "x.safetensors").symlink_to(lora)
    elif case == "corrupt":
        (tmp_path / "x.safetensors").write_bytes(lora.read_bytes()[:100])
    elif case == "scale_first":
        flags = ["--lora-scale", "1", "--lora", lora]
    elif case == "two_scales":
        flags = ["--lora", lora, "--lora-scale", "1", "--lora-scale", "2"]
    elif case == "scale_nan":
        flags = ["--lora", lora, "--lora-scale", "nan"]
    elif case == "scale_huge":
        flags = ["--lora", lora, "--lora-scale", "1e6"]
    elif case == "other_architecture":
        import torch
        from safetensors.torch import save_file

        save_file({"unet.no_such_block.attn1.to_q.lora.down.weight": torch.zeros(4, 8),
                   "unet.no_such_block.attn1.to_q.lora.up.weight": torch.zeros(8, 4)}, str(tmp_path / "x.safetensors"))
    before = {p.name for p in tmp_path.iterdir()}
    assert_refused(cw("--target", "cpu-fp32", "--out", out, "--quiet", *flags), fragment, tmp_path, before)


def to_kohya(diffusers_file: Path, out: Path, rank: int = 4) -> Path:
    """The same LoRA under kohya's key names (lora_unet_* / lora_te_*, lora_down/lora_up, one alpha per layer)."""
    from safetensors.torch import load_file, save_file
    import torch

    kohya = {}
    for key, tensor in load_file(str(diffusers_file)).items():
        component, rest = key.split(".", 1)
        layer, kind = rest.rsplit(".lora", 1)[0], ("down" if ".down." in rest else "up")
        layer = layer.removesuffix(".lora_linear_layer")
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        name = prefix + layer.replace(".", "_")
        kohya[f"{name}.lora_{kind}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(kohya, str(out))
    return out


def test_a_kohya_lora_fuses_like_the_same_lora_in_diffusers_format(lora, tmp_path):
    import torch

    from cw_export.models.lora import LoraSpec, check_loras, fuse_loras
    from cw_export.models.pipeline import load_model

    kohya = to_kohya(lora, tmp_path / "kohya.safetensors")
    fused = {}
    for name, path in (("diffusers", lora), ("kohya", kohya)):
        model = fuse_loras(load_model("builtin"), check_loras((LoraSpec(path, 0.5),)))
        fused[name] = {f"{c}.{k}": v for c in ("unet", "text_encoder")
                       for k, v in getattr(model, c).state_dict().items()}
    base = load_model("builtin")
    changed = [k for k, v in fused["diffusers"].items()
               if not torch.equal(v, getattr(base, k.split(".", 1)[0]).state_dict()[k.split(".", 1)[1]])]
    assert any(k.startswith("unet.") for k in changed) and any(k.startswith("text_encoder.") for k in changed)
    assert fused["diffusers"].keys() == fused["kohya"].keys()
    for key in fused["diffusers"]:
        torch.testing.assert_close(fused["kohya"][key], fused["diffusers"][key], rtol=1e-5, atol=1e-6)
