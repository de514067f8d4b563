"""A 4-step adaptor of its own vs the identity and the 8-step adaptor, on the built-in shapes model (issue #21 part 3).

PAPER.md "Training": unrolled distillation matters most at 4 steps, and the adaptor is tied to the step count. This
distils a 4-step adaptor exactly as the built-in's 8-step one was distilled (docs/builtin_model.md: the 270 train
captions, lr 3e-3, 30 epochs, batch 16, seed 0, guidance 4, DPM++ 2M, clock 2), the code path of

    cw-export distill --model shapes --prompts TRAIN.txt --steps 4 --lr 3e-3 --epochs 30 --out adaptor4.safetensors

(TRAIN.txt = ``shapes.eval_captions("train")``, one a line), then evaluates on the 30 held-out captions
(``cw_export.distill.evaluate.evaluate_adaptors``, noise seeds 1000 + k, final latents vs the unclocked teacher):
  at 4 steps: identity, the 4-step adaptor, and the shipped 8-step adaptor used off its schedule (which a build
             refuses; measured here to show why)
  at 8 steps: identity and the shipped 8-step adaptor, for reference

    nohup python bench/distill_steps.py --json bench/results/distill_steps.json > /tmp/distill_steps.log 2>&1 &

One torch thread (shared cores); timings are wall and CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--epochs", type=int, default=30, help="distillation epochs (default 30, the built-in's)")
    args = parser.parse_args()

    import torch

    from cw_export.adaptor import build_adaptor
    from cw_export.distill.checkpoint import read_checkpoint
    from cw_export.distill.evaluate import EvalSettings, evaluate_adaptors
    from cw_export.distill.train import DistillOptions, distill
    from cw_export.models import shapes
    from cw_export.models.pipeline import SHAPES_ADAPTOR, load_model

    torch.set_num_threads(1)
    model = load_model("shapes")
    shipped = read_checkpoint(SHAPES_ADAPTOR)
    guidance = shipped.training["guidance_scale"]
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "train.txt"
        prompts.write_text("\n".join(shapes.eval_captions("train")) + "\n", encoding="utf-8")
        options = DistillOptions(model="shapes", prompts=str(prompts), steps=4, clock=2, guidance_scale=guidance,
                                 epochs=args.epochs, lr=3e-3, out=Path(tmp) / "adaptor4.safetensors",
                                 cache=Path(tmp) / "cache", progress=False)
        result, train_time = _timed(lambda: distill(options, model=model))
        four = read_checkpoint(result.checkpoint)
        history = result.log["history"]
        print(json.dumps({"loss_last_epoch": history[-1]["loss"], "train_time": train_time}), flush=True)
        adaptors = {"identity": None, "learned_4_steps": build_adaptor(four.config, four.state_dict),
                    "learned_8_steps": build_adaptor(shipped.config, shipped.state_dict)}
        evaluations = {}
        for steps, names in ((4, ("identity", "learned_4_steps", "learned_8_steps")),
                             (8, ("identity", "learned_8_steps"))):
            settings = EvalSettings(prompts="shapes-heldout", num_prompts=0, steps=steps, clock=2,
                                    guidance_scale=guidance, sampler="dpmpp_2m", seed=1000)
            report, took = _timed(lambda: evaluate_adaptors(model, {n: adaptors[n] for n in names}, settings))
            report["eval_time"] = took
            evaluations[f"{steps}_steps"] = report
            print(steps, json.dumps(report["methods"]), flush=True)
    results = {"command": f"python bench/distill_steps.py --json {args.json}"
               + (f" --epochs {args.epochs}" if args.epochs != 30 else ""),
               "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
               "model": {"name": "shapes", "sha256": model.source["sha256"]},
               "distill_4_steps": {"training": four.training, "checkpoint_sha256": four.sha256,
                                   "teacher_pairs": result.log["teacher_data"]["pairs"],
                                   "loss_curve": [round(h["loss"], 6) for h in history], "train_time": train_time},
               "shipped_8_steps": {"checkpoint_sha256": shipped.sha256, "training": shipped.training},
               "evaluations": evaluations}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
