"""The build's quantized stages, one function each: calibrate -> quantize (with the a8 sweep) -> parity gate.

Each takes the in-progress bundle folder and its manifest dict, adds its files and its manifest section, and leaves
everything inside that folder (so a refused gate leaves nothing at ``--out``, see ``atomic_directory``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..calibrate import CalibrationSet, TorchGraph, collect, settings_for
from ..errors import InputError
from ..parity import gate, graph_sqnr, measure
from ..prompts import load_prompt_set, prompt_set_hash
from ..runtime.sessions import create_session, manifest_session_config
from . import FP32_REASONS, QUANTIZED_GRAPHS, GraphJob, get_backend, planned_bits

SWEEP_SAMPLES = 8  # calibration samples the a8 sensitivity sweep measures each candidate on


def text_encoder_fn(model):
    """prompt -> (encoder_hidden_states, pooled_text) as numpy [uncond, cond], from the FP32 torch text encoder."""
    from ..reference import text_embeddings

    def encode(prompt: str) -> tuple[np.ndarray, np.ndarray]:
        hidden, pooled = text_embeddings(model, prompt)
        return hidden.numpy(), pooled.numpy()

    return encode


def torch_graphs(model, manifest: dict, adaptor_state: dict | None = None) -> dict[str, TorchGraph]:
    """The FP32 torch graph behind every UNet-side graph of ``manifest``, as session-like objects."""
    from ..adaptor import build_adaptor, default_adaptor_config
    from ..split import split_unet

    split = split_unet(model.unet)
    modules = {"high_res_in": split.high_res_in, "low_res": split.low_res, "high_res_out": split.high_res_out}
    if "adaptor" in manifest["graphs"]:
        config = default_adaptor_config(model.unet, model.text_encoder.config.hidden_size)
        modules["adaptor"] = build_adaptor(config, adaptor_state)
    graphs = {}
    for name, module in modules.items():
        spec = manifest["graphs"][name]
        graphs[name] = TorchGraph(module, [s["name"] for s in spec["inputs"]], [s["name"] for s in spec["outputs"]])
    return graphs


def _prompts(source: str, count: int, what: str) -> list[str]:
    """The first ``count`` prompts of a set (all of them when it has fewer; the manifest records the number)."""
    prompts = load_prompt_set(source)
    if count < 1:
        raise InputError(f"{what}: the number of prompts must be >= 1, got {count}")
    return prompts[:count]


def check_prompt_sources(recipe) -> None:
    """Read the calibration and held-out prompt files up front: a bad file fails before any heavy work."""
    _prompts(recipe.quantization.calibration_set, recipe.quantization.calibration_prompts, "calibration")
    _prompts(recipe.parity.heldout_set, recipe.parity.heldout_prompts, "parity")


# -- stage: calibrate ----------------------------------------------------------------------------------------------
def calibrate_stage(model, recipe, manifest: dict, graphs: dict, adaptor_sha256: str | None,
                    progress: bool) -> CalibrationSet:
    q = recipe.quantization
    prompts = _prompts(q.calibration_set, q.calibration_prompts, "calibration")
    settings = settings_for(manifest, model.source["sha256"], prompts, q.calibration_seed, q.calibration_samples,
                            adaptor_sha256)
    calibration = collect(manifest, graphs, text_encoder_fn(model), prompts, settings, progress=progress)
    manifest["calibration"] = {"prompt_set": q.calibration_set, **calibration.provenance()}
    return calibration


# -- stage: quantize -----------------------------------------------------------------------------------------------
def _move_graph(src: Path, dst_dir: Path, name: str) -> bool:
    """Move ``src`` (+ its external data files) to ``dst_dir/<name>.onnx``, replacing the FP32 file(s).
    Returns whether the graph uses external data."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    for stale in dst_dir.glob(f"{name}.onnx*"):
        stale.unlink()
    model = onnx.load(str(src), load_external_data=False)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    if external:  # rewrite into one .data file beside the graph
        model = onnx.load(str(src), load_external_data=True)
        onnx.save_model(model, str(dst_dir / f"{name}.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{name}.onnx.data", size_threshold=1024)
    else:
        shutil.move(str(src), dst_dir / f"{name}.onnx")
    return external


def quantize_stage(recipe, manifest: dict, graphs: dict, calibration: CalibrationSet, bundle: Path,
                   progress: bool) -> dict[str, Path]:
    """Quantize every UNet-side graph; returns graph name -> quantized file inside ``bundle``."""
    from ..progress import progress_bar

    q = recipe.quantization
    backend = get_backend(q.backend)
    config = manifest_session_config(manifest)
    names = [g for g in QUANTIZED_GRAPHS if g in manifest["graphs"]]
    placed = {}
    with tempfile.TemporaryDirectory(prefix="cw-quantize-") as work:
        work = Path(work)
        fp32 = work / "fp32"
        fp32.mkdir()
        for name in names:  # the FP32 exports move out; the bundle gets the graphs to deploy
            for f in (bundle / "graphs").glob(f"{name}.onnx*"):
                shutil.move(str(f), fp32 / f.name)
        for name in progress_bar(names, enabled=progress, desc="quantize", unit="graph"):
            graph = graphs[name]

            def run(bits: int):
                job = GraphJob(name, fp32 / f"{name}.onnx", graph.module, graph.input_names, graph.output_names,
                               calibration.graphs[name], bits)
                return backend.quantize_graph(job, q, work / f"a{bits}" / "graphs")

            bits = planned_bits(q, name)
            reason = (f"a{bits}: recipe activation_bits" if name in q.activation_bits
                      else "a16: default for graphs the recipe does not name")
            sweep = None
            result = None
            if name in q.a8_candidates:
                trial = run(8)
                session = create_session(trial.file, config=config)
                sqnr = graph_sqnr(session, graph, calibration.graphs[name].subset(SWEEP_SAMPLES))["sqnr_db"]
                sweep = {"a8_sqnr_db": sqnr, "threshold_db": q.a8_min_sqnr_db, "samples": SWEEP_SAMPLES,
                         "data": "calibration samples"}
                if sqnr >= q.a8_min_sqnr_db:
                    bits, result = 8, trial
                    reason = f"a8: sensitivity sweep SQNR {sqnr:.2f} dB >= {q.a8_min_sqnr_db:g} dB"
                else:
                    bits = 16
                    reason = f"a16: 8-bit activations gave {sqnr:.2f} dB < {q.a8_min_sqnr_db:g} dB in the sweep"
            if result is None:
                result = run(bits)
            external = _move_graph(result.file, bundle / "graphs", name)
            encodings = None
            if result.encodings is not None:
                (bundle / "encodings").mkdir(exist_ok=True)
                for f in result.encodings.parent.glob(f"{name}.*"):
                    shutil.move(str(f), bundle / "encodings" / f.name)
                encodings = f"encodings/{result.encodings.name}"
            placed[name] = bundle / "graphs" / f"{name}.onnx"
            entry = manifest["graphs"][name]
            entry.update({"precision": f"w{q.weight_bits}a{bits}", "external_data": external, "quantization": {
                "backend": q.backend, "weight_bits": q.weight_bits, "weights": "per-channel symmetric int",
                "activation_bits": bits, "activations": "asymmetric, min-max calibrated", "reason": reason,
                "sweep": sweep, "encodings": encodings, "details": result.details}})
    for name, entry in manifest["graphs"].items():
        if name not in placed:
            entry["quantization"] = {"backend": None, "reason": FP32_REASONS.get(name, "FP32: not quantized")}
    return placed


# -- stage: parity -------------------------------------------------------------------------------------------------
def heldout_prompts(recipe) -> list[str]:
    return _prompts(recipe.parity.heldout_set, recipe.parity.heldout_prompts, "parity")


def parity_stage(model, recipe, manifest: dict, graphs: dict, placed: dict[str, Path],
                 allow_low_parity: bool) -> dict:
    """Measure parity of the graphs in ``placed`` with the manifest's session settings; gate; record."""
    config = manifest_session_config(manifest)
    sessions = {name: create_session(path, config=config) for name, path in placed.items()}
    prompts = heldout_prompts(recipe)
    numbers = measure(manifest, graphs, sessions, text_encoder_fn(model), prompts, recipe.parity.seed)
    verdict = gate(numbers, recipe.parity, allow_low_parity)
    thresholds = {k: v for k, v in asdict(recipe.parity).items()
                  if k in ("graph_min_sqnr_db", "step_min_psnr_db", "final_latent_min_psnr_db",
                           "guidance_ratio_tolerance")}
    manifest["parity"] = {"prompt_set": recipe.parity.heldout_set, "prompts_sha256": prompt_set_hash(prompts),
                          "session_options": config, "thresholds": thresholds, "gate": verdict, **numbers}
    return manifest["parity"]
