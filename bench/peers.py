"""Our bundle against what a user would run instead, in one process, interleaved (issue #19, part 1).

Not a test: it takes many minutes and its numbers depend on the machine and its load. Settings, all on the same
model (``--model``, default the SD 1.5 architecture with the seeded random weights the bundle was built from), the
same prompt embeddings, the same initial noise, the same DPM++ 2M scheduler, guidance (batch 2) and thread count:
  a. ``torch-sd``: the denoising loop of diffusers' StableDiffusionPipeline (``torch_sd_loop``), clock 1;
  b. ``torch-clockwork``: that loop with the official Clockwork wrapper's identity adaptor (``torch_clockwork_loop``):
     full steps run the whole UNet and cache up_blocks[-2]'s output (after its upsampler); clocked steps run only
     time embedding + conv_in + down_blocks[0] + up_blocks[-1] + conv_out on the cached features (PAPER.md "Split");
  c. ``bundle-fp32``: our FP32 bundle through ``cw_export.runtime`` at clock 1 and clock 2;
  d. ``bundle-int8``: our INT8 bundle on the CPU execution provider, clock 2 (optional, ``--int8-bundle``).
Steps:
  1. build the torch model, encode the prompt with its text encoder (not timed), drop its text encoder and VAE;
  2. warm up: ``--warmup`` images per setting;
  3. ``--runs`` rounds, each timing one image per setting in the same order (A B C D A B C D ...), so that drifting
     machine load hits every setting alike; every step is timed too;
  4. medians per image and per step kind; the ratios bundle clock 2 / torch-clockwork and bundle clock 2 / torch-sd;
     each setting's wall saving against its clock-1 counterpart and the FLOP saving (``cw-export inspect``) it realises.
Image time = the denoising loop (UNet + guidance + sampler); text encoder and VAE decoder are not included.

    python bench/peers.py --fp32-bundle /tmp/sd15_256 --runs 3 --warmup 1 --threads 2 \\
        --json bench/results/peers_sd15_256.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by file path (tests/bench)

from step_timing import add_step_times, step_medians, time_steps  # noqa: E402

PROMPT = "a red triangle on the left of a blue square"
FULL, CLOCKED = "full", "clocked"


def step_kinds(steps: int, clock: int) -> list[str]:
    """The project's clock schedule (``cw_export.contract.schedule``): step i is full when i % clock == 0."""
    from cw_export.contract.schedule import step_kinds as kinds

    return kinds(steps, clock)


def make_scheduler(scheduler_config: dict):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config({k: v for k, v in scheduler_config.items() if not k.startswith("_")})


class ClockworkUNet:
    """The official Clockwork wrapper's identity adaptor, written out (Habibian et al. 2024; PAPER.md "Split").

    Full step: the whole UNet; up_blocks[-2]'s output (after its upsampler, at the high resolution) is cached by a
    forward hook. Clocked step: only the high-resolution path runs (1. time, 2. conv_in, 3. down level 0 whole, as the
    wrapper runs it, then 5. up level -1 on the cached features and 6. post-process); down_blocks[1:], mid_block and
    up_blocks[:-1] are skipped. Only plain text-conditioned UNets (SD 1.5 / 2.x: no class, addition or GLIGEN
    embeddings, no controlnet residuals) are supported.
    """

    def __init__(self, unet) -> None:
        config = unet.config
        if config.class_embed_type or config.addition_embed_type or config.center_input_sample:
            raise ValueError("ClockworkUNet supports plain text-conditioned UNets only")
        self.unet = unet
        self.cached = None
        self._hook = unet.up_blocks[-2].register_forward_hook(self._cache)

    def _cache(self, module, inputs, output) -> None:
        self.cached = output

    def close(self) -> None:
        self._hook.remove()

    def full(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample

    def clocked(self, sample, timestep, encoder_hidden_states):
        if self.cached is None:
            raise RuntimeError("a clocked step needs a full step before it (the first step is always full)")
        unet = self.unet
        # 1. time
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        # 2. pre-process
        hidden = unet.conv_in(sample)
        skips = (hidden,)
        # 3. down, level 0 only (with its downsampler, whose output only the skipped up_blocks[-2] reads)
        block = unet.down_blocks[0]
        if getattr(block, "has_cross_attention", False):
            hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, res = block(hidden_states=hidden, temb=emb)
        skips += res
        # 4. mid and 5. up levels 0..-2 skipped: the cached up_blocks[-2] output stands in for them (identity adaptor)
        block = unet.up_blocks[-1]
        res = skips[:len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            hidden = block(hidden_states=self.cached, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = block(hidden_states=self.cached, temb=emb, res_hidden_states_tuple=res)
        # 6. post-process
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


def torch_loop(unet, scheduler_config: dict, encoder_hidden_states, init_latents, steps: int, clock: int,
               guidance_scale: float, on_step=None):
    """StableDiffusionPipeline's denoising loop (diffusers 0.42: cat, scale_model_input, UNet, guidance, step) with
    the official Clockwork wrapper's schedule; clock 1 is the plain pipeline loop. Returns the final latents."""
    import torch

    scheduler = make_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    kinds = step_kinds(steps, clock)
    wrapper = ClockworkUNet(unet) if clock > 1 else None
    latents = init_latents * scheduler.init_noise_sigma
    try:
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                if wrapper is None:
                    noise = unet(model_input, t, encoder_hidden_states=encoder_hidden_states).sample
                elif kinds[i] == FULL:
                    noise = wrapper.full(model_input, t, encoder_hidden_states)
                else:
                    noise = wrapper.clocked(model_input, t, encoder_hidden_states)
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
                latents = scheduler.step(noise, t, latents).prev_sample
                if on_step is not None:
                    on_step(i, kinds[i])
    finally:
        if wrapper is not None:
            wrapper.close()
    return latents


class Setting:
    """One benchmarked setting: ``image()`` runs one denoising loop and returns (seconds, [(kind, seconds)])."""

    def __init__(self, name: str, clock: int, run) -> None:
        self.name, self.clock, self._run = name, clock, run
        self.images: list[float] = []
        self.steps: dict[str, list[float]] = {}

    def image(self) -> tuple[float, list[tuple[str, float]]]:
        return time_steps(self._run)


def make_settings(args, model, hidden, pooled, noise) -> list[Setting]:
    import torch

    from cw_export.runtime.pipeline import BundleRunner

    unet, config = model.unet, model.scheduler_config
    hidden_t, noise_t = torch.from_numpy(hidden), torch.from_numpy(noise)

    def torch_setting(name, clock):
        return Setting(name, clock, lambda hook: torch_loop(unet, config, hidden_t, noise_t, args.steps, clock,
                                                            args.guidance, on_step=hook))

    settings = [torch_setting("a torch-sd", 1), torch_setting("b torch-clockwork", 2)]
    bundles = [("c bundle-fp32", args.fp32_bundle)] + ([("d bundle-int8", args.int8_bundle)] if args.int8_bundle else [])
    for name, path in bundles:
        for arena in args.arenas:  # the runtime's default first: it keeps the plain name the ratios use
            runner = BundleRunner(path, threads=args.threads, arena=arena)
            label = name if arena == args.arenas[0] else f"{name} arena-{arena}"
            for clock in (1, 2):
                settings.append(Setting(label, clock, lambda hook, r=runner, c=clock: r.generate(
                    hidden, pooled, noise, steps=args.steps, clock=c, guidance_scale=args.guidance, on_step=hook)))
    return settings


def summarise(settings: list[Setting], flop_saving: dict[str, float]) -> list[dict]:
    rows = []
    clock1 = {s.name: statistics.median(s.images) for s in settings if s.clock == 1}
    for s in settings:
        median = statistics.median(s.images)
        base = clock1.get(s.name) or clock1.get("a torch-sd")
        saving = 100.0 * (1 - median / base) if s.clock > 1 else 0.0
        flops = flop_saving.get(s.name) if s.clock > 1 else None
        rows.append({"setting": s.name, "clock": s.clock, "image_s_median": round(median, 3),
                     "image_s_all": [round(t, 3) for t in s.images],
                     "step_s_median": step_medians(s.steps, 3),
                     "wall_saving_pct": round(saving, 1), "flop_saving_pct": flops,
                     "realised_pct": round(100 * saving / flops, 1) if flops else None})
    return rows


def markdown(results: dict) -> str:
    lines = ["| setting | clock | image s (median) | runs | full step s | clocked step s | wall saving vs its clock 1 "
             "| FLOP saving | realised |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        steps = r["step_s_median"]
        lines.append(f"| {r['setting']} | {r['clock']} | {r['image_s_median']:.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in r['image_s_all'])} | {steps.get(FULL, float('nan')):.2f} | "
                     + (f"{steps[CLOCKED]:.2f}" if CLOCKED in steps else "-") + " | "
                     + (f"{r['wall_saving_pct']:.1f}%" if r["clock"] > 1 else "-") + " | "
                     + (f"{r['flop_saving_pct']:.1f}%" if r["flop_saving_pct"] else "-") + " | "
                     + (f"{r['realised_pct']:.1f}%" if r["realised_pct"] else "-") + " |")
    ratios = results["ratios"]
    lines += ["", "Ratios of median image times: " + "; ".join(f"{k} = {v:.3f}" for k, v in ratios.items()),
              f"Load average (1, 5, 15 min) before {results['load_avg_before']}, after {results['load_avg_after']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32-bundle", type=Path, required=True, help="FP32 bundle of --model (cw-export --target cpu-fp32)")
    parser.add_argument("--int8-bundle", type=Path, help="INT8 bundle of --model (optional)")
    parser.add_argument("--model", default="sd15-arch", help="the model the bundles were built from (cw-export --model)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and onnxruntime intra-op threads")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--arenas", nargs="+", choices=["shared", "off"], default=["shared"],
                        help="CPU memory arena settings of the bundle runners (cw_export.runtime.sessions), each its "
                        "own setting; the first keeps the plain name")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    from cw_export.bundle.flops import inspect_bundle
    from cw_export.models.pipeline import load_model
    from cw_export.reference import text_embeddings
    from cw_export.runtime.pipeline import BundleRunner

    torch.set_num_threads(args.threads)
    manifest = BundleRunner(args.fp32_bundle).manifest
    model = load_model(args.model)
    hidden, pooled = (x.numpy() for x in text_embeddings(model, PROMPT))
    model.text_encoder = model.vae = None  # not timed; frees their memory
    noise = np.random.default_rng(0).standard_normal(manifest["latent"]["shape"]).astype(np.float32)
    settings = make_settings(args, model, hidden, pooled, noise)
    # the torch wrapper skips what the bundle's identity-adaptor clocked step skips, bar UP-2's upsampler conv
    # (cached after it, PAPER.md): the bundle's FLOP saving is the reference for both
    fp32_flops = inspect_bundle(args.fp32_bundle, args.steps, 2)["schedule"]["saving_pct"]
    flop_saving = {"b torch-clockwork": fp32_flops}
    int8_flops = inspect_bundle(args.int8_bundle, args.steps, 2)["schedule"]["saving_pct"] if args.int8_bundle else None
    for s in settings:
        if s.name.startswith("c bundle-fp32"):
            flop_saving[s.name] = fp32_flops
        elif s.name.startswith("d bundle-int8"):
            flop_saving[s.name] = int8_flops
    load_before = os.getloadavg()
    for _ in range(args.warmup):
        for s in settings:
            print(f"warm-up {s.name} clock {s.clock}: {s.image()[0]:.2f} s", flush=True)
    for run in range(args.runs):
        for s in settings:
            total, per_step = s.image()
            s.images.append(total)
            add_step_times(s.steps, per_step)
            print(f"run {run + 1} {s.name} clock {s.clock}: {total:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    load_after = os.getloadavg()
    rows = summarise(settings, flop_saving)
    by = {(r["setting"], r["clock"]): r["image_s_median"] for r in rows}
    ratios = {"bundle-fp32 clock 2 / torch-clockwork clock 2": by[("c bundle-fp32", 2)] / by[("b torch-clockwork", 2)],
              "bundle-fp32 clock 2 / torch-sd clock 1": by[("c bundle-fp32", 2)] / by[("a torch-sd", 1)],
              "bundle-fp32 clock 1 / torch-sd clock 1": by[("c bundle-fp32", 1)] / by[("a torch-sd", 1)]}
    results = {"command": "python bench/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "onnxruntime": onnxruntime.__version__},
               "image_size": manifest["latent"]["image_size"], "steps": args.steps, "threads": args.threads,
               "runs": args.runs, "warmup": args.warmup, "rows": rows, "ratios": {k: round(v, 4) for k, v in ratios.items()},
               "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
