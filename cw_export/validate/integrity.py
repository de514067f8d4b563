"""Integrity of a bundle: every file's sha256 and size, each graph through the ONNX checker with the manifest's I/O,
and the wiring (every slot a graph reads is produced before it)."""

from __future__ import annotations

from pathlib import Path

from ..contract.manifest import verify_bundle
from .check import Check

def _onnx_io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> dict:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": [d.dim_value for d in tensor.shape.dim], "dtype": dtype}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def integrity_checks(bundle: Path, manifest: dict) -> list[Check]:
    """Every file's sha256 (one check; nothing else is read when it fails), then each graph's ONNX check + I/O."""
    import onnx

    problems = verify_bundle(bundle, manifest)
    checks = [Check("files sha256", not problems,
                    "; ".join(problems) if problems else f"{len(manifest['files'])} files")]
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
        difference = io_difference({"inputs": inputs, "outputs": outputs}, graph)
        checks.append(Check(f"{name} onnx + I/O", difference is None, "checker ok, I/O equals manifest"
                            if difference is None else difference))
    return checks


def io_difference(onnx_io: dict, graph: dict) -> str | None:
    """The first difference between a graph's ONNX I/O and the manifest's (names, order, dtypes, shapes), or None."""
    for kind in ("inputs", "outputs"):
        ours, recorded = onnx_io[kind], graph.get(kind, [])
        if [s["name"] for s in ours] != [s.get("name") for s in recorded]:
            return (f"{kind}: ONNX graph has {[s['name'] for s in ours]}, manifest "
                    f"{[s.get('name') for s in recorded]}")
        for a, b in zip(ours, recorded):
            for key in ("dtype", "shape"):
                if a[key] != b.get(key):
                    return f"{kind[:-1]} {a['name']}: {key} {a[key]} in the ONNX graph, {b.get(key)} in the manifest"
    return None


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
