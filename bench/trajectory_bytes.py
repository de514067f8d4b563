"""Write a bundle's trajectories (every step's latents, final latents, guidance ratios) to an npz, or compare two such
files byte for byte: the check that a runtime change leaves `cw-export run`'s outputs unchanged (issue #19).

    PYTHONPATH=<old checkout> python bench/trajectory_bytes.py write BUNDLE old.npz
    PYTHONPATH=<new checkout> python bench/trajectory_bytes.py write BUNDLE new.npz [--threads 1]
    python bench/trajectory_bytes.py compare old.npz new.npz      # exit 1 and the differing arrays if any differ

``--quick``: one prompt, one seed, 8 steps at clock 1 and 2 (for SD 1.5-size bundles); otherwise 2 prompts (one with
a negative prompt) x 2 seeds x (steps, clock) in (8, 1), (8, 2), (7, 3), (4, 2).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def write(bundle: str, out: str, quick: bool, threads: int | None) -> None:
    from cw_export.runtime.pipeline import BundleRunner

    runner = BundleRunner(bundle, **({} if threads is None else {"threads": threads}))  # old runtimes lack threads
    prompts = [("a red triangle on the left of a blue square", "")] + ([] if quick else [("a small green circle", "blurry")])
    arrays = {}
    for p, (prompt, negative) in enumerate(prompts):
        hidden, pooled = runner.encode_prompt(prompt, negative)
        for seed in (0,) if quick else (0, 3):
            noise = np.random.default_rng(seed).standard_normal(runner.latent_shape()).astype(np.float32)
            for steps, clock in ((8, 1), (8, 2)) if quick else ((8, 1), (8, 2), (7, 3), (4, 2)):
                t = runner.generate(hidden, pooled, noise, steps=steps, clock=clock)
                key = f"p{p}_s{seed}_n{steps}_c{clock}"
                arrays[key + "_final"] = t.latents
                arrays[key + "_steps"] = np.stack(t.step_latents)
                arrays[key + "_ratios"] = np.array(t.guidance_ratios)
    np.savez(out, **arrays)
    print(f"wrote {out}: {len(arrays)} arrays")


def compare(a_path: str, b_path: str) -> int:
    a, b = np.load(a_path), np.load(b_path)
    if sorted(a.files) != sorted(b.files):
        print("different trajectories (keys differ)")
        return 1
    bad = [k for k in a.files if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
    print(f"{len(a.files)} arrays compared byte for byte; differing: {', '.join(bad) or 'none'}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("bundle")
    w.add_argument("out")
    w.add_argument("--quick", action="store_true")
    w.add_argument("--threads", type=int)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.bundle, args.out, args.quick, args.threads)
        return 0
    return compare(args.a, args.b)
if __name__ == "__main__":
    sys.exit(main())
