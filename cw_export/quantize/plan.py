"""An a8 plan: the 8-bit choices of an earlier bundle, reused by a build instead of sweeping again (issue #18).

The per-MAC a8 sweep scores every Conv/MatMul/Gemm of a graph alone at 8 bits, one scoring run each: for SD 1.5's
low_res that is ~250 runs, ~1 h at 64x64 on 2 cores and out of reach at 256 or 512. Which layers tolerate 8-bit
inputs depends on the weights and on where the layer sits far more than on the spatial size, so a user sweeps
once at a small size and builds the real size with ``--a8-plan SMALL_BUNDLE``: each graph starts from the plan's
choice (16 bits, 8 bits, or the plan's MAC list in the plan's order), is scored once on this build's calibration
data, keeps the longest prefix of the MAC list that still keeps the recipe's floors (a binary search, ~log2(n)
runs), and the parity gate then backs off as after a sweep. Nothing of the plan is trusted beyond its names: the
graphs of this build are quantized and measured anew, and a plan from another model is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

PLAN_BITS = (8, 16, "8+16")  # what a plan can say of a graph: whole graph 8 or 16 bits, or a MAC mix


@dataclass(frozen=True)
class A8Plan:
    """Per graph the activation bits an earlier bundle shipped and (for "8+16") its 8-bit MAC nodes in the
    order its sweep ranked them; ``source`` is the provenance recorded in the new manifest."""

    graphs: dict
    source: dict

    def bits(self, graph: str):
        entry = self.graphs.get(graph)
        return None if entry is None else entry["activation_bits"]

    def macs(self, graph: str) -> list[str]:
        return list(self.graphs.get(graph, {}).get("a8_macs", []))


def _bad(bundle: Path, what: str) -> InputError:
    return InputError(f"--a8-plan {bundle}: {what}")


def read_a8_plan(bundle: Path) -> A8Plan:
    """The a8 plan of a quantized bundle folder (read through the bundle's confined manifest reader: no file
    outside it is opened); a folder that is not a quantized bundle with per-graph records is one InputError."""
    from ..contract.manifest import MANIFEST_NAME, read_manifest
    from ..contract.confine import read_inside
    from ..errors import BundleError

    bundle = Path(bundle)
    try:
        manifest = read_manifest(bundle)
        raw = read_inside(bundle, MANIFEST_NAME)
    except BundleError as exc:
        raise _bad(bundle, str(exc)) from None
    graphs = {}
    for name, entry in manifest["graphs"].items():
        quant = entry.get("quantization") if isinstance(entry, dict) else None
        if not isinstance(quant, dict) or not quant.get("backend"):
            continue  # an FP32 graph of the plan says nothing about 8 bits
        bits = quant.get("activation_bits")
        if isinstance(bits, bool) or bits not in PLAN_BITS:
            raise _bad(bundle, f"graph {name!r:.60} has activation_bits {bits!r:.40}; expected one of {PLAN_BITS}")
        plan = {"activation_bits": bits}
        if bits == "8+16":
            layers = (quant.get("sweep") or {}).get("layers") if isinstance(quant.get("sweep"), dict) else None
            macs = layers.get("a8_groups") if isinstance(layers, dict) else None
            if (not isinstance(layers, dict) or layers.get("granularity") != "mac" or not isinstance(macs, list)
                    or not macs or not all(isinstance(m, str) and m for m in macs) or len(set(macs)) != len(macs)):
                raise _bad(bundle, f"graph {name!r:.60} is a mix without a per-MAC list (a plan needs a bundle built "
                                   "with --a8-sweep mac)")
            plan["a8_macs"] = macs
        graphs[name] = plan
    if not graphs:
        raise _bad(bundle, "no quantized graph in it (build the plan with a snapdragon-* target)")
    source_model = manifest.get("source_model")
    sha = source_model.get("sha256") if isinstance(source_model, dict) else None
    image = (manifest.get("latent") or {}).get("image_size")
    return A8Plan(graphs, {"manifest_sha256": hashlib.sha256(raw).hexdigest(), "source_model_sha256": sha,
                           "image_size": image if isinstance(image, list) else None,
                           "target": manifest.get("target") if isinstance(manifest.get("target"), str) else None})


def check_plan_model(plan: A8Plan | None, source_model: dict) -> None:
    """Refuse a plan from another model: its MAC names could match (same architecture) while its choices were
    measured on other weights."""
    if plan is None:
        return
    theirs, ours = plan.source.get("source_model_sha256"), source_model.get("sha256")
    if theirs != ours:
        raise InputError(f"--a8-plan comes from another model (its source_model sha256 {str(theirs)[:12]}, this "
                         f"build's {str(ours)[:12]}): a plan's 8-bit choices hold for the weights they were measured on")


def check_plan_names(plan_macs: list[str], convertible: list[str], graph: str) -> None:
    """Every MAC the plan names must be one this build's graph can convert (the same export names its nodes the
    same at every size); otherwise the plan was made by another export."""
    known = set(convertible)
    unknown = [m for m in plan_macs if m not in known]
    if unknown:
        raise InputError(f"--a8-plan: {len(unknown)} of the plan's {len(plan_macs)} 8-bit MACs of {graph} are not "
                         f"convertible MACs of this build's graph (first: {unknown[0]!r:.80}); was the plan built by "
                         "another cw-export version?")


def plan_json(plan: A8Plan) -> str:
    """The plan's provenance as the recipe records it (the MAC lists are in each graph's sweep record)."""
    return json.dumps(plan.source, sort_keys=True)
