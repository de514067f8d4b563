"""Train the evaluator's shape classifier (cw_export/evaluate/classifier.py) on fresh generator samples and write
``cw_export/evaluate/classifier.safetensors``. CPU, one thread by default; a few minutes.

  python tools/train_classifier.py [--steps 1500] [--out PATH]

Every step draws a new batch from cw_export.models.shapes (split "all": the classifier must know the held-out
triples too), perturbed by ``classifier.augment``. Prints the accuracy per attribute on 2,000 unseen samples at the end.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cw_export.evaluate.classifier import WEIGHTS, ShapeClassifier, augment
from cw_export.models import shapes

SEED = 4321
EVAL_SEED = 99_999


@torch.no_grad()
def accuracy(model: ShapeClassifier, seed: int = EVAL_SEED, n: int = 2000) -> dict[str, float]:
    model.eval()
    batch = shapes.make_batch(seed, n, split="all")
    _, logits = model(torch.from_numpy(batch.images))
    acc = {name: float((logits[name].argmax(1).numpy() == batch.labels[name]).mean()) for name in logits}
    every = np.stack([logits[name].argmax(1).numpy() == batch.labels[name] for name in logits])
    acc["all"] = float(every.all(axis=0).mean())
    return acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(SEED)
    start = time.time()
    for step in range(args.steps):
        model.train()
        batch = shapes.make_batch(SEED * 1_000_003 + step, args.batch, split="all")
        x = augment(torch.from_numpy(batch.images), gen)
        _, logits = model(x)
        loss = sum(F.cross_entropy(logits[name], torch.from_numpy(batch.labels[name])) for name in logits)
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    acc = accuracy(model)
    print("held-out generator samples, accuracy:", {k: round(v, 4) for k, v in acc.items()}, flush=True)
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(args.out)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
