"""``validate`` detects any changed, missing or extra byte in a bundle, and ``run`` refuses such a bundle unless
``--no-verify``. tests/bundle/test_bundle.py checks four kinds of damage to one graph through the Python API; here every file
of the bundle (manifest.json included) is damaged, and the commands are checked end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from user_errors import assert_refused, assert_user_error

from cw_export.contract.manifest import manifest_bytes, read_manifest, verify_bundle


def _all_files(bundle: Path) -> list[str]:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


def _problems(bundle: Path) -> list[str]:
    from cw_export.errors import BundleError

    try:
        return verify_bundle(bundle, read_manifest(bundle))
    except BundleError as exc:  # a damaged manifest.json may already fail to parse
        return [str(exc)]


@pytest.mark.parametrize("damage", ["flip_first", "flip_middle", "flip_last", "append", "truncate", "delete"])
def test_every_file_is_covered(bundle_copy, damage):
    """Each kind of damage, applied to each file in turn (then undone), is reported."""
    files = _all_files(bundle_copy)
    assert "manifest.json" in files and len(files) >= 8
    for rel in files:
        path = bundle_copy / rel
        original = path.read_bytes()
        data = bytearray(original)
        if damage.startswith("flip"):
            index = {"flip_first": 0, "flip_middle": len(data) // 2, "flip_last": len(data) - 1}[damage]
            data[index] ^= 0x20 if rel == "manifest.json" and damage != "flip_middle" else 0x01
            path.write_bytes(bytes(data))
        elif damage == "append":
            path.write_bytes(original + b"\n")
        elif damage == "truncate":
            path.write_bytes(original[:-1])
        else:
            path.unlink()
        problems = _problems(bundle_copy)
        path.write_bytes(original)
        assert problems, f"{damage} of {rel} went unnoticed"
        assert rel in " ".join(problems) or "manifest" in " ".join(problems), (rel, problems)
    assert not _problems(bundle_copy)


@pytest.mark.parametrize("where", ["extra.txt", "graphs/low_res.onnx.data", "tokenizer/added_tokens.json",
                                   "new/folder/empty.bin"])
def test_extra_files_anywhere_are_reported(bundle_copy, where):
    path = bundle_copy / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    assert verify_bundle(bundle_copy, read_manifest(bundle_copy)) == [f"extra file not in manifest: {where}"]


@pytest.mark.parametrize("edit", ["guidance", "step_table", "whitespace", "key_order", "self_hash"])
def test_manifest_edits_that_stay_valid_json_are_reported(bundle_copy, edit):
    """The manifest cannot list its own sha256, so it carries one of its other content (manifest_sha256)."""
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    if edit == "guidance":
        text = path.read_text().replace('"guidance_scale": 7.5', '"guidance_scale": 9.5')
    elif edit == "step_table":
        manifest["sampler"]["step_table"]["timesteps"][0] += 1
        text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    elif edit == "whitespace":
        text = path.read_text().replace('"batch": 2', '"batch":  2')
    elif edit == "key_order":
        text = json.dumps(dict(reversed(list(manifest.items()))), indent=2) + "\n"
    else:
        manifest["manifest_sha256"] = "0" * 64
        text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    assert text != path.read_text()
    path.write_text(text)
    problems = verify_bundle(bundle_copy, read_manifest(bundle_copy))
    assert problems == ["manifest.json changed since it was written (its bytes do not match manifest_sha256)"]


def test_validate_and_run_refuse_a_changed_graph_byte(cw, bundle_copy, tmp_path):
    graph = bundle_copy / "graphs" / "high_res_out.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 3] ^= 0x01
    graph.write_bytes(bytes(data))
    result = cw("validate", bundle_copy)
    assert_user_error(result, "failed 1 check(s): files sha256")
    assert "sha256 changed: graphs/high_res_out.onnx" in result.stdout
    out = tmp_path / "o.npy"
    assert_refused(cw("run", bundle_copy, "--prompt", "x", "--seed", "1", "--latents-out", out),
                   "failed its integrity check: sha256 changed: graphs/high_res_out.onnx", tmp_path, {"bundle"})


def test_validate_and_run_refuse_a_missing_graph(cw, bundle_copy, tmp_path):
    (bundle_copy / "graphs" / "low_res.onnx").unlink()
    result = cw("validate", bundle_copy)
    assert_user_error(result, "files sha256")
    assert "missing file: graphs/low_res.onnx" in result.stdout
    assert_user_error(cw("run", bundle_copy, "--prompt", "x", "--seed", "1", "--latents-out", tmp_path / "o.npy"),
                      "missing file: graphs/low_res.onnx")


def test_run_refuses_an_edited_manifest(cw, bundle_copy, tmp_path):
    path = bundle_copy / "manifest.json"
    path.write_text(path.read_text().replace('"guidance_scale": 7.5', '"guidance_scale": 0.5'))
    assert_refused(cw("run", bundle_copy, "--prompt", "x", "--seed", "1", "--latents-out", tmp_path / "o.npy"),
                   "manifest.json changed since it was written", tmp_path, {"bundle"})


@pytest.mark.parametrize("command", ["validate", "run"])
def test_unknown_schema_version(cw, bundle_copy, tmp_path, command):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 1  # a bundle from before time_features (high_res_in took the raw timestep)
    (bundle_copy / "manifest.json").write_bytes(manifest_bytes(manifest))
    args = ["--prompt", "x", "--seed", "1", "--latents-out", tmp_path / "o.npy"] if command == "run" else []
    assert_user_error(cw(command, bundle_copy, *args), "manifest schema_version 1 is not supported (expected 2)")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_manifest_not_json(cw, bundle_copy, tmp_path, command):
    (bundle_copy / "manifest.json").write_bytes(b'{"schema_version": 1, "files": {')
    args = ["--prompt", "x", "--seed", "1", "--latents-out", tmp_path / "o.npy"] if command == "run" else []
    assert_user_error(cw(command, bundle_copy, *args), "corrupt manifest.json")


def test_truncated_onnx_with_a_consistent_manifest_fails_the_onnx_check(cw, bundle_copy):
    """Someone truncates a graph and re-hashes the manifest: the sha256 table passes, the ONNX checker does not."""
    from cw_export.contract.manifest import list_files

    graph = bundle_copy / "graphs" / "low_res.onnx"
    graph.write_bytes(graph.read_bytes()[:4096])
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"] = list_files(bundle_copy)
    (bundle_copy / "manifest.json").write_bytes(manifest_bytes(manifest))
    result = cw("validate", bundle_copy)
    assert_user_error(result, "failed 1 check(s): low_res onnx")
    assert "PASS  files sha256" in result.stdout and "FAIL  low_res onnx" in result.stdout


def test_run_no_verify_skips_the_check_but_a_broken_graph_is_one_line(cw, bundle_copy, tmp_path):
    vocab = bundle_copy / "tokenizer" / "vocab.json"
    vocab.write_bytes(vocab.read_bytes() + b"\n")  # tampered, but still runnable
    out = tmp_path / "ok.npy"
    args = ["--prompt", "x", "--seed", "1", "--steps", "1", "--clock", "1", "--quiet", "--no-verify"]
    ok = cw("run", bundle_copy, *args, "--latents-out", out)
    assert ok.returncode == 0 and out.is_file(), ok.stderr
    graph = bundle_copy / "graphs" / "low_res.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    bad = tmp_path / "bad.npy"
    # the graph is parsed before onnxruntime sees it (its external data locations are checked: test_confinement.py)
    assert_refused(cw("run", bundle_copy, *args, "--latents-out", bad),
                   "graphs/low_res.onnx is not a readable ONNX graph", tmp_path, {"bundle", "ok.npy"})
