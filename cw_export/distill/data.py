"""Teacher data: the frozen UNet's unrolled trajectories -> adaptor training pairs (PAPER.md "Training").

Steps:
  1. prompt k of the prompt set starts from unit Gaussian noise seeded ``seed + k`` (numpy PCG64, as
     ``cw-export run --seed``); prompts only, never images
  2. the teacher samples the whole trajectory from that noise: clock 1, the bundle's sampler, steps and guidance,
     batch [uncond, cond], through the split modules so that r_in, temb and r_out are read at every step
     (``reference.torch_split_trajectory``)
  3. at every step i that the clock gives to the adaptor (``step_kinds(steps, clock)[i] == "clocked"``) one pair:
       inputs  r_in(i), r_out_prev = r_out(i-1) (the previous step's teacher r_out), temb(i), pooled_text
       target  r_out(i)
     each array keeps the CFG batch of 2, exactly the tensors the ``adaptor`` graph sees in the bundle
  4. pairs go into .npy memmaps as they are produced (memory holds one trajectory), ``meta.json`` is written last
     and the folder renamed into the cache; the same settings (model hash, prompts hash, steps, clock, guidance,
     sampler, latent shape, seed) reuse it
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cache import META_NAME, cache_root, cached_entry
from ..progress import progress_bar
from ..contract.schedule import SamplingSchedule, schedule_fields

DATA_FORMAT = 1  # bump when the layout or the capture changes: old cache entries are then ignored
INPUTS = ("r_in", "r_out_prev", "temb", "pooled_text")  # the adaptor graph's inputs, in its argument order
TARGET = "r_out"
ARRAYS = (*INPUTS, TARGET)


def unit_noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Initial unit Gaussian noise of one trajectory (numpy PCG64, the same draw as ``cw-export run --seed``)."""
    from ..runtime.noise import seeded_noise

    return seeded_noise(shape, seed)


@dataclass(frozen=True)
class TeacherSettings:
    """Everything the teacher data depends on; its hash is the cache key."""

    model_sha256: str
    prompts_sha256: str
    num_prompts: int
    schedule: SamplingSchedule
    latent_shape: tuple[int, ...]  # [1, C, h, w] of one image
    seed: int  # prompt k starts from unit noise seeded seed + k
    format: int = DATA_FORMAT

    def key(self) -> str:
        return hashlib.sha256(json.dumps(schedule_fields(self), sort_keys=True).encode()).hexdigest()[:32]

    @property
    def adaptor_steps(self) -> list[int]:
        return self.schedule.adaptor_steps


TEACHER_BATCH = 16  # prompts unrolled together (CFG batch 2 x 16): about 2x faster than one by one on a CPU


def cfg_batch(texts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """K prompts' (hidden, pooled) for [uncond, cond] -> one guidance batch [uncond_1..uncond_K, cond_1..cond_K]."""
    hidden = torch.cat([h[:1] for h, _ in texts] + [h[1:] for h, _ in texts])
    pooled = torch.cat([p[:1] for _, p in texts] + [p[1:] for _, p in texts])
    return hidden, pooled


def teacher_features(model, split, hidden: torch.Tensor, pooled: torch.Tensor, noise: np.ndarray,
                     settings: TeacherSettings, device: torch.device | str = "cpu"):
    """(per-step features, trajectory) of the teacher's full (clock 1) trajectories from ``noise`` [K, C, h, w].

    ``hidden``/``pooled`` are K prompts' guidance batch (``cfg_batch``). Features: r_in, temb, r_out and pooled_text
    of every step, batch [uncond_1..uncond_K, cond_1..cond_K]; ``pairs_from_features`` picks one prompt's rows.
    """
    from ..reference import torch_split_trajectory

    per_step: list[dict[str, np.ndarray]] = []
    pooled_np = pooled.float().cpu().numpy()

    def record(i: int, kind: str, tensors: dict) -> None:
        per_step.append({**{name: tensors[name].float().cpu().numpy() for name in ("r_in", "temb", "r_out")},
                         "pooled_text": pooled_np})

    trajectory = torch_split_trajectory(model, hidden.to(device), pooled.to(device),
                                        torch.from_numpy(noise).to(device), settings.schedule.steps, clock=1,
                                        guidance_scale=settings.schedule.guidance_scale,
                                        sampler=settings.schedule.sampler,
                                        on_step=record, split=split)
    return per_step, trajectory


def pairs_from_features(per_step: list[dict[str, np.ndarray]], steps: list[int], prompt: int = 0,
                        prompts: int = 1) -> list[dict[str, np.ndarray]]:
    """Prompt ``prompt``'s pair per adaptor step i: inputs from step i and r_out of step i - 1, target r_out of
    step i; each array [2, ...] = that prompt's [uncond, cond] rows of a batch of ``prompts`` prompts."""
    rows = [prompt, prompts + prompt]
    pairs = []
    for i in steps:
        assert i >= 1, "step 0 is always full"
        now, before = per_step[i], per_step[i - 1]
        pairs.append({"r_in": now["r_in"][rows], "r_out_prev": before["r_out"][rows], "temb": now["temb"][rows],
                      "pooled_text": now["pooled_text"][rows], "r_out": now["r_out"][rows]})
    return pairs


class TeacherData:
    """The cached pairs of one ``TeacherSettings``: memmapped arrays [N, 2, ...] plus each pair's prompt and step."""

    def __init__(self, folder: Path, settings: TeacherSettings, reused: bool) -> None:
        self.folder = Path(folder)
        self.settings = settings
        self.reused = reused
        self.meta = json.loads((self.folder / META_NAME).read_text(encoding="utf-8"))
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        self.prompt_index = np.asarray(self.meta["prompt_index"], dtype=np.int64)
        self.step_index = np.asarray(self.meta["step_index"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.step_index)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-pair shapes (batch 2 included)."""
        return {name: tuple(array.shape[1:]) for name, array in self.arrays.items()}

    def batch(self, indices, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Pairs ``indices`` with the CFG halves flattened into the batch: [2 * len(indices), ...] per array."""
        order = np.asarray(indices, dtype=np.int64)
        out = {}
        for name, array in self.arrays.items():
            values = np.ascontiguousarray(array[order])
            out[name] = torch.from_numpy(values.reshape(-1, *values.shape[2:])).to(device)
        return out


def collect_teacher_data(model, prompts: list[str], settings: TeacherSettings, cache: Path | None = None,
                         device: torch.device | str = "cpu", progress: bool = False) -> TeacherData:
    """The teacher pairs of ``settings``: from the cache when present, else unrolled now (and cached)."""
    root = Path(cache or cache_root()) / "distill-data"
    folder, reused = cached_entry(
        root, settings.key(), lambda tmp: _unroll(model, prompts, settings, tmp, torch.device(device), progress))
    return TeacherData(folder, settings, reused=reused)


def _unroll(model, prompts: list[str], settings: TeacherSettings, out: Path, device: torch.device,
            progress: bool) -> dict:
    from ..reference import text_embeddings
    from ..split import split_unet

    steps = settings.adaptor_steps
    total = len(prompts) * len(steps)
    memmaps: dict[str, np.memmap] = {}
    prompt_index, step_index = [], []
    unet_device = next(model.unet.parameters()).device
    model.unet.to(device)
    try:
        split = split_unet(model.unet)
        chunks = [list(range(k, min(k + TEACHER_BATCH, len(prompts)))) for k in range(0, len(prompts), TEACHER_BATCH)]
        bar = progress_bar(total=len(prompts), enabled=progress, desc="teacher", unit="prompt")
        for chunk in chunks:
            noise = np.concatenate([unit_noise(tuple(settings.latent_shape), settings.seed + k) for k in chunk])
            hidden, pooled = cfg_batch([text_embeddings(model, prompts[k]) for k in chunk])
            per_step, _ = teacher_features(model, split, hidden, pooled, noise, settings, device)
            for j, k in enumerate(chunk):
                for pair, i in zip(pairs_from_features(per_step, steps, j, len(chunk)), steps):
                    if not memmaps:
                        memmaps = {name: np.lib.format.open_memmap(out / f"{name}.npy", mode="w+",
                                                                   dtype=np.float32, shape=(total, *pair[name].shape))
                                   for name in ARRAYS}
                    row = len(step_index)
                    for name in ARRAYS:
                        memmaps[name][row] = pair[name]
                    prompt_index.append(k)
                    step_index.append(i)
            bar.update(len(chunk))
        bar.close()
    finally:
        model.unet.to(unet_device)
    for array in memmaps.values():
        array.flush()
    del memmaps
    return {"settings": schedule_fields(settings), "count": len(step_index), "prompt_index": prompt_index,
            "step_index": step_index, "arrays": list(ARRAYS)}
