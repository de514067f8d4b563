"""The build's quantized stages, one function each: calibrate -> quantize (with the a8 sweep) -> parity gate.

Each takes the in-progress bundle folder and its manifest dict, adds its files and its manifest section, and leaves
everything inside that folder (so a refused gate leaves nothing at ``--out``, see ``atomic_directory``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..calibrate import CalibrationSet, TorchGraph, collect, settings_for
from ..errors import InputError
from ..parity import ImageReferences, gate, graph_sqnr, measure
from ..prompts import load_prompt_set, prompt_set_hash
from ..runtime.sessions import create_session, manifest_session_config
from . import FP32_REASONS, IMAGE_GRAPHS, GraphJob, get_backend, graphs_to_quantize, planned_bits

SWEEP_SAMPLES = 8  # calibration samples the a8 sensitivity sweep measures each candidate on


def text_encoder_fn(model):
    """prompt -> (encoder_hidden_states, pooled_text) as numpy [uncond, cond], from the FP32 torch text encoder."""
    from ..reference import text_embeddings

    def encode(prompt: str) -> tuple[np.ndarray, np.ndarray]:
        hidden, pooled = text_embeddings(model, prompt)
        return hidden.numpy(), pooled.numpy()

    return encode


def tokenizer_fn(model):
    """prompt -> input_ids [2, 77] int64 for [uncond, cond], as diffusers' pipeline tokenizes (the text encoder
    graph's input: calibration and parity run it, FP32 or quantized, on these ids)."""

    def tokenize(prompt: str) -> np.ndarray:
        return model.tokenize(["", prompt]).numpy().astype(np.int64)

    return tokenize


def _keep_inputs(module, call_names: list[str], kept: list[str]):
    """``module`` taking only the inputs its ONNX graph kept (the exporter drops unused ones, e.g. the text input of
    a high_res_in without cross-attention); a dropped one gets a placeholder tensor the forward never reads (not
    None: aimet's tracer cannot follow a submodule called with None)."""
    import torch

    if call_names == kept:
        return module

    class KeptInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wrapped = module  # cw_export.quantize.mixed.group_of skips this wrapper level
            self.register_buffer("unused", torch.zeros(1), persistent=False)

        def forward(self, *args):
            given = dict(zip(kept, args))
            return self.wrapped(*[given.get(name, self.unused) for name in call_names])

    return KeptInputs()


def torch_graphs(model, manifest: dict, adaptor_state: dict | None = None) -> dict[str, TorchGraph]:
    """The FP32 torch graph behind every graph of ``manifest`` (UNet side, text encoder, VAE decoder), as
    session-like objects."""
    from ..adaptor import build_adaptor, default_adaptor_config
    from ..build import make_wiring
    from ..graphs import TextEncoderGraph, VaeDecoderGraph
    from ..split import split_unet

    split = split_unet(model.unet)
    modules = {**split.graph_modules(), "text_encoder": TextEncoderGraph(model.text_encoder), "vae_decoder": VaeDecoderGraph(model.vae)}
    if "adaptor" in manifest["graphs"]:
        config = default_adaptor_config(model.unet, model.text_encoder.config.hidden_size)
        modules["adaptor"] = build_adaptor(config, adaptor_state)
    graphs = {}
    wiring = make_wiring(split.num_skips, manifest["adaptor"]["kind"])["graphs"]
    for name, module in modules.items():
        spec = manifest["graphs"][name]
        kept = [s["name"] for s in spec["inputs"]]
        call_names = list(wiring[name]["inputs"]) if name in wiring else kept
        graphs[name] = TorchGraph(_keep_inputs(module, call_names, kept), kept, [s["name"] for s in spec["outputs"]])
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
    calibration = collect(manifest, graphs, tokenizer_fn(model), prompts, settings, progress=progress)
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


@dataclass
class A16Fallback:
    """The 16-bit-activation version of a graph the sweep put at 8 bits, held until the parity gate has spoken."""

    file: Path
    encodings: list[Path]
    details: dict


def _hold_graph(graph_dir: Path, name: str, folder: Path) -> Path:
    """Copy graph ``name`` (``<name>.onnx`` + its external data) from ``graph_dir`` into ``folder``, where it waits
    for the parity gate's verdict; returns the held ``.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in graph_dir.glob(f"{name}.onnx*"):
        shutil.copy2(f, folder / f.name)
    return folder / f"{name}.onnx"


def _hold(result, name: str, fallback_dir: Path) -> A16Fallback:
    """Copy an a16 result (graph + external data + encodings) out of the quantizer's scratch folder."""
    folder = fallback_dir / name
    file = _hold_graph(result.file.parent, name, folder)
    encodings = []
    if result.encodings is not None:
        for f in result.encodings.parent.glob(f"{name}.*"):
            encodings.append(Path(shutil.copy2(f, folder / f"encodings-{f.name}")))
    return A16Fallback(file, encodings, dict(result.details))


def quantize_stage(recipe, manifest: dict, graphs: dict, calibration: CalibrationSet, bundle: Path,
                   progress: bool, fallback_dir: Path | None = None) -> tuple[dict[str, Path], dict[str, A16Fallback]]:
    """Quantize every graph the recipe quantizes (``graphs_to_quantize``); returns graph name -> quantized file
    inside ``bundle``, and (with ``fallback_dir``) the a16 versions of the graphs that went to 8-bit activations,
    for ``apply_fallbacks``."""
    from ..progress import progress_bar

    q = recipe.quantization
    backend = get_backend(q.backend)
    config = manifest_session_config(manifest)
    names = graphs_to_quantize(q, manifest["graphs"])
    placed: dict[str, Path] = {}
    fallbacks: dict[str, A16Fallback] = {}
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
                numbers = _a8_score(trial.file, graph, calibration.graphs[name], config)
                sweep = {"a8_sqnr_db": numbers["sqnr_db"], "a8_guidance_sqnr_db": numbers.get("guidance_sqnr_db"),
                         "threshold_db": q.a8_min_sqnr_db, "guidance_threshold_db": q.a8_min_guidance_sqnr_db,
                         "samples": SWEEP_SAMPLES, "data": "calibration samples"}
                if a8_margin(numbers, q) >= 0:
                    bits, result = 8, trial
                    reason = f"a8: sensitivity sweep {_describe(numbers)} within the recipe's floors"
                    if fallback_dir is not None:
                        fallbacks[name] = _hold(run(16), name, fallback_dir)
                else:
                    bits = 16
                    reason = f"a16: 8-bit activations gave {_describe(numbers)}, below the recipe's floors"
                    if q.a8_layer_sweep != "off":
                        result = run(16)
                        held = _hold(result, name, fallback_dir) if fallback_dir is not None else None
                        layers = _layer_sweep(result, trial, graph, calibration.graphs[name], config, q)
                        sweep["layers"] = layers.as_dict()
                        if layers.a8_groups:
                            bits = "8+16"
                            if held is not None:
                                fallbacks[name] = held
                            reason = (f"a8 in {len(layers.a8_groups)} of {len(layers.margin_db)} "
                                      f"{q.a8_layer_sweep}s, a16 elsewhere: the per-{q.a8_layer_sweep} sweep keeps "
                                      f"{_describe(layers.numbers)} (whole graph at a8: {_describe(numbers)})")
                        else:
                            reason += f"; no {q.a8_layer_sweep} keeps the floors at 8 bits on its own"
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
    return placed, fallbacks


def apply_fallbacks(manifest: dict, bundle: Path, fallbacks: dict[str, A16Fallback], failures: list[str]) -> None:
    """Put the held a16 graphs in place of their 8-bit versions after those failed the bundle's parity gate
    (the sweep's floors are measured per graph on calibration inputs; the gate on whole held-out trajectories)."""
    for name, held in fallbacks.items():
        external = _move_graph(held.file, bundle / "graphs", name)
        for stale in (bundle / "encodings").glob(f"{name}.*") if held.encodings else ():
            stale.unlink()
        for f in held.encodings:
            shutil.move(str(f), bundle / "encodings" / f.name.removeprefix("encodings-"))
        entry = manifest["graphs"][name]
        quant = entry["quantization"]
        first = {"precision": entry["precision"], "reason": quant["reason"], "gate_failures": list(failures)}
        entry["precision"] = f"w{quant['weight_bits']}a16"
        entry["external_data"] = external
        quant.update({"activation_bits": 16, "details": held.details, "gate_fallback": first,
                      "reason": f"a16: the sweep's 8-bit choice ({first['precision']}) failed the bundle's parity "
                                f"gate ({'; '.join(failures)}), so this graph fell back to 16-bit activations"})


def hold_fp32(recipe, manifest: dict, bundle: Path, fallback_dir: Path) -> dict[str, Path]:
    """Copies of the FP32 exports of the once-per-image graphs this recipe quantizes, held until parity is measured
    (call before ``quantize_stage`` replaces them): ``keep_fp32_where_parity_requires`` may put them back."""
    held = {}
    for name in graphs_to_quantize(recipe.quantization, manifest["graphs"]):
        if name in IMAGE_GRAPHS:
            held[name] = _hold_graph(bundle / "graphs", name, fallback_dir / "fp32" / name)
    return held


def keep_fp32_where_parity_requires(manifest: dict, bundle: Path, held: dict[str, Path], placed: dict[str, Path],
                                    parity: dict, floor: float) -> list[str]:
    """Put back the FP32 export of every held once-per-image graph whose held-out SQNR is below the recipe's graph
    floor, instead of failing the build: it runs once per image, so FP32 costs little time, while a noisy text
    embedding or image costs parity. Its quantization entry keeps the reason and the measured numbers; it leaves
    ``placed`` (parity must be measured again). Returns the graphs put back."""
    reverted = []
    for name, fp32_file in held.items():
        measured = parity["graphs"].get(name)
        if measured is None or floor <= 0 or measured["sqnr_db"] >= floor:
            continue
        entry = manifest["graphs"][name]
        tried = entry["quantization"]
        entry["external_data"] = _move_graph(fp32_file, bundle / "graphs", name)
        for stale in (bundle / "encodings").glob(f"{name}.*") if tried.get("encodings") else ():
            stale.unlink()
        if (bundle / "encodings").is_dir() and not any((bundle / "encodings").iterdir()):
            (bundle / "encodings").rmdir()
        entry["quantization"] = {
            "backend": None,
            "reason": f"FP32: kept where parity requires: {entry['precision']} ({tried['backend']}) measured "
                      f"{measured['sqnr_db']:.2f} dB SQNR vs FP32 on held-out inputs, below the recipe's graph floor "
                      f"{floor:g} dB",
            "parity_fallback": {"precision": entry["precision"], "backend": tried["backend"],
                                "activation_bits": tried["activation_bits"], "sqnr_db": measured["sqnr_db"],
                                "outputs": measured["outputs"], "graph_min_sqnr_db": floor}}
        entry["precision"] = "fp32"
        placed.pop(name, None)
        reverted.append(name)
    return reverted


def _a8_score(path: Path, graph, data, config: dict) -> dict:
    """SQNR and guidance SQNR of a candidate QDQ graph on the sweep's calibration samples."""
    return graph_sqnr(create_session(path, config=config), graph, data.subset(SWEEP_SAMPLES))


def a8_margin(numbers: dict, q) -> float:
    """dB above the recipe's a8 floors (negative: below one of them); the cond - uncond SQNR is checked because
    classifier-free guidance multiplies that difference (a 30 dB graph still broke the guidance gate when its
    cond - uncond difference was noisy)."""
    margin = numbers["sqnr_db"] - q.a8_min_sqnr_db
    if q.a8_min_guidance_sqnr_db > 0 and "guidance_sqnr_db" in numbers:
        margin = min(margin, numbers["guidance_sqnr_db"] - q.a8_min_guidance_sqnr_db)
    return margin


def _describe(numbers: dict) -> str:
    text = f"SQNR {numbers['sqnr_db']:.2f} dB"
    if "guidance_sqnr_db" in numbers:
        text += f", cond-uncond SQNR {numbers['guidance_sqnr_db']:.2f} dB"
    return text


def _layer_sweep(a16, a8, graph, data, config: dict, q):
    """Per-layer mixed precision (cw_export.quantize.mixed); rewrites ``a16`` in place into the mixed graph and
    its encodings when some layers can go to 8 bits."""
    import json

    from .mixed import merge_encodings, sweep

    def score(path: Path) -> tuple[float, dict]:
        numbers = _a8_score(path, graph, data, config)
        return a8_margin(numbers, q), numbers

    layers, mixed_file = sweep(a16.file, a8.file, score, depth=q.a8_layer_sweep)
    if mixed_file is not None:
        mixed_file.replace(a16.file)
        if a16.encodings is not None and a8.encodings is not None:
            base = json.loads(a16.encodings.read_text(encoding="utf-8"))
            donor = json.loads(a8.encodings.read_text(encoding="utf-8"))
            merged = merge_encodings(base, donor, layers.a8_tensors)
            a16.encodings.write_text(json.dumps(merged, indent=1), encoding="utf-8")
    return layers


# -- stage: parity -------------------------------------------------------------------------------------------------
def heldout_prompts(recipe) -> list[str]:
    return _prompts(recipe.parity.heldout_set, recipe.parity.heldout_prompts, "parity")


def image_references(model, manifest: dict, bundle: Path, provider: str = "cpu") -> ImageReferences:
    """The torch side of image parity (unclocked FP32 pipeline, torch VAE) and the bundle's own VAE decoder."""
    import torch

    from ..calibrate import GraphRunner
    from ..reference import decode_image, torch_trajectory

    decoder = manifest["wiring"]["decode"]["graph"]
    spec = manifest["graphs"][decoder]
    session = create_session(bundle / spec["file"], provider, config=manifest_session_config(manifest),
                             precision=spec.get("precision"))
    schedule = manifest["schedule"]

    def full_fp32(hidden: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return torch_trajectory(model, torch.from_numpy(hidden), torch.from_numpy(noise), schedule["steps"], 1,
                                manifest["guidance_scale"], manifest["sampler"]["name"]).latents

    return ImageReferences(full_fp32=full_fp32, decode_fp32=lambda x: decode_image(model, x),
                           decode_bundle=GraphRunner(manifest, {decoder: session}).decode)


PARITY_THRESHOLDS = ("graph_min_sqnr_db", "step_min_psnr_db", "final_latent_min_psnr_db", "guidance_ratio_tolerance",
                     "image_min_psnr_db", "image_min_ssim")


def parity_stage(model, recipe, manifest: dict, graphs: dict, placed: dict[str, Path],
                 allow_low_parity: bool, bundle: Path) -> dict:
    """Measure parity of the graphs in ``placed`` with the manifest's session settings; gate; record."""
    config = manifest_session_config(manifest)
    sessions = {name: create_session(path, config=config) for name, path in placed.items()}
    prompts = heldout_prompts(recipe)
    numbers = measure(manifest, graphs, sessions, tokenizer_fn(model), prompts, recipe.parity.seed,
                      images=image_references(model, manifest, bundle), aggregate=recipe.parity.prompt_aggregate)
    verdict = gate(numbers, recipe.parity, allow_low_parity)
    thresholds = {k: v for k, v in asdict(recipe.parity).items() if k in PARITY_THRESHOLDS}
    manifest["parity"] = {"prompt_set": recipe.parity.heldout_set, "prompts_sha256": prompt_set_hash(prompts),
                          "session_options": config, "thresholds": thresholds, "gate": verdict, **numbers}
    return manifest["parity"]


def gated_parity_stage(model, recipe, manifest: dict, graphs: dict, placed: dict[str, Path], bundle: Path,
                       fp32_held: dict[str, Path], a16_held: dict[str, A16Fallback], allow_low_parity: bool) -> dict:
    """Parity gate with the recipe's two fallbacks, each followed by a fresh measurement:

    1. "keep FP32 where parity requires": a text encoder / VAE decoder below the graph floor goes back to its FP32
       export (``fp32_held``, from ``hold_fp32``), with the measured reason in its entry;
    2. "8-bit activations wherever the gate allows": a graph the sweep put at 8 bits goes back to 16 bits
       (``a16_held``, from ``quantize_stage``) when the whole bundle then fails the gate.

    The gate stays open while a fallback may still change the bundle; the last measurement is gated for real."""
    parity = parity_stage(model, recipe, manifest, graphs, placed,
                          allow_low_parity or bool(a16_held) or bool(fp32_held), bundle)
    if keep_fp32_where_parity_requires(manifest, bundle, fp32_held, placed, parity, recipe.parity.graph_min_sqnr_db):
        parity = parity_stage(model, recipe, manifest, graphs, placed, allow_low_parity or bool(a16_held), bundle)
    elif fp32_held and not a16_held:  # measured with the gate held open for rule 1 only: gate for real now
        parity["gate"] = gate(parity, recipe.parity, allow_low_parity)
    if a16_held and not parity["gate"]["passed"]:
        apply_fallbacks(manifest, bundle, a16_held, parity["gate"]["failures"])
        parity = parity_stage(model, recipe, manifest, graphs, placed, allow_low_parity, bundle)
    return parity
