"""Integrity of a bundle: every file's sha256 and size, each graph through the ONNX checker with the manifest's I/O,
and the wiring (every slot a graph reads is produced before it)."""

from __future__ import annotations

from pathlib import Path

from ..contract.manifest import verify_bundle
from ..errors import BundleError
from ..runtime.graph_file import check_external, read_graph
from .check import Check


def _onnx_io(model) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of a ModelProto as the manifest records them: name, shape, dtype."""
    import onnx

    def spec(value) -> dict:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": [d.dim_value for d in tensor.shape.dim], "dtype": dtype}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def _external_as_inputs(model):
    """A copy of ``model`` whose external-data initializers are graph inputs of the same type instead: given bytes,
    onnx's checker would look for their files relative to the working directory (``check_external`` checks them
    inside the bundle), while everything else it checks stays the same."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph, inputs = copy.graph, {value.name for value in copy.graph.input}
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    kept = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in external if t.name not in inputs)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return copy


def integrity_checks(bundle: Path, manifest: dict) -> list[Check]:
    """Every file's sha256 (one check; nothing else is read when it fails), then each graph's ONNX check + I/O.

    Each graph is read through the confinement (``graph_file.read_graph``: its external data locations inside the
    bundle, their files regular and not symlinks) and checked as the bytes read, so no check opens a path itself."""
    import onnx

    problems = verify_bundle(bundle, manifest)
    checks = [Check("files sha256", not problems,
                    "; ".join(problems) if problems else f"{len(manifest['files'])} files")]
    if problems:
        return checks
    for name, graph in sorted(manifest["graphs"].items()):
        try:
            data, model, external = read_graph(bundle, graph["file"])
            check_external(bundle, external)
            onnx.checker.check_model(_external_as_inputs(model) if external else data)
            inputs, outputs = _onnx_io(model)
        except BundleError as exc:
            checks.append(Check(f"{name} onnx", False, str(exc).removeprefix(f"{bundle}: ")))
            continue
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
