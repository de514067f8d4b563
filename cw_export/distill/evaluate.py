"""Held-out evaluation of adaptors: full (clock 1), identity and learned, against the unclocked teacher.

On held-out prompts (``load_prompt_set("heldout")``; prompt k starts from unit noise seeded ``seed + k``), with the
bundle's sampler, steps and guidance:
  1. the teacher: the full trajectory (clock 1) through the split; its r_out at every step and its final latents
  2. r_out error at the adaptor steps, teacher-forced: each adaptor gets the teacher's r_in(t), r_out(t+1), temb and
     pooled text (exactly the training pairs, on unseen prompts) and is compared with the teacher's r_out(t)
  3. the clocked trajectory of each adaptor (``reference.torch_split_trajectory``); at every adaptor step its r_out is
     also compared with what low_res computes from that same trajectory's r_in (rollout error)
  4. final-latent PSNR vs the teacher: 10 log10(max|teacher latents|^2 / MSE), MSE pooled over prompts (the
     convention of the quantized parity report); 999 means identical
Mean squared errors are pooled over prompts, adaptor steps and the CFG batch. ``full`` is the teacher itself
(error 0, PSNR 999), listed for the cost column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..contract.schedule import SamplingSchedule
from .data import TeacherSettings, pairs_from_features, teacher_features, unit_noise

IDENTICAL_DB = 999.0


@dataclass(frozen=True)
class EvalSettings:
    prompts: str = "heldout"
    num_prompts: int = 8  # first N prompts of the set; 0 = all
    steps: int = 8
    clock: int = 2
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"
    seed: int = 1000  # held-out noise seeds differ from the training seeds

    @property
    def schedule(self) -> SamplingSchedule:
        return SamplingSchedule(self.sampler, self.steps, self.clock, float(self.guidance_scale))


class _Mse:
    def __init__(self) -> None:
        self.sum = 0.0
        self.count = 0

    def add(self, actual: torch.Tensor, expected: torch.Tensor) -> None:
        diff = actual.double() - expected.double()
        self.sum += float((diff * diff).sum())
        self.count += diff.numel()

    @property
    def value(self) -> float:
        return self.sum / self.count if self.count else 0.0


def _psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    from ..runtime.image import psnr

    peak = float(np.max(np.abs(reference)))
    return round(psnr(reference, actual, peak=peak), 3)


def evaluate_adaptors(model, adaptors: dict[str, torch.nn.Module | None], settings: EvalSettings = EvalSettings(),
                      progress: bool = False) -> dict:
    """The JSON report. ``adaptors``: name -> LearnedAdaptor, or None for the identity adaptor."""
    from ..prompts import load_prompt_set, prompt_set_hash
    from ..progress import progress_bar
    from ..reference import text_embeddings, torch_split_trajectory
    from ..split import split_unet

    prompts = load_prompt_set(settings.prompts)
    if settings.num_prompts:
        prompts = prompts[: settings.num_prompts]
    steps = settings.schedule.adaptor_steps
    latent_shape = (1, model.unet.config.in_channels, model.default_latent_size, model.default_latent_size)
    teacher = TeacherSettings(model.source["sha256"], prompt_set_hash(prompts), len(prompts), settings.schedule,
                              latent_shape, settings.seed)
    split = split_unet(model.unet)
    forced = {name: _Mse() for name in adaptors}
    rollout = {name: _Mse() for name in adaptors}
    final = {name: [] for name in ("teacher", *adaptors)}
    for k, prompt in enumerate(progress_bar(prompts, enabled=progress, desc="evaluate", unit="prompt")):
        noise = unit_noise(latent_shape, settings.seed + k)
        # 1. teacher (clock 1) features and final latents
        hidden, pooled = text_embeddings(model, prompt)
        per_step, teacher_run = teacher_features(model, split, hidden, pooled, noise, teacher)
        final["teacher"].append(teacher_run.latents)
        pairs = pairs_from_features(per_step, steps)
        for name, adaptor in adaptors.items():
            # 2. teacher-forced r_out error at the adaptor steps
            with torch.no_grad():
                for pair in pairs:
                    x = {key: torch.from_numpy(value) for key, value in pair.items()}
                    predicted = x["r_out_prev"] if adaptor is None else adaptor(
                        x["r_in"], x["r_out_prev"], x["temb"], x["pooled_text"])
                    forced[name].add(predicted, x["r_out"])

            # 3. the adaptor's own clocked trajectory, and its rollout error against low_res on it
            def on_step(i: int, kind: str, tensors: dict, name: str = name) -> None:
                if i in steps:
                    rollout[name].add(tensors["r_out"], split.low_res(tensors["r_in"], tensors["temb"], hidden))

            run = torch_split_trajectory(model, hidden, pooled, torch.from_numpy(noise), settings.steps,
                                         clock=settings.clock, guidance_scale=settings.guidance_scale,
                                         sampler=settings.sampler, adaptor=adaptor, on_step=on_step, split=split)
            final[name].append(run.latents)
    # 4. final-latent PSNR vs the teacher
    reference = np.concatenate(final["teacher"])
    methods = {"full": {"clock": 1, "r_out_mse_teacher_forced": 0.0, "r_out_mse_rollout": 0.0,
                        "final_latent_psnr_db": IDENTICAL_DB}}
    for name in adaptors:
        methods[name] = {"clock": settings.clock, "r_out_mse_teacher_forced": forced[name].value,
                         "r_out_mse_rollout": rollout[name].value,
                         "final_latent_psnr_db": _psnr(reference, np.concatenate(final[name]))}
    return {"settings": {**settings.__dict__, "model_sha256": model.source["sha256"],
                         "prompts_sha256": teacher.prompts_sha256, "num_prompts": len(prompts)},
            "adaptor_steps": steps,
            "convention": {"r_out_mse": "mean over prompts x adaptor steps x CFG batch x elements",
                           "final_latent_psnr_db": "10 log10(max|teacher|^2 / MSE) vs the clock-1 teacher, MSE "
                                                   "pooled over prompts; 999 = identical"},
            "methods": methods}


def evaluate_checkpoint(model, checkpoint_path, num_prompts: int = 8, seed: int = 1000, progress: bool = False) -> dict:
    """Full vs identity vs the learned adaptor of a checkpoint, at the checkpoint's sampler, steps, clock, guidance."""
    from ..adaptor import build_adaptor, default_adaptor_config
    from .checkpoint import check_model, read_checkpoint

    checkpoint = read_checkpoint(checkpoint_path)
    config = default_adaptor_config(model.unet, model.pooled_dim)
    check_model(checkpoint, model.source["sha256"], config)
    t = checkpoint.training
    settings = EvalSettings(num_prompts=num_prompts, steps=t["steps"], clock=t["clock"],
                            guidance_scale=t["guidance_scale"], sampler=t["sampler"], seed=seed)
    learned = build_adaptor(checkpoint.config, checkpoint.state_dict)
    report = evaluate_adaptors(model, {"identity": None, "learned": learned}, settings, progress)
    report["checkpoint"] = {"path": str(checkpoint.path), "sha256": checkpoint.sha256,
                            "epochs_done": checkpoint.epochs_done}
    identity, learned_m = report["methods"]["identity"], report["methods"]["learned"]
    report["summary"] = {
        "r_out_mse_reduction_teacher_forced": _ratio(identity["r_out_mse_teacher_forced"],
                                                     learned_m["r_out_mse_teacher_forced"]),
        "r_out_mse_reduction_rollout": _ratio(identity["r_out_mse_rollout"], learned_m["r_out_mse_rollout"]),
        "final_latent_psnr_gain_db": round(learned_m["final_latent_psnr_db"] - identity["final_latent_psnr_db"], 3),
    }
    return report


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None
