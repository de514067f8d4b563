"""Model-step distillation: train the learned adaptor on the teacher's unrolled trajectories (``cw-export distill``).

Steps:
  1. load the model and the prompts; check the settings
  2. teacher pairs for the bundle's sampler, steps, clock and guidance (``data.collect_teacher_data``; the main
     process unrolls them first, the others then read the same cache entry)
  3. the adaptor (``LearnedAdaptor``, zero-initialised output = identity at epoch 0, seeded) and Adam (lr 1e-4 by
     default, PAPER.md "Training"); on ``--resume`` both come back from the resume state
  4. every epoch: a seeded permutation of the pairs (seed, epoch), cut into global batches of ``batch_size`` pairs;
     the loss is the mean squared error on r_out over the global batch; only the adaptor trains
  5. after every epoch the main process writes the checkpoint, the resume state and the loss log

Data parallel: the same code runs under ``accelerate launch`` or ``torchrun`` (DDP; gloo on CPUs, NCCL on GPUs).
Rank r takes pairs r, r + W, ... of each global batch and scales its summed squared error so that DDP's gradient
average equals the single-process gradient of the same global batch; a rank left without a pair in a short last
batch runs one pair with weight 0. Results therefore equal a single-process run up to float summation order.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import CwExportError, InputError
from . import DEFAULT_EPOCHS
from . import checkpoint as ckpt
from ..contract.schedule import SamplingSchedule
from .data import TeacherData, TeacherSettings, collect_teacher_data



@dataclass(frozen=True)
class DistillOptions:
    """Settings of one distillation run; schedule values must be those of the bundles that will use the adaptor."""

    model: str = "builtin"
    prompts: str = "default"  # builtin prompt set name or a prompt file (prompts only, no images)
    num_prompts: int = 0  # first N prompts of the set; 0 = all
    steps: int = 8
    clock: int = 2
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"
    latent_hw: tuple[int, int] | None = None  # latent size of the teacher trajectories; None = the model's native
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 16  # pairs per global batch (each pair holds the CFG batch [uncond, cond])
    lr: float = 1e-4
    seed: int = 0  # adaptor init, batch order and teacher noise (prompt k: seed + k)
    out: Path = Path("adaptor.safetensors")
    resume: bool = False  # continue from OUT.resume.pt when it exists
    overwrite: bool = False  # replace an existing checkpoint (and its resume state) instead of refusing
    cache: Path | None = None  # teacher-data cache root; None = $CW_EXPORT_CACHE or ~/.cache/cw-export
    progress: bool = True

    @property
    def schedule(self) -> SamplingSchedule:
        return SamplingSchedule(self.sampler, self.steps, self.clock, float(self.guidance_scale))


@dataclass
class DistillResult:
    checkpoint: Path
    log: dict
    main_process: bool = True  # False on the other ranks of a data-parallel run (they write nothing)


def check_options(options: DistillOptions) -> None:
    """Reject impossible settings before any heavy work."""
    from ..runtime import schedulers
    from ..contract.schedule import check_steps_and_clock

    check_steps_and_clock(options.steps, options.clock)
    if not options.schedule.adaptor_steps:
        raise InputError(f"--clock {options.clock} with --steps {options.steps} never runs the adaptor: "
                         "nothing to distil (use --clock >= 2)")
    if options.sampler not in schedulers.SAMPLERS:
        raise InputError(f"sampler '{options.sampler}' unknown; available: {', '.join(schedulers.SAMPLERS)}")
    for name in ("epochs", "batch_size"):
        if getattr(options, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(options, name)}")
    if options.num_prompts < 0:
        raise InputError(f"--num-prompts must be >= 0, got {options.num_prompts}")
    if not (math.isfinite(options.lr) and options.lr > 0):
        raise InputError(f"--lr must be a finite number > 0, got {options.lr}")
    if not math.isfinite(options.guidance_scale) or options.guidance_scale < 0:
        raise InputError(f"--guidance must be a finite number >= 0, got {options.guidance_scale}")
    out = Path(options.out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out must be a .safetensors file, got {out}")
    if not out.parent.is_dir():
        raise InputError(f"parent folder of the output does not exist: {out.parent}")
    if out.exists() and not (options.resume or options.overwrite):
        raise InputError(f"{out} exists; pass --resume to continue training it or --overwrite to start over")


def training_settings(options: DistillOptions, model_sha256: str, teacher: TeacherSettings) -> dict:
    """What the checkpoint records; a resumed run must match it (except ``epochs``, which it may extend)."""
    return {"model": options.model, "model_sha256": model_sha256, "sampler": options.sampler, "steps": options.steps,
            "clock": options.clock, "guidance_scale": options.guidance_scale,
            "prompts_sha256": teacher.prompts_sha256, "num_prompts": teacher.num_prompts,
            "latent_shape": list(teacher.latent_shape), "epochs": options.epochs, "batch_size": options.batch_size,
            "lr": options.lr, "seed": options.seed, "optimizer": "adam", "loss": "mse(r_out)",
            "adaptor_steps": teacher.adaptor_steps}


def epoch_order(num_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """The pairs' order in one epoch: a function of (seed, epoch) only, so resumed runs see the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_pairs, generator=generator).numpy()


def load_for_distill(options: DistillOptions, model=None):
    """(model, prompts, teacher settings) of ``options``."""
    from ..models.pipeline import load_model
    from ..prompts import load_prompt_set, prompt_set_hash

    prompts = load_prompt_set(options.prompts)
    if options.num_prompts:
        prompts = prompts[: options.num_prompts]
    model = model if model is not None else load_model(options.model)
    hw = options.latent_hw or (model.default_latent_size, model.default_latent_size)
    teacher = TeacherSettings(
        model_sha256=model.source["sha256"], prompts_sha256=prompt_set_hash(prompts), num_prompts=len(prompts),
        schedule=options.schedule, latent_shape=(1, model.unet.config.in_channels, *hw), seed=options.seed)
    return model, prompts, teacher


def distill(options: DistillOptions, model=None) -> DistillResult:
    """Train the adaptor; returns the checkpoint path and the loss log. ``model``: an already loaded SDModel."""
    from ..adaptor import LearnedAdaptor, default_adaptor_config
    from ..progress import progress_bar

    # 1. settings, model, prompts
    check_options(options)
    accelerator = _accelerator()
    main = accelerator.is_main_process
    world, device = accelerator.num_processes, accelerator.device
    model, prompts, teacher = load_for_distill(options, model)

    # 2. teacher pairs (main process first, the others reuse its cache entry)
    with accelerator.main_process_first():
        data = collect_teacher_data(model, prompts, teacher, cache=options.cache, device=device,
                                    progress=options.progress and main)

    # 3. adaptor + optimizer (or both from the resume state)
    config = default_adaptor_config(model.unet, model.pooled_dim)
    training = training_settings(options, model.source["sha256"], teacher)
    torch.manual_seed(options.seed)
    adaptor = LearnedAdaptor(config).to(device).train()
    optimizer = torch.optim.Adam(adaptor.parameters(), lr=options.lr)
    out = Path(options.out)
    start_epoch, history = 0, []
    resume_file = ckpt.resume_path(out)
    if options.resume and resume_file.is_file():
        state = ckpt.load_resume_state(resume_file)
        _check_resumable(state, training, resume_file)
        adaptor.load_state_dict(state["adaptor"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
    adaptor, optimizer = accelerator.prepare(adaptor, optimizer)

    # 4. epochs
    per_pair = int(np.prod(data.shapes()["r_out"]))  # elements of one pair's target (CFG batch of 2 included)
    batches = math.ceil(len(data) / options.batch_size)
    bar = progress_bar(total=(options.epochs - start_epoch) * batches, enabled=options.progress and main,
                       desc="distill", unit="batch")
    try:
        for epoch in range(start_epoch, options.epochs):
            started = time.perf_counter()
            local = _train_epoch(adaptor, optimizer, accelerator, data, epoch, options, per_pair, bar)
            pairs_per_rank = accelerator.gather(local[2:3].clone())  # what each rank trained on (weight > 0)
            totals = accelerator.reduce(local.clone(), "sum")  # [squared error, elements, pairs] over all ranks
            history.append({"epoch": epoch + 1, "loss": float(totals[0] / totals[1]), "pairs": int(totals[2]),
                            "pairs_per_rank": [int(p) for p in pairs_per_rank.tolist()],
                            "seconds": round(time.perf_counter() - started, 3)})
            # 5. checkpoint, resume state, log
            if main:
                _save(accelerator.unwrap_model(adaptor), optimizer, config, training, epoch + 1, history, out,
                      data, world)
            accelerator.wait_for_everyone()
    finally:
        bar.close()
    log = _log(training, history, data, world, epochs_done=history[-1]["epoch"] if history else 0)
    accelerator.end_training()
    return DistillResult(out, log, main)


def _accelerator():
    try:
        from accelerate import Accelerator
    except ImportError:
        raise CwExportError("distillation needs accelerate (an install requirement of cw-export): "
                            "pip install 'accelerate>=1.15,<2'") from None
    return Accelerator()


def _train_epoch(adaptor, optimizer, accelerator, data: TeacherData, epoch: int, options: DistillOptions,
                 per_pair: int, bar) -> torch.Tensor:
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    order = epoch_order(len(data), options.seed, epoch)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for start in range(0, len(order), options.batch_size):
        batch = order[start:start + options.batch_size]
        local, weight = batch[rank::world], 1.0
        if len(local) == 0:  # short last batch: keep DDP's collective in step with a zero-weight pair
            local, weight = batch[:1], 0.0
        x = data.batch(local, device)
        prediction = adaptor(x["r_in"], x["r_out_prev"], x["temb"], x["pooled_text"])
        squared_error = (prediction - x["r_out"]).pow(2).sum()
        # DDP averages gradients over ranks: scale by W / (global pairs x elements) -> the global batch's MSE
        loss = squared_error * (weight * world / (len(batch) * per_pair))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals += torch.stack([squared_error.detach().double() * weight,
                               torch.tensor(weight * len(local) * per_pair, dtype=torch.float64, device=device),
                               torch.tensor(weight * len(local), dtype=torch.float64, device=device)])
        bar.update()
        bar.set_postfix_str(f"epoch {epoch + 1} loss {float(totals[0] / max(float(totals[1]), 1.0)):.4g}")
    return totals


def _check_resumable(state: dict, training: dict, path: Path) -> None:
    before = {k: v for k, v in state["training"].items() if k != "epochs"}
    now = {k: v for k, v in training.items() if k != "epochs"}
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        k = changed[0]
        raise InputError(f"cannot resume {path}: it was trained with {k} {before.get(k)!r}, this run has "
                         f"{k} {now.get(k)!r} ({len(changed)} setting(s) differ; use --overwrite to start over)")


def _log(training: dict, history: list, data: TeacherData, world: int, epochs_done: int) -> dict:
    return {"training": training, "world_size": world, "epochs_done": epochs_done, "history": history,
            "teacher_data": {"cache_key": data.settings.key(), "pairs": len(data), "reused_cache": data.reused,
                             "pair_shapes": {k: list(v) for k, v in data.shapes().items()}}}


def _save(adaptor, optimizer, config, training: dict, epochs_done: int, history: list, out: Path,
          data: TeacherData, world: int) -> None:
    state_dict = adaptor.state_dict()
    ckpt.save_checkpoint(out, state_dict, config, training, epochs_done)
    ckpt.save_resume_state(ckpt.resume_path(out), {
        "adaptor": {k: v.detach().cpu() for k, v in state_dict.items()}, "optimizer": optimizer.state_dict(),
        "epoch": epochs_done, "rng": torch.get_rng_state(), "history": history, "training": training})
    ckpt.write_json(ckpt.log_path(out), _log(training, history, data, world, epochs_done))


# -- build-time distillation -----------------------------------------------------------------------------------------
BUILD_DEFAULTS = DistillOptions()  # prompts, epochs, batch, lr and seed a build uses when it has to distil


def distill_for_build(model, recipe, latent_hw: tuple[int, int], progress: bool = True,
                      cache: Path | None = None) -> ckpt.AdaptorCheckpoint:
    """The learned adaptor for a build that got ``--adaptor learned`` without a checkpoint.

    Distils with the recipe's sampler, steps, clock and guidance and ``BUILD_DEFAULTS`` for the rest, into the cache
    (``adaptors/<settings hash>.safetensors``); a finished entry is reused, an interrupted one resumed.
    """
    import hashlib
    import json

    from ..cache import cache_root

    b = recipe.build
    options = replace(BUILD_DEFAULTS, model=model.source.get("name") or model.source.get("path", ""),
                      steps=b.steps, clock=b.clock, guidance_scale=b.guidance_scale, sampler=b.sampler,
                      latent_hw=tuple(latent_hw), cache=cache, progress=progress, resume=True)
    key_data = {**asdict(options), "model_sha256": model.source["sha256"]}
    for name in ("out", "cache", "progress", "resume", "overwrite", "model"):
        key_data.pop(name)
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:32]
    folder = Path(cache or cache_root()) / "adaptors"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{key}.safetensors"
    if out.is_file():
        existing = ckpt.read_checkpoint(out)
        if existing.epochs_done >= options.epochs:
            return existing
    distill(replace(options, out=out), model=model)
    return ckpt.read_checkpoint(out)
