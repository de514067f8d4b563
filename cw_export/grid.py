"""``cw-export run BUNDLE --grid PROMPTS --image-out grid.png``: the picture users want to look at.

One row per prompt, one column per variant, all from the same initial noise:
  full FP32 (torch, clock 1) | clockwork FP32 (torch, the bundle's clock) | the bundle on CPU | the bundle on QNN HTP
The FP32 columns need the source model (desktop side, torch); the bundle columns use the runtime only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .models.source import load_source_model, source_model_reachable, source_model_spec
from .runtime.image import image_grid
from .runtime.noise import seeded_noise
from .runtime.pipeline import BundleRunner

MAX_GRID_PROMPTS = 16


@dataclass
class GridResult:
    columns: list[str]
    prompts: list[str]
    rows: list[list[np.ndarray]]


def _bundle_columns(bundle: Path, manifest: dict) -> dict[str, BundleRunner]:
    from .runtime.sessions import PROVIDERS

    precision = "int8" if any(g.get("precision", "fp32") != "fp32" for g in manifest["graphs"].values()) else "fp32"
    runners = {f"clockwork {precision} (cpu)": BundleRunner(bundle, provider="cpu", verify=False)}
    if "qnn-htp" in PROVIDERS:
        try:
            runners[f"clockwork {precision} (qnn-htp)"] = BundleRunner(bundle, provider="qnn-htp", verify=False)
        except Exception as exc:  # HTP is optional here: the grid says why the column is missing
            print(f"qnn-htp column skipped: {' '.join(str(exc).split())[:200]}")
    return runners


def make_grid(bundle: str | Path, prompts: list[str], seed: int, source_model=None) -> GridResult:
    """Generate every variant for every prompt; ``source_model`` defaults to the bundle's (must be reachable)."""
    import torch

    from .reference import decode_image, text_embeddings, torch_trajectory

    if not prompts:
        raise InputError("the grid needs at least one prompt")
    if len(prompts) > MAX_GRID_PROMPTS:
        raise InputError(f"the grid takes at most {MAX_GRID_PROMPTS} prompts, got {len(prompts)}")
    bundle = Path(bundle)
    base = BundleRunner(bundle)
    manifest = base.manifest
    if manifest["adaptor"]["kind"] != "identity":
        raise InputError("the grid's torch clockwork column supports the identity adaptor only for now")
    if source_model is None:
        if not source_model_reachable(manifest):
            raise InputError(f"the grid's FP32 columns need the source model, not reachable at "
                             f"{source_model_spec(manifest)}")
        source_model = load_source_model(manifest)  # with its recorded LoRAs fused in (docs/lora.md)
    schedule = manifest["schedule"]
    runners = _bundle_columns(bundle, manifest)
    columns = ["full fp32 (torch)", f"clockwork fp32 (torch, clock {schedule['clock']})", *runners]
    rows = []
    for k, prompt in enumerate(prompts):
        hidden, pooled = text_embeddings(source_model, prompt)
        noise = seeded_noise(base.latent_shape(), seed + k)
        row = []
        for clock in (1, schedule["clock"]):
            ref = torch_trajectory(source_model, hidden, torch.from_numpy(noise), schedule["steps"], clock,
                                   manifest["guidance_scale"], manifest["sampler"]["name"], pooled_text=pooled)
            row.append(decode_image(source_model, ref.latents))
        for column, runner in list(runners.items()):
            try:
                h, p = runner.encode_prompt(prompt)
                row.append(runner.decode(runner.generate(h, p, noise).latents))
            except Exception as exc:  # only the optional HTP column may fail; the grid says why it is missing
                if runner.provider == "cpu":
                    raise
                print(f"{column} column skipped: {' '.join(str(exc).split())[:200]}")
                index = columns.index(column)
                del runners[column], columns[index]
                for done in rows:
                    del done[index]
        rows.append(row)
    return GridResult(columns, prompts, rows)


def save_grid_png(result: GridResult, out: Path) -> None:
    """A labelled grid (matplotlib: column titles, prompts as row labels), written atomically."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .atomic import write_file_atomic

    n_rows, n_cols = len(result.rows), len(result.columns)
    fig = Figure(figsize=(2.2 * n_cols, 2.2 * n_rows + 0.4))  # no pyplot: the caller's backend stays as it is
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(result.rows):
        for j, image in enumerate(row):
            ax = axes[i][j]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(result.columns[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(result.prompts[i][:40], fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    write_file_atomic(Path(out), buffer.getvalue())


def plain_grid(result: GridResult) -> np.ndarray:
    """The unlabelled tile grid (for tests and for tools that want raw pixels)."""
    return image_grid(result.rows)
