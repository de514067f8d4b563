"""Bundle contents, integrity checks, atomic writes and determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cw_export.errors import BundleError, InputError
from cw_export.contract.manifest import load_verified, read_manifest, sha256_file, verify_bundle


def test_manifest_lists_every_file_with_hash_and_size(fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    on_disk = {p.relative_to(fp32_bundle).as_posix() for p in fp32_bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(fp32_bundle / rel)
        assert entry["size"] == (fp32_bundle / rel).stat().st_size


def test_manifest_contract_fields(fp32_bundle, tiny_model):
    m = read_manifest(fp32_bundle)
    assert m["schema_version"] == 2 and m["target"] == "cpu-fp32"
    assert m["source_model"]["name"] == "tiny-random" and len(m["source_model"]["sha256"]) == 64
    assert m["schedule"]["step_kinds"] == ["full", "clocked"] * 4
    assert m["sampler"]["name"] == "dpmpp_2m" and len(m["sampler"]["alphas_cumprod"]) == 1000
    table = m["sampler"]["step_table"]
    assert len(table["timesteps"]) == 8 and len(table["c_sample"]) == 8
    assert m["guidance_scale"] == 7.5 and m["batch"] == 2
    assert m["latent"]["shape"] == [1, 4, 16, 16] and m["latent"]["scaling_factor"] == pytest.approx(0.18215)
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(m["versions"])
    assert set(m["graphs"]) == {"text_encoder", "high_res_in", "low_res", "high_res_out", "vae_decoder"}
    assert m["graphs"]["vae_decoder"]["outputs"][0]["shape"] == [1, 3, 32, 32]
    hi = m["graphs"]["high_res_in"]
    assert [s["name"] for s in hi["inputs"]] == ["sample", "time_features", "encoder_hidden_states"]
    assert hi["inputs"][0]["shape"] == [2, 4, 16, 16]
    # the sinusoidal timestep features are computed by the runtime (docs/qnn_htp.md), described as data
    dim = tiny_model.unet.config.block_out_channels[0]
    assert hi["inputs"][1]["shape"] == [2, dim]
    assert m["time_features"] == {"function": "sinusoidal", "dim": dim, "flip_sin_to_cos": True,
                                  "downscale_freq_shift": 0.0, "scale": 1.0, "max_period": 10000}
    assert m["wiring"]["cache"] == {"r_out_prev": "r_out"}
    assert m["wiring"]["steps"]["clocked"] == ["high_res_in", "high_res_out"]
    for graph in m["graphs"].values():
        assert graph["parity_fp32_vs_torch"]["max_rel_diff"] <= 1e-5


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


@pytest.mark.parametrize("damage", ["flip_byte", "remove_graph", "extra_file", "truncate"])
def test_integrity_detects_damage(fp32_bundle, tmp_path, damage):
    bundle = _copy(fp32_bundle, tmp_path)
    graph = bundle / "graphs" / "low_res.onnx"
    if damage == "flip_byte":
        data = bytearray(graph.read_bytes())
        data[len(data) // 2] ^= 0x01
        graph.write_bytes(bytes(data))
    elif damage == "remove_graph":
        graph.unlink()
    elif damage == "extra_file":
        (bundle / "graphs" / "notes.txt").write_text("x")
    else:
        graph.write_bytes(graph.read_bytes()[:1000])
    problems = verify_bundle(bundle, read_manifest(bundle))
    assert problems and any("low_res" in p or "notes.txt" in p for p in problems)
    with pytest.raises(BundleError, match="integrity"):
        load_verified(bundle)


def test_unknown_schema_version_is_refused(fp32_bundle, tmp_path):
    bundle = _copy(fp32_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 99"):
        read_manifest(bundle)


def test_failed_build_leaves_nothing_at_out(tmp_path, monkeypatch, make_fp32_bundle):
    import cw_export.export.stage as build  # the export stage's export_graph

    calls = {"n": 0}
    real = build.export_graph

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash during export")
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "export_graph", failing)
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="simulated"):
        make_fp32_bundle(out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "no temporary litter beside --out"


def test_existing_bundle_needs_overwrite_and_survives_failed_rebuild(fp32_bundle, tmp_path, monkeypatch,
                                                                   make_fp32_bundle):
    import cw_export.export.stage as build  # the export stage's export_graph

    out = _copy(fp32_bundle, tmp_path)
    before = read_manifest(out)["files"]
    with pytest.raises(InputError, match="--overwrite"):
        make_fp32_bundle(out)
    monkeypatch.setattr(build, "export_graph", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    with pytest.raises(RuntimeError):
        build_bundle(load_recipe("cpu-fp32"), BuildOptions(model="tiny-random", out=out, overwrite=True,
                                                          progress=False))
    assert read_manifest(out)["files"] == before
    assert not verify_bundle(out, read_manifest(out))


def test_build_is_deterministic(tmp_path, make_fp32_bundle):
    """Two builds back to back, same inputs and process state: byte-identical graphs and manifest.

    (The recorded torch-vs-ORT parity numbers are measurements and move in the last digits when torch's thread
    settings differ, so both builds run here rather than comparing with the session fixture.)"""
    first = make_fp32_bundle(tmp_path / "first")
    second = make_fp32_bundle(tmp_path / "again")
    assert read_manifest(second)["files"] == read_manifest(first)["files"]
    assert (second / "manifest.json").read_bytes() == (first / "manifest.json").read_bytes()
