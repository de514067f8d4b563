"""The built-in model's snapdragon-int8 bundle end to end on the QNN HTP backend (emulated on x86_64): every
quantized graph places with CPU fallback disabled, the parity gate passes there, the numbers are recorded beside the
CPU ones, and a whole clocked run on the HTP matches the CPU EP's (docs/qnn_htp.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from user_errors import assert_user_error

from cw_export.models.pipeline import SHAPES_ADAPTOR, SHAPES_DIR

pytestmark = [pytest.mark.skipif(not (SHAPES_DIR / "model_index.json").is_file() or not SHAPES_ADAPTOR.is_file(),
                                 reason="trained shapes weights or adaptor not present"),
              pytest.mark.slow]  # the whole built-in bundle on the emulated HTP: ~5 minutes


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cw_export.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The README's main job as it is (snapdragon-int8, built-in model, its learned adaptor, the recipe's 4 held-out
    parity prompts: the gate takes their median), 8-bit sweep included: its mixed 8/16-bit graphs are the ones that
    once did not place on the HTP (a merged graph whose ops' input and output widths differ), which a bundle built
    without the sweep never showed."""
    out = tmp_path_factory.mktemp("htp") / "bundle"
    result = cli("--target", "snapdragon-int8", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


def test_validate_on_htp_passes_the_gate_and_records_it(bundle):
    before = _manifest(bundle)
    quantized = sorted(n for n, g in before["graphs"].items() if g["precision"] != "fp32")
    assert set(quantized) == {"text_encoder", "high_res_in", "low_res", "adaptor", "high_res_out", "vae_decoder"}
    assert any(g["precision"].startswith("w8a8") for g in before["graphs"].values())  # the sweep's 8-bit graphs
    result = cli("validate", str(bundle), "--provider", "qnn-htp", "--record")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in quantized:
        assert f"PASS  {name} SQNR on qnn-htp" in result.stdout
    assert "PASS  quantized parity gate on qnn-htp" in result.stdout
    recorded = _manifest(bundle)["parity_by_provider"]["qnn-htp"]
    assert recorded["gate"] == {"passed": True, "failures": []}
    minimum = before["parity"]["thresholds"]["graph_min_sqnr_db"]
    assert set(recorded["graphs"]) == set(quantized)
    assert all(r["sqnr_db"] >= minimum for r in recorded["graphs"].values()), recorded["graphs"]
    assert recorded["final_latent_psnr_db"] >= before["parity"]["thresholds"]["final_latent_min_psnr_db"]
    assert "| graph | cpu (onnxruntime CPU EP) | qnn-htp |" in (bundle / "README.md").read_text(encoding="utf-8")
    assert cli("validate", str(bundle), "--no-parity").returncode == 0  # file hashes still consistent


def test_record_needs_another_provider(bundle):
    result = cli("validate", str(bundle), "--record")
    assert_user_error(result, "--provider qnn-htp")


def test_clocked_run_on_htp_matches_the_cpu(bundle, tmp_path):
    latents = {}
    for provider in ("cpu", "qnn-htp"):
        out = tmp_path / f"{provider}.npy"
        result = cli("run", str(bundle), "--prompt", "a small blue cross at the top", "--seed", "3",
                     "--provider", provider, "--latents-out", str(out))
        assert result.returncode == 0, result.stderr
        latents[provider] = np.load(out).astype(np.float64)
    cpu, htp = latents["cpu"], latents["qnn-htp"]
    psnr = 10 * np.log10(np.max(np.abs(cpu)) ** 2 / np.mean((htp - cpu) ** 2))
    assert 30.0 <= psnr < 200.0, psnr  # close to the CPU EP, and not bit-exact: it ran on another backend
