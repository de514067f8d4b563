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
    checks += encodings_checks(bundle, manifest)
    checks.append(wiring_check(manifest))
    return checks


def _encoding_entries(encodings: object) -> list[dict]:
    """AIMET encodings as a list of {name, bw, ...}: format 1.0.0 is a list, older formats map name -> [encoding]."""
    if isinstance(encodings, list):
        return encodings
    return [{"name": name, **(entries[0] if isinstance(entries, list) and entries else {})}
            for name, entries in dict(encodings).items()]


def encodings_checks(bundle: Path, manifest: dict) -> list[Check]:
    """Each quantized graph's encodings file (AIMET JSON, for QNN converters) matches its graphs: every encoding
    names a tensor of the graph it was computed on, that graph has the deployed graph's I/O, and the bit widths are
    the ones the manifest records (weights; activations, or the 16-bit timestep path)."""
    import json

    import onnx

    checks = []
    for name, graph in sorted(manifest["graphs"].items()):
        quant = graph.get("quantization") or {}
        if not quant.get("encodings"):
            continue
        details = quant.get("details") or {}
        try:
            data = json.loads((bundle / quant["encodings"]).read_text(encoding="utf-8"))
            activations = _encoding_entries(data["activation_encodings"])
            params = _encoding_entries(data["param_encodings"])
            model = onnx.load(str(bundle / details["encodings_graph"]), load_external_data=False)
        except Exception as exc:  # boundary: an unreadable encodings file or graph is a finding, not a crash
            checks.append(Check(f"{name} encodings", False, " ".join(f"{type(exc).__name__}: {exc}".split())[:200]))
            continue
        tensors = ({t.name for t in model.graph.initializer} | {t.name for t in model.graph.input}
                   | {out for node in model.graph.node for out in node.output})
        problems = []
        unknown = sorted({e.get("name") for e in activations + params} - tensors, key=str)
        if unknown:
            problems.append(f"{len(unknown)} encoding(s) name tensors the graph lacks, e.g. {unknown[0]!r}")
        io_names = ([t.name for t in model.graph.input if t.name not in {i.name for i in model.graph.initializer}],
                    [t.name for t in model.graph.output])
        expected_io = ([s["name"] for s in graph["inputs"]], [s["name"] for s in graph["outputs"]])
        if io_names != expected_io:
            problems.append(f"encodings graph I/O {io_names} != graph I/O {expected_io}")
        act_bits = {quant.get("activation_bits"), details.get("timestep_bits")} - {None}
        wrong_acts = sorted({e.get("bw") for e in activations} - act_bits, key=str)
        wrong_params = sorted({e.get("bw") for e in params} - {quant.get("weight_bits")}, key=str)
        if wrong_acts:
            problems.append(f"activation bit width(s) {wrong_acts} not in the manifest's {sorted(act_bits)}")
        if wrong_params:
            problems.append(f"weight bit width(s) {wrong_params} != the manifest's {quant.get('weight_bits')}")
        checks.append(Check(f"{name} encodings", not problems, "; ".join(problems) if problems else
                            f"{len(activations)} activation + {len(params)} param encodings match the graph"))
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


def parity_checks(bundle: Path, manifest: dict, provider: str = "cpu") -> list[Check]:
    """Re-measure FP32 trajectory parity against the source model (runtime vs torch reference, same noise); on
    ``provider`` other than cpu, a quantized bundle's parity is measured on that provider (nothing is recorded)."""
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
    if "parity" in manifest:  # quantized bundle: re-measure its recorded numbers, re-check its gate
        return quantized_parity_checks(bundle, manifest, model, provider)
    runner = BundleRunner(bundle, provider=provider, verify=False)
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


def quantized_parity_checks(bundle: Path, manifest: dict, model, provider: str = "cpu") -> list[Check]:
    """Re-measure a quantized bundle's parity (same held-out prompts, seeds and session options as recorded) and
    check that the numbers equal the manifest's and still meet the recorded thresholds.

    On another ``provider`` (qnn-htp) the same numbers are measured there: they are not expected to equal the
    manifest's (measured on the CPU EP), so only the recorded thresholds gate; each graph's SQNR is printed."""
    from types import SimpleNamespace

    from .parity import compare, failures, measure
    from .quantize.stages import text_encoder_fn, torch_graphs
    from .runtime.sessions import create_session, manifest_session_config

    recorded = manifest["parity"]
    if manifest["adaptor"]["kind"] == "learned":
        return [Check("quantized parity", True, "skipped: the learned adaptor's FP32 weights are not in the bundle")]
    config = manifest_session_config(manifest)
    if config != recorded["session_options"]:
        return [Check("session options", False, f"manifest session_options {config} != parity's "
                      f"{recorded['session_options']}")]
    graphs = torch_graphs(model, manifest)
    sessions = {name: create_session(bundle / manifest["graphs"][name]["file"], provider, config=config,
                                     precision=manifest["graphs"][name].get("precision"))
                for name in recorded["graphs"]}
    numbers = measure(manifest, graphs, sessions, text_encoder_fn(model), recorded["prompts"],
                      recorded["seeds"][0])
    if provider != "cpu":
        minimum = recorded["thresholds"].get("graph_min_sqnr_db", 0)
        checks = [Check(f"{name} SQNR on {provider}", result["sqnr_db"] >= minimum, f"{result['sqnr_db']:.2f} dB "
                        f"vs FP32 torch (cpu: {recorded['graphs'][name]['sqnr_db']:.2f} dB recorded; "
                        f"min {minimum:g} dB)")
                  for name, result in numbers["graphs"].items()]
        final_min = recorded["thresholds"].get("final_latent_min_psnr_db", 0)
        checks.append(Check(f"trajectory on {provider}", numbers["final_latent_psnr_db"] >= final_min,
                            f"final latent PSNR {numbers['final_latent_psnr_db']:.2f} dB (cpu: "
                            f"{recorded['final_latent_psnr_db']:.2f} dB recorded; min {final_min:g} dB)"))
        found = failures(numbers, SimpleNamespace(**recorded["thresholds"]))
        checks.append(Check(f"quantized parity gate on {provider}", not found,
                            "; ".join(found) if found else "all recorded thresholds met"))
        return checks
    diffs = compare(recorded, numbers)
    checks = [Check("quantized parity re-measured", not diffs, "; ".join(diffs) if diffs else
                    f"{len(numbers['graphs'])} graphs and {len(numbers['steps'])} steps equal the manifest "
                    f"(final latent PSNR {numbers['final_latent_psnr_db']:.2f} dB)")]
    found = failures(numbers, SimpleNamespace(**recorded["thresholds"]))
    allowed = recorded["gate"].get("allowed_by_flag", False)
    detail = "; ".join(found) if found else "all recorded thresholds met"
    if found and allowed:
        detail = f"below thresholds, written with --allow-low-parity: {detail}"
    checks.append(Check("quantized parity gate", not found or allowed, detail))
    return checks


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")


def validate_command(args: argparse.Namespace) -> int:
    from .runtime.sessions import check_provider

    provider = getattr(args, "provider", "cpu")
    check_provider(provider)
    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    checks = integrity_checks(bundle, manifest)
    if all(c.ok for c in checks) and not args.no_parity:
        try:
            checks += parity_checks(bundle, manifest, provider)
        except CwExportError as exc:
            checks.append(Check("parity", False, str(exc)))
    print_table(checks)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise BundleError(f"bundle {bundle} failed {len(failed)} check(s): {', '.join(failed)}")
    print(f"bundle {bundle}: all {len(checks)} checks passed")
    return 0
