"""report.html: written by every build, listed in the manifest, deterministic, tolerant of missing sections."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil

import pytest

from cw_export.cli import main
from cw_export.bundle.report import REPORT_NAME, SECTIONS, parity_runs, render_report
from cw_export.contract.manifest import read_manifest, verify_bundle

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]


def test_build_writes_report_listed_in_manifest(fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    assert REPORT_NAME in manifest["files"]
    assert verify_bundle(fp32_bundle, manifest) == []
    page = (fp32_bundle / REPORT_NAME).read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    for graph in manifest["graphs"]:
        assert f"<td>{graph}</td>" in page
    assert "No per-step parity" in page  # FP32 bundle: the section is there and says why it is empty
    pngs = _pngs(page)
    assert len(pngs) >= 2
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE)
        assert b"Software" not in png and b"tIME" not in png  # no tool/time metadata: byte-reproducible


def test_report_is_a_pure_function_of_the_bundle(fp32_bundle, tmp_path):
    """Regenerating gives the build's bytes (so rebuilt bundles stay byte-identical), in process and via the CLI."""
    built = (fp32_bundle / REPORT_NAME).read_bytes()
    manifest = read_manifest(fp32_bundle)
    assert render_report(fp32_bundle, manifest) == built
    manifest_without_files = {k: v for k, v in manifest.items() if k != "files"}
    assert render_report(fp32_bundle, manifest_without_files) == built
    out = tmp_path / "again.html"
    assert main(["report", str(fp32_bundle), "--out", str(out)]) == 0
    assert out.read_bytes() == built


def test_report_in_place_keeps_bundle_intact(fp32_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    (bundle / REPORT_NAME).write_text("stale", encoding="utf-8")
    assert verify_bundle(bundle, read_manifest(bundle)) != []
    assert main(["report", str(bundle)]) == 0
    assert (bundle / REPORT_NAME).read_bytes() == (fp32_bundle / REPORT_NAME).read_bytes()
    assert verify_bundle(bundle, read_manifest(bundle)) == []


def _fake_run(offset: float) -> dict:
    kinds = ["full", "clocked"] * 4
    return {"graphs": {"low_res": {"sqnr_db": 30.0 + offset}},
            "steps": [{"step": i, "kind": k, "latent_psnr_db": 40.0 - i + offset, "guidance_ratio": 1.0 - 0.01 * i}
                      for i, k in enumerate(kinds)],
            "final_latent_psnr_db": 33.0 + offset}


@pytest.mark.parametrize("parity", [_fake_run(0.0), {"w8a16/cpu": _fake_run(0.0), "w8a8/cpu": _fake_run(-5.0)}])
def test_parity_curves_from_manifest(fp32_bundle, parity):
    manifest = copy.deepcopy(read_manifest(fp32_bundle))
    manifest["parity"] = parity
    runs = parity_runs(manifest)
    assert runs and all(len(run["steps"]) == 8 for run in runs.values())
    page = render_report(fp32_bundle, manifest).decode("utf-8")
    curves = page.split('<section id="parity-curves">')[1].split("</section>")[0]
    assert "No per-step parity" not in curves and len(_pngs(curves)) == 1
    assert curves.count("<tr>") == 1 + 8 * len(runs)
    table = page.split('<section id="parity-table">')[1].split("</section>")[0]
    assert "30" in table  # the quantized SQNR of low_res


@pytest.mark.parametrize("parity", [None, "n/a", {"gate": {"passed": True}}, {"steps": "broken"}])
def test_report_tolerates_missing_or_foreign_parity(fp32_bundle, parity):
    manifest = copy.deepcopy(read_manifest(fp32_bundle))
    if parity is not None:
        manifest["parity"] = parity
    page = render_report(fp32_bundle, manifest).decode("utf-8")
    assert "No per-step parity" in page


def test_report_embeds_sample_images(fp32_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    png = _pngs((bundle / REPORT_NAME).read_text(encoding="utf-8"))[0]
    (bundle / "samples").mkdir()
    (bundle / "samples" / "prompt_0.png").write_bytes(png)
    page = render_report(bundle, json.loads((bundle / "manifest.json").read_text())).decode("utf-8")
    samples = page.split('<section id="samples">')[1].split("</section>")[0]
    assert _pngs(samples) == [png] and "prompt_0" in samples
