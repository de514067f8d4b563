"""Building twice with the same inputs gives byte-identical graphs and manifest, for quantized targets too; and a
quantized bundle whose encodings do not match its graphs fails ``validate``.

The FP32 case is tests/bundle/test_bundle.py::test_build_is_deterministic. Quantized builds here use the smallest
calibration and parity budgets (1 prompt, 2 steps): determinism does not depend on them, the test time does.
The second build reuses the first one's calibration cache, as a user's second build would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from user_errors import assert_user_error

from cw_export.contract.manifest import list_files, manifest_bytes

TARGET = "snapdragon-int8"
BACKENDS = ["ort", "aimet"]  # ort: the recipe's default; aimet: also writes encodings
SMALL = {"calibration_prompts": 1, "calibration_samples": 4}
_BUILT: dict[str, tuple[Path, Path]] = {}


def _build(backend: str, out: Path) -> Path:
    from cw_export.build import BuildOptions, build_bundle
    from cw_export.recipe import load_recipe

    recipe = (load_recipe(TARGET).with_build(steps=2, clock=2).with_quantization(backend=backend, **SMALL)
              .with_parity(heldout_prompts=1))
    return build_bundle(recipe, BuildOptions(model="tiny-random", out=out, progress=False, allow_low_parity=True))


def _twice(backend: str, tmp_path_factory) -> tuple[Path, Path]:
    if backend not in _BUILT:
        root = tmp_path_factory.mktemp(f"{TARGET}-{backend}")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CW_EXPORT_CACHE", str(root / "cache"))  # never the user's ~/.cache
            _BUILT[backend] = _build(backend, root / "first"), _build(backend, root / "second")
    return _BUILT[backend]


@pytest.fixture(scope="module", params=BACKENDS)
def twice(request, tmp_path_factory):
    return _twice(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def aimet_twice(tmp_path_factory):
    return _twice("aimet", tmp_path_factory)


def _files(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


def _without_run_state(manifest: bytes) -> dict:
    data = json.loads(manifest)
    data.pop("manifest_sha256")
    return data


@pytest.mark.slow  # two quantized builds per backend: ~4 minutes
def test_graphs_and_every_other_file_are_byte_identical(twice):
    first, second = map(_files, twice)
    assert sorted(first) == sorted(second)
    backend = json.loads(first["manifest.json"])["recipe"]["quantization"]["backend"]
    assert any(name.startswith("graphs/") for name in first)
    assert any(name.startswith("encodings/") for name in first) == (backend == "aimet")
    differing = [name for name in first if name != "manifest.json" and first[name] != second[name]]
    assert differing == []
    assert _without_run_state(first["manifest.json"]) == _without_run_state(second["manifest.json"])


def test_manifest_is_byte_identical(twice):
    first, second = twice
    assert (first / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()


def _rehash(bundle: Path) -> None:
    """Re-list every file in the manifest, as someone hiding a change from the sha256 table would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = list_files(bundle)
    (bundle / "manifest.json").write_bytes(manifest_bytes(manifest))


@pytest.mark.parametrize("damage, fragment", [
    ("unknown_tensor", "name tensors the graph lacks"),
    ("other_graphs_encodings", "encodings graph I/O"),
    ("bit_width", "activation bit width(s) [4]"),
])
def test_encodings_that_do_not_match_the_graph_fail_validate(cw, aimet_twice, tmp_path, damage, fragment):
    bundle = Path(shutil.copytree(aimet_twice[0], tmp_path / "bundle"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    quantized = sorted(n for n, g in manifest["graphs"].items() if (g.get("quantization") or {}).get("encodings"))
    assert len(quantized) >= 2, "the target writes encodings for its quantized graphs"
    name = quantized[0]
    quant = manifest["graphs"][name]["quantization"]
    path = bundle / quant["encodings"]
    encodings = json.loads(path.read_text())
    if damage == "unknown_tensor":
        encodings["activation_encodings"][0]["name"] = "no/such/tensor"
    elif damage == "bit_width":
        encodings["activation_encodings"][-1]["bw"] = 4
    else:
        other = manifest["graphs"][quantized[1]]["quantization"]
        shutil.copyfile(bundle / other["details"]["encodings_graph"], bundle / quant["details"]["encodings_graph"])
    path.write_text(json.dumps(encodings, indent=2))
    _rehash(bundle)
    result = cw("validate", bundle, "--no-parity")
    assert_user_error(result, f"{name} encodings")
    assert fragment in result.stdout and "PASS  files sha256" in result.stdout
