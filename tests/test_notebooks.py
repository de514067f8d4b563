"""Execute notebooks/*.ipynb on their fast settings (CW_NOTEBOOK_FAST=1) so they never rot, and check key outputs.

Each notebook reads its settings cell from the environment: CW_NOTEBOOK_FAST=1 picks fewer prompts, steps and epochs,
CW_NOTEBOOK_WORKDIR where it writes. The notebooks are committed without outputs (notebooks/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("quickstart", "sensitivity", "distill")
SHAPES_WEIGHTS = Path(__file__).resolve().parents[1] / "cw_export" / "models" / "builtin" / "model_index.json"


def run_notebook(name: str, workdir: Path, monkeypatch) -> "nbformat.NotebookNode":
    """Execute one notebook in a fresh kernel with the fast settings; a failing cell fails the test with its error."""
    monkeypatch.setenv("CW_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("CW_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("CW_EXPORT_CACHE", str(workdir / "cache"))  # the kernel inherits the environment
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return notebook


def outputs(notebook) -> list[dict]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def text_of(notebook) -> str:
    parts = []
    for out in outputs(notebook):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "text/plain" in out.get("data", {}):
            parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def result_line(notebook, tag: str) -> dict:
    """The JSON a notebook prints after ``tag`` (its measured numbers, for the assertions below)."""
    lines = [line for line in text_of(notebook).splitlines() if line.startswith(tag + " ")]
    assert len(lines) == 1, f"{tag} printed {len(lines)} times"
    return json.loads(lines[0][len(tag) + 1:])


def images(notebook) -> int:
    return sum("image/png" in out.get("data", {}) for out in outputs(notebook))


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "CW_NOTEBOOK_FAST" in code[0].source, "the first code cell holds the settings the tests override"


def test_quickstart_builds_generates_and_shows_parity(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_NOTEBOOK_MODEL", "tiny-random")  # the unit tests' fixture; builtin (shapes) interactively
    notebook = run_notebook("quickstart", tmp_path, monkeypatch)
    assert images(notebook) >= 3  # the generated image, the grid, the parity curve
    text = text_of(notebook)
    assert "final latent PSNR" in text and "gate passed: True" in text
    assert (tmp_path / "quickstart" / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "quickstart" / "grid.png").is_file()


@pytest.mark.slow  # executes a notebook: minutes
@pytest.mark.skipif(not SHAPES_WEIGHTS.is_file(), reason="trained shapes weights not present")
def test_sensitivity_low_res_perturbation_hurts_less(tmp_path, monkeypatch):
    notebook = run_notebook("sensitivity", tmp_path, monkeypatch)
    assert images(notebook) >= 2
    result = result_line(notebook, "SENSITIVITY_RESULT")
    low, high = result["r_out"]["latent_psnr_db"], result["skips"]["latent_psnr_db"]
    assert len(low) == len(high) == result["settings"]["steps"]
    # Measured on the shapes model (notebooks/README.md): perturbing the low-res r_out leaves the final latent
    # >= 10 dB closer to the unperturbed one than perturbing the high-res skips, at every step.
    assert all(lo > hi for lo, hi in zip(low, high)), (low, high)
    assert result["verdict"]["low_res_hurts_less"] is True


@pytest.mark.slow  # executes a notebook: minutes
@pytest.mark.skipif(not SHAPES_WEIGHTS.is_file(), reason="trained shapes weights not present")
def test_distill_trains_and_compares_identity_and_learned(tmp_path, monkeypatch):
    notebook = run_notebook("distill", tmp_path, monkeypatch)
    assert images(notebook) >= 2  # loss curve / PSNR per step, images side by side
    result = result_line(notebook, "DISTILL_RESULT")
    assert set(result["final_latent_psnr_db"]) == {"identity", "learned"}
    assert all(0 < v < 999 for v in result["final_latent_psnr_db"].values())
    assert result["epochs_done"] >= 1
    assert (tmp_path / "distill" / "adaptor.safetensors").is_file()


# -- the sensitivity notebook's helper (cw_export/evaluate/sensitivity.py), on the tiny random model ----------------
def test_perturbation_keeps_the_moments_and_alpha_1_is_identity():
    import torch

    from cw_export.evaluate.sensitivity import perturb

    feature = torch.randn(2, 8, 32, 32) * 3.0 + 1.5
    torch.testing.assert_close(perturb(feature, 1.0, torch.Generator().manual_seed(0)), feature)
    out = perturb(feature, 0.3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.mean(dim=(-2, -1)), feature.mean(dim=(-2, -1)), atol=0.4, rtol=0)
    torch.testing.assert_close(out.std(dim=(-2, -1)), feature.std(dim=(-2, -1)), atol=0.0, rtol=0.15)
    correlation = torch.corrcoef(torch.stack([out.flatten(), feature.flatten()]))[0, 1]
    assert 0.45 < float(correlation) < 0.65  # sqrt(0.3) = 0.548 of the content is kept


def test_unperturbed_sensitivity_trajectory_is_the_full_unet_trajectory(tiny_model):
    import numpy as np
    import torch

    from cw_export.evaluate.sensitivity import SITES, perturbed_latents
    from cw_export.reference import text_embeddings, torch_split_trajectory
    from cw_export.split import split_unet

    split = split_unet(tiny_model.unet)
    hidden, pooled = text_embeddings(tiny_model, "a red circle on the left")
    noise = torch.randn((1, 4, tiny_model.default_latent_size, tiny_model.default_latent_size),
                        generator=torch.Generator().manual_seed(0))
    reference = perturbed_latents(tiny_model, split, hidden, noise, steps=3)
    expected = torch_split_trajectory(tiny_model, hidden, pooled, noise, 3, clock=1, split=split).latents
    np.testing.assert_allclose(reference, expected, atol=1e-5)
    for site in SITES:
        perturbed = perturbed_latents(tiny_model, split, hidden, noise, 3, site=site, at_step=1)
        assert not np.allclose(perturbed, reference, atol=1e-4), site
