"""Parity re-measured by validate: an FP32 bundle's trajectory against the torch reference; a quantized bundle's
recorded numbers measured again (same prompts, seeds, session options) and its gate re-checked, on the CPU EP or on
another provider (qnn-htp), whose numbers ``--record`` writes into the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract.manifest import read_manifest
from ..models.source import source_model_reachable, source_model_spec
from ..runtime.noise import seeded_noise
from .check import Check

def parity_checks(bundle: Path, manifest: dict, provider: str = "cpu", record: bool = False,
                  sampled=None) -> list[Check]:
    """Re-measure FP32 trajectory parity against the source model (runtime vs torch reference, same noise); on
    ``provider`` other than cpu, a quantized bundle's parity is measured on that provider (recorded in the manifest
    with ``record``); ``sampled`` (a ``validate.SampledOptions``): each quantized graph on N of the gate's inputs
    there instead (``validate.sampled``)."""
    import torch

    from ..models.pipeline import load_model
    from ..reference import text_embeddings, torch_trajectory
    from ..runtime.pipeline import BundleRunner

    source = manifest["source_model"]
    if not source_model_reachable(manifest):
        return [Check("parity", True, f"skipped: source model not reachable ({source_model_spec(manifest)})")]
    model = load_model(source_model_spec(manifest))
    if manifest.get("loras"):  # fused at build time (docs/lora.md): the FP32 reference is the fused model
        from ..models.lora import fuse_loras, recorded_loras

        loras = recorded_loras(manifest)
        if isinstance(loras, str):
            return [Check("parity", True, f"skipped: {loras}")]
        model = fuse_loras(model, loras)
    if model.source.get("sha256") != source.get("sha256"):
        return [Check("source model hash", False, "source model changed since the bundle was built")]
    if "parity" in manifest and sampled is not None:  # each quantized graph on N of the gate's inputs
        from .sampled import sampled_parity_checks

        graphs = reference_graphs(manifest, model)
        if isinstance(graphs, str):
            skipped = graphs.startswith("skipped")
            return [Check("sampled parity" if skipped else "session options", skipped, graphs)]
        return sampled_parity_checks(bundle, manifest, model, graphs, provider, sampled.samples, sampled.workers,
                                     sampled.json_out, sampled.progress, sampled.graphs)
    if "parity" in manifest:  # quantized bundle: re-measure its recorded numbers, re-check its gate
        return quantized_parity_checks(bundle, manifest, model, provider, record)
    runner = BundleRunner(bundle, provider=provider, verify=False)
    hidden, pooled = text_embeddings(model, "a red triangle on the left")
    noise = seeded_noise(runner.latent_shape(), 0)
    schedule = manifest["schedule"]
    checks = []
    if manifest["adaptor"]["kind"] == "identity":
        ours = runner.generate(hidden.numpy(), pooled.numpy(), noise)
        ref = torch_trajectory(model, hidden, torch.from_numpy(noise), schedule["steps"], schedule["clock"],
                               manifest["guidance_scale"], manifest["sampler"]["name"], pooled_text=pooled)
        rel = float(np.max(np.abs(ours.latents - ref.latents)) / max(np.max(np.abs(ref.latents)), 1e-12))
        limit = manifest["recipe"]["parity"]["graph_max_rel_diff"] * 10
        checks.append(Check("trajectory vs torch", rel <= limit,
                            f"final latents max rel diff {rel:.2e} (limit {limit:.0e})"))
    return checks


def shipped_adaptor_state(model, manifest: dict) -> dict | None:
    """The learned adaptor's FP32 weights, when the bundle was built with the model's shipped checkpoint (same
    sha256): the reference the quantized adaptor graph is measured against."""
    from ..distill.checkpoint import read_checkpoint
    from ..models.pipeline import shipped_adaptor

    path = shipped_adaptor(model)
    if path is None:
        return None
    checkpoint = read_checkpoint(path)
    return checkpoint.state_dict if checkpoint.sha256 == manifest["adaptor"].get("checkpoint_sha256") else None


def record_provider_parity(bundle: Path, provider: str, numbers: dict, found: list[str]) -> None:
    """Store parity measured on ``provider`` in the manifest (``parity_by_provider``, beside the CPU EP's
    ``parity``) and regenerate the hand-off README that shows both; the manifest's file hashes stay consistent."""
    from importlib.metadata import PackageNotFoundError, version

    from ..bundle.handoff import refresh_handoff

    try:
        qnn_version = version("onnxruntime-qnn")
    except PackageNotFoundError:
        qnn_version = None
    manifest = read_manifest(bundle)
    manifest.setdefault("parity_by_provider", {})[provider] = {
        "graphs": {name: {"sqnr_db": r["sqnr_db"], "outputs": r.get("outputs", {})}
                   for name, r in numbers["graphs"].items()},
        "final_latent_psnr_db": numbers["final_latent_psnr_db"],
        "steps": [{"step": s["step"], "kind": s["kind"], "latent_psnr_db": s["latent_psnr_db"],
                   "guidance_ratio": s["guidance_ratio"]} for s in numbers["steps"]],
        "gate": {"passed": not found, "failures": found}, "onnxruntime_qnn": qnn_version,
    }
    refresh_handoff(bundle, manifest)


def reference_graphs(manifest: dict, model) -> dict | str:
    """The FP32 torch graphs a quantized bundle's parity is measured against (``torch_graphs``); a string says why
    they cannot be built (a learned adaptor whose FP32 weights are unknown, session options that differ from the
    ones parity was measured with)."""
    from ..export.torch_graphs import torch_graphs
    from ..runtime.sessions import manifest_session_config

    recorded = manifest["parity"]
    adaptor_state = None
    if manifest["adaptor"]["kind"] == "learned":
        adaptor_state = shipped_adaptor_state(model, manifest)
        if adaptor_state is None:
            return ("skipped: the learned adaptor's FP32 weights are not in the bundle, and it is not the model's "
                    "shipped adaptor")
    config = manifest_session_config(manifest)
    if config != recorded["session_options"]:
        return f"manifest session_options {config} != parity's {recorded['session_options']}"
    return torch_graphs(model, manifest, adaptor_state)


def measure_on_provider(bundle: Path, manifest: dict, model, provider: str = "cpu") -> dict | str:
    """The bundle's parity numbers (``parity.measure``: same held-out prompts, seeds and session options as
    recorded) with its quantized graphs on ``provider``; a string says why they cannot be measured."""
    from ..parity.measure import measure
    from ..parity.stage import image_references
    from ..calibrate.stage import tokenizer_fn
    from ..runtime.sessions import bundle_session

    recorded = manifest["parity"]
    graphs = reference_graphs(manifest, model)
    if isinstance(graphs, str):
        return graphs
    sessions = {name: bundle_session(bundle, manifest, name, provider) for name in recorded["graphs"]}
    images = image_references(model, manifest, bundle, provider) if "image" in recorded else None
    return measure(manifest, graphs, sessions, tokenizer_fn(model), recorded["prompts"], recorded["seeds"][0],
                   images=images, aggregate=recorded.get("prompt_aggregate", "pooled"))


def quantized_parity_checks(bundle: Path, manifest: dict, model, provider: str = "cpu",
                            record: bool = False) -> list[Check]:
    """Re-measure a quantized bundle's parity and check that the numbers equal the manifest's and still meet the
    recorded thresholds.

    On another ``provider`` (qnn-htp) the same numbers are measured there: they are not expected to equal the
    manifest's (measured on the CPU EP), so only the recorded thresholds gate; each graph's SQNR is printed."""
    from types import SimpleNamespace

    from ..parity.measure import compare, failures

    recorded = manifest["parity"]
    numbers = measure_on_provider(bundle, manifest, model, provider)
    if isinstance(numbers, str):
        skipped = numbers.startswith("skipped")
        return [Check("quantized parity" if skipped else "session options", skipped, numbers)]
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
        if record:
            record_provider_parity(bundle, provider, numbers, found)
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
