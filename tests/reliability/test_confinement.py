"""Confinement (issue #20 A.1-A.3): ``validate`` and ``run`` read regular files inside the bundle only.

A bundle's sender can recompute every sha256 (``manifest_bytes`` re-signs any dict), so every hostile bundle here
comes with a manifest re-signed the way an attacker would: ``files`` lists what a symlink-following reader sees,
with matching hashes. The refusal must come from the confinement (``contract.confine``), never from a hash. The
file outside the bundle holds ``SECRET``; it must never reach the output, and the one error line names the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from user_errors import assert_nothing_written, assert_refused, assert_user_error

from cw_export.contract.manifest import manifest_bytes

SECRET = "cw-export-outside-secret-5b1f"
RUN = ("--prompt", "x", "--seed", "1", "--steps", "1", "--clock", "1", "--quiet")


def _sign(bundle: Path, edit=None) -> None:
    """Re-sign the manifest as an attacker would: ``files`` lists every path, symlinks followed, with the sha256 of
    what a reader would get; then ``edit`` changes the manifest (the self-hash is recomputed after it)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {}
    for folder, _, names in os.walk(bundle, followlinks=True):
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(bundle).as_posix()
            if rel != "manifest.json" and path.is_file():
                data = path.read_bytes()
                files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["files"] = files
    if edit is not None:
        edit(manifest)
    (bundle / "manifest.json").write_bytes(manifest_bytes(manifest))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the bundle (tmp_path/bundle) holding the secret and copies of bundle files."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET)
    return folder


def _outside_copy(bundle: Path, outside: Path, rel: str) -> Path:
    """A copy of a bundle file or folder outside the bundle, marked with the secret where that keeps it usable."""
    target = outside / rel.replace("/", "_")
    if (bundle / rel).is_dir():
        shutil.copytree(bundle / rel, target)
    else:
        shutil.copy(bundle / rel, target)
    if rel.endswith("vocab.json") or (target / "vocab.json").is_file():
        vocab_file = target if target.is_file() else target / "vocab.json"
        vocab = json.loads(vocab_file.read_text())
        vocab_file.write_text(json.dumps({**vocab, SECRET: len(vocab)}))
    return target


def _link(path: Path, target: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=target.is_dir())


def _quantization(graph: dict, encodings: str, encodings_graph: str) -> None:
    graph["quantization"] = {"backend": "aimet", "activation_bits": 8, "weight_bits": 8, "encodings": encodings,
                             "details": {"encodings_graph": encodings_graph}}


# --- A.1: symlinks inside the bundle ---------------------------------------------------------------------------

# name -> (the bundle path that becomes a symlink, whether ``run --no-verify`` reads it)
LINKS = {
    "vocab_file": ("tokenizer/vocab.json", True),
    "graph_file": ("graphs/low_res.onnx", True),
    "tokenizer_folder": ("tokenizer", True),
    "graphs_folder": ("graphs", True),
    "listed_extra": ("leak.txt", False),
}


def _make_link(bundle: Path, outside: Path, rel: str) -> None:
    target = outside / "secret.txt" if not (bundle / rel).exists() else _outside_copy(bundle, outside, rel)
    _link(bundle / rel, target)
    _sign(bundle)


@pytest.mark.parametrize("case", LINKS)
def test_validate_refuses_a_symlink_and_does_not_follow_it(cw, bundle_copy, outside, case):
    rel = LINKS[case][0]
    _make_link(bundle_copy, outside, rel)
    result = cw("validate", bundle_copy, "--no-parity")
    assert_user_error(result, "failed 1 check(s): files sha256")
    assert f"symbolic link in the bundle (not followed): {rel}" in result.stdout, result.stdout
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no_verify"])
@pytest.mark.parametrize("case", LINKS)
def test_run_refuses_a_symlink_and_does_not_follow_it(cw, bundle_copy, outside, tmp_path, case, verify):
    rel, read_by_run = LINKS[case]
    if not verify and not read_by_run:
        pytest.skip(f"run --no-verify never opens {rel}")
    _make_link(bundle_copy, outside, rel)
    out = tmp_path / "out"
    out.mkdir()
    args = [*RUN, "--latents-out", out / "o.npy"] + ([] if verify else ["--no-verify"])
    result = cw("run", bundle_copy, *args)
    assert_refused(result, f"symbolic link in the bundle (not followed): {rel}" if verify
                   else f"{rel} is a symbolic link", out)
    assert SECRET not in result.stdout + result.stderr


# --- A.2: every path-bearing manifest field: absolute, '..' and symlinked ------------------------------------

FIELDS = ["graphs.low_res.file", "files", "tokenizer.folder", "graphs.low_res.quantization.encodings",
          "graphs.low_res.quantization.details.encodings_graph", "context_binaries.SM8650.low_res.model",
          "context_binaries.SM8650.low_res.binary"]
CONTEXT = {"model": "context/SM8650/low_res_ctx.onnx", "binary": "context/SM8650/low_res_ctx.bin"}


def _hostile_field(bundle: Path, outside: Path, field: str, form: str) -> str:
    """Point ``field`` at a file outside the bundle in ``form``; returns the path written into the manifest."""
    source = {"graphs.low_res.file": "graphs/low_res.onnx", "tokenizer.folder": "tokenizer",
              "graphs.low_res.quantization.details.encodings_graph": "graphs/low_res.onnx",
              "context_binaries.SM8650.low_res.model": "graphs/low_res.onnx"}.get(field)
    target = _outside_copy(bundle, outside, source) if source else outside / "secret.txt"
    if form == "absolute":
        value = str(target)
    elif form == "parent":
        value = os.path.relpath(target, bundle).replace(os.sep, "/")
        assert value.startswith("../")
    else:
        value = {"graphs.low_res.file": "graphs/other.onnx", "files": "leak.txt", "tokenizer.folder": "tok",
                 "graphs.low_res.quantization.encodings": "encodings/low_res.json",
                 "graphs.low_res.quantization.details.encodings_graph": "encodings/low_res_fp32.onnx",
                 **{f"context_binaries.SM8650.low_res.{key}": rel for key, rel in CONTEXT.items()}}[field]
        _link(bundle / value, target)

    def edit(manifest: dict) -> None:
        graph = manifest["graphs"]["low_res"]
        if field == "graphs.low_res.file":
            graph["file"] = value
        elif field == "files":
            manifest["files"][value] = {"sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                                        "size": target.stat().st_size}
        elif field == "tokenizer.folder":
            manifest["tokenizer"]["folder"] = value
        elif field.endswith(".encodings"):
            _quantization(graph, value, "graphs/low_res.onnx")
        elif field.endswith(".encodings_graph"):
            _quantization(graph, "encodings/low_res.json", value)
        else:
            key = field.rsplit(".", 1)[1]
            manifest["context_binaries"] = {"SM8650": {"low_res": {**CONTEXT, key: value}}}

    if field.endswith(".encodings_graph"):
        (bundle / "encodings").mkdir(exist_ok=True)
        (bundle / "encodings" / "low_res.json").write_text("{}")
    _sign(bundle, edit)
    return value


@pytest.mark.parametrize("form", ["absolute", "parent", "symlink"])
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_every_path_field_is_confined(cw, bundle_copy, outside, tmp_path, command, field, form):
    value = _hostile_field(bundle_copy, outside, field, form)
    out = tmp_path / "out"
    out.mkdir()
    args = ["--no-parity"] if command == "validate" else [*RUN, "--latents-out", out / "o.npy"]
    result = cw(command, bundle_copy, *args)
    if form != "symlink":  # refused when the manifest is read, before any file is opened
        line = assert_user_error(result, "is not a path inside the bundle")
        assert (field if field != "files" else "manifest files[") in line and value[:40] in line, line
    elif command == "validate":
        assert_user_error(result, "failed 1 check(s): files sha256")
        assert f"symbolic link in the bundle (not followed): {value}" in result.stdout, result.stdout
    else:
        assert_user_error(result, f"symbolic link in the bundle (not followed): {value}")
    assert SECRET not in result.stdout + result.stderr
    assert_nothing_written(out)


@pytest.mark.parametrize("field", ["graphs.low_res.file", "tokenizer.folder"])
def test_run_no_verify_refuses_symlinked_fields(cw, bundle_copy, outside, tmp_path, field):
    """Without the integrity check, the runtime's own reads still go through the confinement."""
    value = _hostile_field(bundle_copy, outside, field, "symlink")
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(cw("run", bundle_copy, *RUN, "--no-verify", "--latents-out", out / "o.npy"),
                   f"{value} is a symbolic link", out)


def test_lint_reads_encodings_through_the_confinement(bundle_copy, outside):
    """The lint refuses a symlinked encodings file itself (validate never reaches it: the sha256 check fails first)."""
    from cw_export.contract.manifest import read_manifest
    from cw_export.validate.lint import encodings_checks

    value = _hostile_field(bundle_copy, outside, "graphs.low_res.quantization.encodings", "symlink")
    (check,) = encodings_checks(bundle_copy, read_manifest(bundle_copy))
    assert not check.ok and f"{value} is a symbolic link" in check.detail, check.detail
    assert SECRET not in check.detail


# --- A.3: ONNX external data -----------------------------------------------------------------------------------

def _external(bundle: Path, outside: Path, form: str) -> str:
    """Move low_res's largest initializer into an external data file (``form``: where it lies); re-sign."""
    import onnx
    from onnx import external_data_helper

    path = bundle / "graphs" / "low_res.onnx"
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = tensor.raw_data
    location = {"absolute": str(outside / "weights.bin"), "parent": "../../outside/weights.bin",
                "symlink": "low_res.onnx.data", "inside": "low_res.onnx.data"}[form]
    (outside / "weights.bin" if form != "inside" else path.parent / location).write_bytes(data)
    if form == "symlink":
        (path.parent / location).symlink_to(outside / "weights.bin")
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=len(data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    path.write_bytes(model.SerializeToString())
    _sign(bundle)
    return location


@pytest.mark.parametrize("form", ["absolute", "parent", "symlink"])
def test_validate_refuses_external_data_outside_the_bundle(cw, bundle_copy, outside, form):
    location = _external(bundle_copy, outside, form)
    result = cw("validate", bundle_copy, "--no-parity")
    if form == "symlink":
        assert_user_error(result, "failed 1 check(s): files sha256")
        assert "symbolic link in the bundle (not followed): graphs/low_res.onnx.data" in result.stdout
    else:
        assert_user_error(result, "failed 1 check(s): low_res onnx")
        assert f"external data location {location!r:.160} is not a path inside the bundle" in result.stdout


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no_verify"])
@pytest.mark.parametrize("form", ["absolute", "parent", "symlink"])
def test_run_refuses_external_data_outside_the_bundle_in_one_line(cw, bundle_copy, outside, tmp_path, form, verify):
    location = _external(bundle_copy, outside, form)
    out = tmp_path / "out"
    out.mkdir()
    args = [*RUN, "--latents-out", out / "o.npy"] + ([] if verify else ["--no-verify"])
    result = cw("run", bundle_copy, *args)
    if form == "symlink":
        assert_user_error(result, "symbolic link in the bundle (not followed): graphs/low_res.onnx.data" if verify
                          else "graphs/low_res.onnx.data is a symbolic link")
    else:
        assert_user_error(result, f"graphs/low_res.onnx: external data location {location!r:.160} is not a path "
                                  "inside the bundle")
    assert_nothing_written(out)


def test_external_data_inside_the_bundle_runs_bit_identically(cw, fp32_bundle, bundle_copy, outside, tmp_path):
    """Graphs with external data are read through the confinement too (in memory), with the same results."""
    _external(bundle_copy, outside, "inside")
    result = cw("validate", bundle_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    latents = []
    for bundle in (fp32_bundle, bundle_copy):
        out = tmp_path / f"{len(latents)}.npy"
        done = cw("run", bundle, *RUN, "--latents-out", out)
        assert done.returncode == 0, done.stderr
        latents.append(np.load(out))
    assert np.array_equal(*latents)


# --- the confinement function itself -------------------------------------------------------------------------

@pytest.mark.parametrize("rel, fragment", [
    ("/etc/hostname", "is not a path inside the bundle"),
    ("../outside/secret.txt", "is not a path inside the bundle"),
    ("graphs/../manifest.json", "is not a path inside the bundle"),
    ("./manifest.json", "is not a path inside the bundle"),
    ("graphs\\low_res.onnx", "is not a path inside the bundle"),
    ("link.txt", "link.txt is a symbolic link"),
    ("linked/vocab.json", "linked is a symbolic link"),
    ("tokenizer/dangling", "tokenizer/dangling is a symbolic link"),
    ("fifo", "fifo is not a regular file"),
    ("graphs", "graphs is not a regular file"),
    ("nothing/here.txt", "missing file: nothing/here.txt"),
])
def test_open_inside_refuses(bundle_copy, outside, rel, fragment):
    from cw_export.contract.confine import read_inside
    from cw_export.errors import BundleError

    (bundle_copy / "link.txt").symlink_to(outside / "secret.txt")
    (bundle_copy / "linked").symlink_to(bundle_copy / "tokenizer", target_is_directory=True)  # even inside
    (bundle_copy / "tokenizer" / "dangling").symlink_to(outside / "gone")
    os.mkfifo(bundle_copy / "fifo")
    with pytest.raises(BundleError, match=fragment) as caught:
        read_inside(bundle_copy, rel)
    assert SECRET not in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_open_inside_reads_regular_files_and_follows_the_bundle_argument(bundle_copy, tmp_path):
    """The bundle folder itself is the user's choice: a symlink to it is fine, links inside it are not."""
    from cw_export.contract.confine import read_inside

    link = tmp_path / "latest"
    link.symlink_to(bundle_copy, target_is_directory=True)
    assert read_inside(link, "tokenizer/vocab.json") == (bundle_copy / "tokenizer" / "vocab.json").read_bytes()
    assert read_inside(link, "tokenizer/absent.json", missing_ok=True) is None


def test_a_symlinked_folder_is_one_finding_and_nothing_behind_it_is_listed(bundle_copy, outside):
    from cw_export.contract.manifest import list_files, read_manifest, verify_bundle

    _make_link(bundle_copy, outside, "tokenizer")
    assert verify_bundle(bundle_copy, read_manifest(bundle_copy)) == [
        "symbolic link in the bundle (not followed): tokenizer"]
    assert not [rel for rel in list_files(bundle_copy) if rel.startswith("tokenizer")]


@pytest.mark.parametrize("provider", ["cpu", "qnn-htp"])
def test_in_memory_sessions_equal_sessions_from_the_path(tmp_path, provider):
    """``bundle_session`` hands onnxruntime bytes and in-memory external data: on the CPU EP and on the (emulated)
    QNN HTP this gives the very outputs a session created from the file gives."""
    import onnx
    from qdq_graphs import quantized_conv

    from cw_export.runtime.sessions import InMemoryGraph, create_session, session_config

    _, qdq, data = quantized_conv(tmp_path, "conv_qdq.onnx")
    model = onnx.load(str(qdq))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=0)
    in_memory = InMemoryGraph("conv", (tmp_path / "ext.onnx").read_bytes(),
                              {"ext.onnx.data": (tmp_path / "ext.onnx.data").read_bytes()})
    config = session_config("basic")
    from_path = create_session(tmp_path / "ext.onnx", provider, config=config, precision="w8a8")
    from_memory = create_session(in_memory, provider, config=config, precision="w8a8")
    assert from_memory.get_providers() == from_path.get_providers()
    for x in data[:2]:
        assert np.array_equal(from_path.run(["y"], {"x": x})[0], from_memory.run(["y"], {"x": x})[0])
