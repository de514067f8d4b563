"""``cw-export validate``: integrity (sha256, ONNX checker, I/O, wiring) and, when the source is reachable, parity.

Every check is run and reported in one table before the verdict, so a user sees all problems at once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError, CwExportError
from .runtime.manifest import read_manifest, verify_bundle


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _onnx_io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> dict:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": [d.dim_value for d in tensor.shape.dim], "dtype": dtype}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def integrity_checks(bundle: Path, manifest: dict) -> list[Check]:
    import onnx

    problems = verify_bundle(bundle, manifest)
    checks = [Check("files sha256", not problems, "; ".join(problems) if problems else f"{len(manifest['files'])} files")]
    if problems:
        return checks
    for name, graph in sorted(manifest["graphs"].items()):
        path = bundle / graph["file"]
        try:
            onnx.checker.check_model(str(path))
            inputs, outputs = _onnx_io(path)
        except Exception as exc:  # boundary: a corrupt graph file is a finding, not a crash
            checks.append(Check(f"{name} onnx", False, " ".join(str(exc).split())[:200]))
            continue
        same = inputs == graph["inputs"] and outputs == graph["outputs"]
        checks.append(Check(f"{name} onnx + I/O", same, "checker ok, I/O equals manifest" if same
                            else f"ONNX I/O {inputs} != manifest {graph['inputs']}"))
    checks.append(wiring_check(manifest))
    return checks


def wiring_check(manifest: dict) -> Check:
    """Every slot a graph reads is a step input, the cache, or written by an earlier graph of that step kind."""
    wiring = manifest["wiring"]
    errors = []
    for kind, order in wiring["steps"].items():
        available = set(wiring["step_inputs"])
        if kind == "clocked":
            available |= set(wiring["cache"]) | set(wiring["clocked_aliases"])
        for graph in order:
            if graph not in manifest["graphs"]:
                errors.append(f"{kind} step runs unknown graph {graph}")
                continue
            spec = wiring["graphs"][graph]
            names = {s["name"] for s in manifest["graphs"][graph]["inputs"]}
            if set(spec["inputs"]) != names:
                errors.append(f"{graph} wiring inputs {sorted(spec['inputs'])} != graph inputs {sorted(names)}")
            missing = [slot for slot in spec["inputs"].values() if slot not in available]
            if missing:
                errors.append(f"{kind}: {graph} reads {missing} before anything writes them")
            available |= set(spec["outputs"].values())
        if wiring["step_output"] not in available:
            errors.append(f"{kind} step never produces {wiring['step_output']}")
    return Check("wiring", not errors, "; ".join(errors) if errors else "all slots produced before use")


def parity_checks(bundle: Path, manifest: dict) -> list[Check]:
    """Re-measure FP32 trajectory parity against the source model (runtime vs torch reference, same noise)."""
    import torch

    from .models.pipeline import load_model
    from .reference import text_embeddings, torch_trajectory
    from .runtime.pipeline import BundleRunner

    source = manifest["source_model"]
    spec = source.get("name") if source.get("kind") == "builtin" else source.get("path")
    if spec is None or (source.get("kind") == "folder" and not Path(spec).is_dir()):
        return [Check("parity", True, f"skipped: source model not reachable ({spec})")]
    model = load_model(spec)
    if model.source.get("sha256") != source.get("sha256"):
        return [Check("source model hash", False, "source model changed since the bundle was built")]
    runner = BundleRunner(bundle, verify=False)
    hidden, pooled = text_embeddings(model, "a red triangle on the left")
    noise = np.random.default_rng(0).standard_normal(runner.latent_shape(), dtype=np.float32)
    schedule = manifest["schedule"]
    checks = []
    if manifest["adaptor"]["kind"] == "identity":
        ours = runner.generate(hidden.numpy(), pooled.numpy(), noise)
        ref = torch_trajectory(model, hidden, torch.from_numpy(noise), schedule["steps"], schedule["clock"],
                               manifest["guidance_scale"], manifest["sampler"]["name"])
        rel = float(np.max(np.abs(ours.latents - ref.latents)) / max(np.max(np.abs(ref.latents)), 1e-12))
        limit = manifest["recipe"]["parity"]["graph_max_rel_diff"] * 10
        checks.append(Check("trajectory vs torch", rel <= limit, f"final latents max rel diff {rel:.2e} (limit {limit:.0e})"))
    return checks


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")


def validate_command(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    checks = integrity_checks(bundle, manifest)
    if all(c.ok for c in checks) and not args.no_parity:
        try:
            checks += parity_checks(bundle, manifest)
        except CwExportError as exc:
            checks.append(Check("parity", False, str(exc)))
    print_table(checks)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise BundleError(f"bundle {bundle} failed {len(failed)} check(s): {', '.join(failed)}")
    print(f"bundle {bundle}: all {len(checks)} checks passed")
    return 0
