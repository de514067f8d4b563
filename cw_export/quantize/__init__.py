"""Quantize stage: FP32 graph + calibration data -> QDQ ONNX graph (+ encodings), through a named backend.

Backends live in a plain dict registry and are imported only when used (aimet pulls in torchvision and is slow to
import). Every backend implements ``quantize_graph(job, settings, out_dir) -> QuantizedGraph`` and reads the same
``CalibrationData`` (calibrate stage):

    aimet  aimet-torch QuantizationSimModel on the torch graph: per-channel symmetric INT8 weights, compute_encodings,
           ONNX + AIMET encodings JSON (for QNN converters) and a QDQ ONNX (for onnxruntime)
    ort    onnxruntime.quantization static QDQ with its QNN configuration helper on the FP32 ONNX graph
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ..contract.graphs import IMAGE_GRAPHS, LOOP_GRAPHS
from ..errors import RecipeError

BACKENDS: dict[str, str] = {
    "aimet": "cw_export.quantize.aimet_backend",
    "ort": "cw_export.quantize.ort_backend",
}
ACTIVATION_BITS = (8, 16)
WEIGHT_BITS = (8,)
TIME_FEATURES_INPUT = "time_features"  # high_res_in's sinusoidal timestep embedding (cw_export.split)
TIME_FEATURES_BITS = 16  # quantized at 16 bits even in an 8-bit graph: it carries the step index for every layer
LAYER_SWEEPS = ("off", "block", "layer", "mac")  # granularity of the per-layer a8 sweep (cw_export.quantize.mixed)
A8_RANGES = ("minmax", "percentile")  # range setting of 8-bit activations (16-bit ones are always min-max)
A8_PERCENTILE = 99.99  # percentile of |activation| an 8-bit range keeps (onnxruntime's histogram calibrator)
# LOOP_GRAPHS (the denoising loop) are always quantized; IMAGE_GRAPHS (once per image) only where the recipe names them
QUANTIZED_GRAPHS = LOOP_GRAPHS + IMAGE_GRAPHS  # every graph a recipe may quantize
FP32_REASONS = {  # why a graph the recipe does not quantize stays FP32 (recorded per graph in the manifest)
    "text_encoder": "FP32: the recipe's activation_bits does not name text_encoder (the once-per-image graphs are "
                    "quantized only where a recipe asks; the snapdragon recipes ask for w8a16)",
    "vae_decoder": "FP32: the recipe's activation_bits does not name vae_decoder (the once-per-image graphs are "
                   "quantized only where a recipe asks; the snapdragon recipes ask for w8a16)",
}


@dataclass
class GraphJob:
    """One graph to quantize: its FP32 ONNX file, the torch module it was exported from, and its calibration data."""

    name: str
    fp32_onnx: Path
    module: object  # torch.nn.Module, called positionally in ``input_names`` order
    input_names: list[str]
    output_names: list[str]
    calibration: object  # cw_export.calibrate.collect.CalibrationData
    activation_bits: int
    # a mixed graph (16-bit default): tensor -> (scale, zero point) of the 8-bit quantization it takes instead, as
    # the a8 sweep chose it (cw_export.quantize.mixed); the backend places the conversions the NPU needs
    a8_tensors: dict = field(default_factory=dict)


@dataclass
class QuantizedGraph:
    """What a backend produced: the QDQ ONNX graph to deploy, optional encodings file, facts for the manifest."""

    file: Path
    encodings: Path | None = None
    details: dict = field(default_factory=dict)


def get_backend(name: str):
    """The backend module registered as ``name``; an unknown name lists the valid ones."""
    if name not in BACKENDS:
        raise RecipeError(f"quantization backend '{name}' unknown; available: {', '.join(sorted(BACKENDS))}")
    return importlib.import_module(BACKENDS[name])


A8_MAC_ORDERS = ("margin", "macs")  # quantize.mixed.sweep: least harmful first, or most MACs per noise budget


def check_settings(settings) -> None:
    """Reject recipe quantization settings no backend can honour, before any heavy work."""
    if settings.backend == "none":
        return
    if settings.backend not in BACKENDS:
        raise RecipeError(f"quantization backend '{settings.backend}' unknown; "
                          f"available: none, {', '.join(sorted(BACKENDS))}")
    if settings.weight_bits not in WEIGHT_BITS:
        raise RecipeError(f"[quantization] weight_bits {settings.weight_bits} unsupported; supported: {WEIGHT_BITS}")
    for graph, bits in settings.activation_bits.items():
        if graph not in QUANTIZED_GRAPHS:
            raise RecipeError(f"[quantization] activation_bits names unknown graph '{graph}'; "
                              f"quantized graphs: {', '.join(QUANTIZED_GRAPHS)}")
        if isinstance(bits, bool) or bits not in ACTIVATION_BITS:
            raise RecipeError(f"[quantization] activation_bits.{graph} = {bits!r}; must be one of {ACTIVATION_BITS}")
    for graph in settings.a8_candidates:
        if graph not in LOOP_GRAPHS:
            known = "graph the a8 sweep does not cover" if graph in IMAGE_GRAPHS else "unknown graph"
            raise RecipeError(f"[quantization] a8_candidates names {known} '{graph}'; "
                              f"sweep graphs: {', '.join(LOOP_GRAPHS)}")
    if settings.a8_layer_sweep not in LAYER_SWEEPS:
        raise RecipeError(f"[quantization] a8_layer_sweep = {settings.a8_layer_sweep!r}; "
                          f"must be one of {', '.join(LAYER_SWEEPS)}")
    if settings.a8_range not in A8_RANGES:
        raise RecipeError(f"[quantization] a8_range = {settings.a8_range!r}; must be one of {', '.join(A8_RANGES)}")
    if not isinstance(settings.split_concat_convs, bool):
        raise RecipeError(f"[quantization] split_concat_convs = {settings.split_concat_convs!r}; must be true or false")
    if settings.split_concat_convs and settings.backend != "ort":
        raise RecipeError("[quantization] split_concat_convs needs backend = \"ort\" (the aimet backend quantizes the "
                          "torch modules, not the ONNX graph it rewrites)")
    if settings.a8_mac_order not in A8_MAC_ORDERS:
        raise RecipeError(f"[quantization] a8_mac_order = {settings.a8_mac_order!r}; "
                          f"must be one of {', '.join(A8_MAC_ORDERS)}")
    tolerance = settings.a8_gate_guidance_tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise RecipeError(f"[quantization] a8_gate_guidance_tolerance = {tolerance!r}; must be a number in [0, 1)")
    for name in ("calibration_prompts", "calibration_samples"):
        if getattr(settings, name) < 1:
            raise RecipeError(f"[quantization] {name} must be >= 1, got {getattr(settings, name)}")


def graphs_to_quantize(settings, graphs) -> list[str]:
    """The graphs of a bundle (``graphs``: its names) this recipe quantizes: every denoising-loop graph, and a
    once-per-image graph only where ``activation_bits`` names it (so a recipe written before they could be
    quantized keeps them FP32)."""
    return [g for g in QUANTIZED_GRAPHS if g in graphs and (g in LOOP_GRAPHS or g in settings.activation_bits)]


def planned_bits(settings, graph: str) -> int:
    """Activation bits before the sweep: the recipe's per-graph value, else 16."""
    return int(settings.activation_bits.get(graph, 16))
