"""Model-step distillation on the built-in tiny model: full budget vs the test budget, on held-out prompts (issue #5).

For each budget: distil (``cw_export.distill.train.distill``, the code path of ``cw-export distill``), then evaluate
full (clock 1), identity and learned adaptors on held-out prompts (``cw_export.distill.evaluate``); also the adaptor's
cost next to SD 1.5's and the tiny UNet's (``cw_export.distill.cost``). Writes one JSON; docs/distillation.md quotes it.

    nohup python bench/distill.py --json bench/results/distill.json > /tmp/distill_bench.log 2>&1 &

Budgets (all: the cpu-fp32 recipe's schedule, 8 DPM++ steps, clock 2, guidance 7.5; every prompt of the default set;
batch 16; seed 0):
  full  the CLI defaults: ``cw-export distill --model tiny-random`` (DEFAULT_EPOCHS epochs, Adam lr 1e-4)
  test  tests/distill/conftest.py: 4 epochs at lr 3e-3
One torch thread (shared cores); timings are wall and CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def run_budget(model, name: str, options, eval_prompts: int) -> dict:
    from cw_export.distill.evaluate import evaluate_checkpoint
    from cw_export.distill.train import distill

    wall, cpu = time.perf_counter(), time.process_time()
    result = distill(options, model=model)
    train = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    wall, cpu = time.perf_counter(), time.process_time()
    report = evaluate_checkpoint(model, result.checkpoint, num_prompts=eval_prompts)
    evaluation = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    history = result.log["history"]
    return {"budget": name, "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()
                                        if k not in ("out", "cache", "progress", "resume", "overwrite")},
            "teacher_pairs": result.log["teacher_data"]["pairs"],
            "loss_first_epoch": history[0]["loss"], "loss_last_epoch": history[-1]["loss"],
            "loss_curve": [round(h["loss"], 6) for h in history], "train_time": train, "eval_time": evaluation,
            "evaluation": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts evaluated (default 32)")
    parser.add_argument("--budgets", default="test,full", help="comma-separated: test, full")
    args = parser.parse_args()

    import torch

    from cw_export.distill.cost import adaptor_cost
    from cw_export.distill.train import DistillOptions
    from cw_export.models.pipeline import load_model

    torch.set_num_threads(1)
    model = load_model("tiny-random")
    with tempfile.TemporaryDirectory() as tmp:
        base = DistillOptions(model="tiny-random", cache=Path(tmp) / "cache", progress=False, overwrite=True)
        budgets = {"full": base, "test": replace(base, epochs=4, lr=3e-3)}
        runs = []
        for name in args.budgets.split(","):
            options = replace(budgets[name], out=Path(tmp) / f"{name}.safetensors")
            runs.append(run_budget(model, name, options, args.eval_prompts))
            print(json.dumps({k: runs[-1][k] for k in ("budget", "loss_last_epoch", "train_time")}), flush=True)
            print(json.dumps(runs[-1]["evaluation"]["methods"]), json.dumps(runs[-1]["evaluation"]["summary"]),
                  flush=True)
    results = {"command": "python bench/distill.py --json " + str(args.json)
               + (f" --eval-prompts {args.eval_prompts}" if args.eval_prompts != 32 else "")
               + (f" --budgets {args.budgets}" if args.budgets != "test,full" else ""),
               "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
               "model": {"name": "tiny-random", "sha256": model.source["sha256"]},
               "runs": runs, "cost": {"sd15": adaptor_cost("sd15"), "tiny-random": adaptor_cost("tiny-random")}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
