"""Targets as data: versioned TOML recipes under ``recipes/`` checked against a strict schema.

Every section is a frozen dataclass; unknown keys are rejected with the list of valid ones (a typo must never be
silently ignored), and every field's comment says why it exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .contract.schedule import SamplingSchedule
from .errors import RecipeError
from .resources import data_dir

RECIPE_SCHEMA_VERSION = 1
RECIPES_DIR = data_dir("recipes")
DEFAULT_TARGET = "snapdragon-int8"  # the main job: an INT8 bundle for the Snapdragon NPU, parity-gated


@dataclass(frozen=True)
class BuildSection:
    steps: int = 8  # paper's headline setting: 8 DPM++ steps
    clock: int = 2  # a full UNet every `clock` steps; 2 is the paper's default for <= 8 steps
    guidance_scale: float = 7.5  # classifier-free guidance; graphs are built for batch 2 (uncond, cond)
    sampler: str = "dpmpp_2m"  # the paper's deployment sampler; the adaptor is tied to it
    adaptor: str = "identity"  # identity (paper baseline) or learned (model-step distillation)
    height: int = 0  # image height in pixels; 0 = the model's native size
    width: int = 0  # image width in pixels; 0 = the model's native size

    @property
    def schedule(self) -> SamplingSchedule:
        return SamplingSchedule(self.sampler, self.steps, self.clock, float(self.guidance_scale))


@dataclass(frozen=True)
class ExportSection:
    opset: int = 17  # TorchScript exporter is clean for diffusers UNets at 17 (PLATFORM.md)
    simplify: bool = True  # onnxsim folds shape arithmetic that mobile runtimes handle poorly


@dataclass(frozen=True)
class QuantizationSection:
    backend: str = "none"  # none (FP32), aimet or ort (cw_export.quantize registry); both use the same calibration
    weight_bits: int = 8  # per-channel symmetric INT8 weights: what the Hexagon NPU runs natively (only 8 is supported)
    activation_bits: dict = field(default_factory=dict)  # graph name -> 8 or 16; a graph not named gets 16 (safe)
    a8_candidates: list = field(default_factory=list)  # graphs tried at 8-bit activations (per-graph sensitivity sweep)
    a8_min_sqnr_db: float = 0.0  # a candidate keeps 8-bit activations only if its SQNR on calibration data is >= this
    a8_min_guidance_sqnr_db: float = 0.0  # ... and the SQNR of its outputs' cond - uncond difference >= this
    a8_layer_sweep: str = "off"  # off, block, layer or mac: a candidate that fails whole gets 8 bits per group
    a8_range: str = "minmax"  # how 8-bit activation ranges are set: minmax, or percentile (clips the rare outliers)
    split_concat_convs: bool = False  # a Conv reading a channel Concat becomes one Conv per input (split shortcut,
    # cw_export.quantize.split_concat): each input gets its own activation encoding; ort backend
    a8_mac_order: str = "margin"  # MAC sweep order: margin (least harmful first) or macs (most MACs per noise budget)
    a8_gate_guidance_tolerance: float = 0.0  # the parity gate backs a MAC mix off until the guidance ratio is within
    # 1 +/- this (tighter than [parity]'s tolerance: a margin for the QNN HTP's own numerics); 0: the gate's own
    calibration_set: str = "default"  # builtin prompt set name or a prompt file (--calibration FILE overrides it)
    calibration_prompts: int = 16  # prompts taken from the set: budget of FP32 trajectories (--calibration-prompts)
    calibration_samples: int = 64  # cap of stored input samples per graph, stratified across the steps it runs at
    calibration_seed: int = 0  # prompt k starts from unit noise seeded with calibration_seed + k (recorded)
    ort_optimization: str = "all"  # onnxruntime level (disable_all/basic/extended/all) for parity and the runtime
    ort_disabled_optimizers: list = field(default_factory=list)  # onnxruntime optimizers switched off (PLATFORM.md)


@dataclass(frozen=True)
class ParitySection:
    graph_max_rel_diff: float = 1e-4  # ORT vs torch per FP32 graph, relative to max|reference|
    graph_min_sqnr_db: float = 0.0  # per quantized graph (quantized ORT vs FP32 torch, same inputs); 0 disables
    step_min_psnr_db: float = 0.0  # latent PSNR at every step, quantized vs FP32 clocked trajectory; 0 disables
    final_latent_min_psnr_db: float = 0.0  # quantized clocked bundle vs FP32 clocked torch; 0 disables
    guidance_ratio_tolerance: float = 0.0  # max |std(cond-uncond) quantized / FP32 - 1| at any step; 0 disables
    image_min_psnr_db: float = 0.0  # decoded image, quantized bundle vs FP32 clockwork (uint8 PSNR); 0 disables
    image_min_ssim: float = 0.0  # ... and its SSIM; 0 disables (vs the unclocked pipeline: recorded, not gated)
    prompt_aggregate: str = "pooled"  # trajectory/image numbers over prompts: "pooled" MSE or "median" (parity.AGGREGATES)
    heldout_set: str = "heldout"  # prompts parity is measured on: never the calibration prompts
    heldout_prompts: int = 4  # how many held-out prompts (each one FP32 + one quantized trajectory)
    seed: int = 1000  # held-out prompt k starts from unit noise seeded with seed + k (recorded)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    schema_version: int
    build: BuildSection
    export: ExportSection
    quantization: QuantizationSection
    parity: ParitySection
    source_sha256: str

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source_sha256")
        return data

    def with_build(self, **overrides) -> "Recipe":
        """A copy with CLI overrides applied (None values mean 'keep the recipe's value')."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, build=dataclasses.replace(self.build, **changes))

    def with_quantization(self, **overrides) -> "Recipe":
        """A copy with quantization overrides from the CLI (None values mean 'keep the recipe's value'). A backend
        other than ort drops the recipe's ``split_concat_convs`` unless it is given too: that rewrite is of the ONNX
        graph the ort backend quantizes (the aimet backend quantizes torch modules; the manifest records the
        settings used)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if changes.get("backend", "ort") != "ort" and "split_concat_convs" not in changes:
            changes["split_concat_convs"] = False
        return dataclasses.replace(self, quantization=dataclasses.replace(self.quantization, **changes))

    def with_parity(self, **overrides) -> "Recipe":
        """A copy with parity overrides from the CLI (None values mean 'keep the recipe's value')."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, parity=dataclasses.replace(self.parity, **changes))

    @property
    def quantized(self) -> bool:
        """Whether this target quantizes graphs (and so runs the calibrate -> quantize -> parity stages)."""
        return self.quantization.backend != "none"


SECTIONS = {"build": BuildSection, "export": ExportSection, "quantization": QuantizationSection,
            "parity": ParitySection}
TOP_LEVEL = {"name", "description", "schema_version", *SECTIONS}


PROMPT_AGGREGATES = ("median", "pooled")  # cw_export.parity.measure.AGGREGATES (kept here: recipes load without numpy)
# recipes/ also holds tables that are not targets (socs.toml: cw_export.quantize.qnn.context_binaries)
DATA_FILES = {"socs"}


def available_targets() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml") if p.stem not in DATA_FILES)


def _section(name: str, cls, data: object, source: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: [{name}] must be a table")
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {unknown} in [{name}]; valid keys: {sorted(valid)}")
    for key, value in data.items():
        default = valid[key].default if valid[key].default is not dataclasses.MISSING else valid[key].default_factory()
        if type(default) is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if type(value) is not type(default):
            raise RecipeError(f"{source}: [{name}] {key} must be {type(default).__name__}, got {value!r}")
    return cls(**data)


def parse_recipe(text: str, source: str) -> Recipe:
    """Parse and validate recipe TOML text; ``source`` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(TOP_LEVEL)}")
    version = data.get("schema_version")
    if version != RECIPE_SCHEMA_VERSION:
        raise RecipeError(f"{source}: schema_version {version!r} is not supported (expected {RECIPE_SCHEMA_VERSION})")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise RecipeError(f"{source}: '{key}' must be a non-empty string")
    sections = {name: _section(name, cls, data.get(name, {}), source) for name, cls in SECTIONS.items()}
    if sections["parity"].prompt_aggregate not in PROMPT_AGGREGATES:
        raise RecipeError(f"{source}: [parity] prompt_aggregate must be one of {sorted(PROMPT_AGGREGATES)}, "
                          f"got {sections['parity'].prompt_aggregate!r}")
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return Recipe(name=data["name"], description=data["description"], schema_version=version,
                  source_sha256=digest, **sections)


def load_recipe(target: str) -> Recipe:
    """A target name from ``recipes/`` or a path to a recipe file."""
    path = Path(target)
    if not (path.suffix == ".toml" and path.is_file()):
        path = RECIPES_DIR / f"{target}.toml"
    if not path.is_file() or (path.parent == RECIPES_DIR and path.stem in DATA_FILES):
        raise RecipeError(f"unknown target '{target}'; available: {', '.join(available_targets())}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    return parse_recipe(text, str(path.name))
