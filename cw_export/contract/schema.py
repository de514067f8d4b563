"""The manifest as typed records, checked field by field: every field the runtime reads has a type and a range here.

A bundle is untrusted input: its sender can recompute every sha256, so a hash proves nothing about the manifest's
content. ``parse_manifest`` is the one reader: it turns the JSON object into a ``Manifest`` or raises one
``BundleError`` naming the field (``manifest graphs.low_res.inputs[0].shape: ...``), so ``validate`` refuses what
``run`` could not run instead of passing it and letting ``run`` crash. It checks shapes and types, not numerics:
the per-file integrity is ``verify_bundle``'s, the parity numbers are ``validate``'s.

The same records are the build's write side: each stage returns them (``GraphEntry``, ``QuantRecord``,
``ParityRecord``) and ``to_dict`` is their one JSON form, which the bundle writer (``cw_export.bundle.writer``)
assembles into manifest.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import BundleError
from .confine import bundle_parts
from .graphs import CLOCKED, FULL, GRAPHS
from .schedule import SamplingSchedule

DTYPES = ("float32", "float16", "int64", "int32")  # graph I/O element types the runtime feeds and reads
ADAPTOR_KINDS = ("identity", "learned")
MAX_DIM = 1 << 20  # no tensor dimension of a Stable Diffusion graph comes near this; a larger one is hostile
MAX_STEPS = 1000  # diffusion samplers step at most over the training timesteps


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its ONNX name, static shape and element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


WEIGHTS_SCHEME = "per-channel symmetric int"
ACTIVATIONS_SCHEME = "asymmetric, min-max calibrated"


@dataclass(frozen=True)
class QuantRecord:
    """How a graph was quantized (``backend`` None: FP32, with the reason). ``activation_bits`` is 8, 16 or "8+16"
    (mixed per block). ``details`` are the backend's facts about its graph (``QuantizedGraph.details``: opset,
    time_features_bits, encodings_graph, htp_forms, ...); ``sweep`` the a8 sensitivity sweep's numbers;
    ``gate_fallback`` / ``parity_fallback`` what the parity gate reverted, and why."""

    backend: str | None
    activation_bits: int | str | None = None
    weight_bits: int | None = None
    encodings: str | None = None  # AIMET encodings file inside the bundle
    reason: str = ""
    sweep: dict | None = None
    details: dict = field(default_factory=dict)
    gate_fallback: dict | None = None
    parity_fallback: dict | None = None

    @property
    def encodings_graph(self) -> str | None:
        """The graph the AIMET encodings name tensors of (inside the bundle)."""
        return self.details.get("encodings_graph")

    def to_dict(self) -> dict:
        if self.backend is None:
            data = {"backend": None, "reason": self.reason}
            if self.parity_fallback is not None:
                data["parity_fallback"] = self.parity_fallback
            return data
        data = {"backend": self.backend, "weight_bits": self.weight_bits, "weights": WEIGHTS_SCHEME,
                "activation_bits": self.activation_bits, "activations": ACTIVATIONS_SCHEME, "reason": self.reason,
                "sweep": self.sweep, "encodings": self.encodings, "details": self.details}
        if self.gate_fallback is not None:
            data["gate_fallback"] = self.gate_fallback
        return data


@dataclass(frozen=True)
class GraphEntry:
    """One graph file of the bundle and its contract."""

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str
    quantization: QuantRecord | None = None
    external_data: bool = False
    simplified: bool | None = None  # export facts: onnxsim applied, parity of the FP32 export vs torch
    parity_fp32_vs_torch: dict | None = None
    opset: int | None = None  # the default-domain opset of the file as written (absent in older bundles)

    def input(self, name: str) -> TensorSpec:
        return next(s for s in self.inputs if s.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(s for s in self.outputs if s.name == name)

    def with_quantization(self, precision: str, quantization: QuantRecord, external_data: bool | None = None
                          ) -> "GraphEntry":
        """This graph with another deployed form (the quantize stage's result, or a fallback of the gate)."""
        return replace(self, precision=precision, quantization=quantization,
                       external_data=self.external_data if external_data is None else external_data)

    def to_dict(self) -> dict:
        data = {"file": self.file, "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs], "precision": self.precision,
                "simplified": self.simplified, "external_data": self.external_data,
                "parity_fp32_vs_torch": self.parity_fp32_vs_torch}
        if self.opset is not None:
            data["opset"] = self.opset
        if self.quantization is not None:
            data["quantization"] = self.quantization.to_dict()
        return data


@dataclass(frozen=True)
class ParityRecord:
    """The parity gate's record: where and how it measured (held-out prompt set and its hash, session options,
    thresholds), its verdict (``gate``: passed, failures, allowed_by_flag) and the measured numbers
    (``cw_export.parity.measure``: per graph, per step, final latent, image)."""

    prompt_set: str
    prompts_sha256: str
    session_options: dict
    thresholds: dict
    gate: dict
    measured: dict

    @property
    def graphs(self) -> dict:
        return self.measured["graphs"]

    @property
    def passed(self) -> bool:
        return bool(self.gate["passed"])

    def with_gate(self, gate: dict) -> "ParityRecord":
        return replace(self, gate=gate)

    def to_dict(self) -> dict:
        return {"prompt_set": self.prompt_set, "prompts_sha256": self.prompts_sha256,
                "session_options": self.session_options, "thresholds": self.thresholds, "gate": self.gate,
                **self.measured}


@dataclass(frozen=True)
class LoraRecord:
    """One LoRA fused into the model before export (``cw-export --lora FILE [--lora-scale F]``, docs/lora.md): the
    file's name as given, its sha256 (what identifies it) and the scale it was fused at, in the order applied."""

    file: str
    sha256: str
    scale: float

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "scale": self.scale}


@dataclass(frozen=True)
class GraphWiring:
    inputs: dict[str, str]  # graph input -> slot
    outputs: dict[str, str]  # graph output -> slot


@dataclass(frozen=True)
class Wiring:
    """Which slot each graph reads and writes, which graphs run on each step kind (cw_export.contract.graphs)."""

    step_inputs: tuple[str, ...]
    graphs: dict[str, GraphWiring]
    steps: dict[str, tuple[str, ...]]
    clocked_aliases: dict[str, str]
    cache: dict[str, str]
    step_output: str
    text_graph: str
    text_input: str
    decode_graph: str
    decode_input: str
    decode_output: str
    text_input_2: str | None = None  # SDXL: the second tokenizer's ids
    text_empty_negative: str = "encode"  # "zeros": an empty negative prompt's embeddings are zeros (SDXL)


@dataclass(frozen=True)
class Manifest:
    """The typed view of manifest.json; ``raw`` keeps the JSON object for the fields only reports read."""

    schema_version: int
    files: dict[str, tuple[str, int]]  # path -> (sha256, size)
    graphs: dict[str, GraphEntry]
    wiring: Wiring
    schedule: SamplingSchedule  # sampler, steps, clock (the full UNet every clock steps, step 1 always), guidance
    sampler_config: dict
    latent_shape: tuple[int, int, int, int]
    time_features: dict
    tokenizer_folder: str
    model_max_length: int
    adaptor_kind: str
    parity: ParityRecord | None = None  # quantized bundles: the build's parity gate
    tokenizer_2_folder: str | None = None  # SDXL: the second tokenizer (wiring.text.input_2)
    add_time_features: dict | None = None  # SDXL: high_res_in's added time features (fixed time ids + sinusoid)
    loras: tuple[LoraRecord, ...] = ()  # LoRAs fused into the model at build time (key absent: none)
    raw: dict = field(repr=False, compare=False, default_factory=dict)


class _Reader:
    """Reads one JSON object with a path for messages: every failure is one BundleError naming the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, what: str):
        raise BundleError(f"{self.where}: manifest {path}: {what}")

    def obj(self, value, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, got {type(value).__name__}")
        return value

    def key(self, data: dict, key: str, path: str):
        if key not in data:
            self.fail(f"{path}.{key}" if path else key, "missing")
        return data[key]

    def text(self, value, path: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, f"must be a non-empty string, got {value!r:.60}")
        if choices is not None and value not in choices:
            self.fail(path, f"{value!r:.60} is not one of {', '.join(choices)}")
        return value

    def integer(self, value, path: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(path, f"must be an integer in [{low}, {high}], got {value!r:.60}")
        return value

    def number(self, value, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(path, f"must be a finite number, got {value!r:.60}")
        return float(value)

    def strings(self, value, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {type(value).__name__}")
        return tuple(self.text(v, f"{path}[{i}]") for i, v in enumerate(value))

    def mapping(self, value, path: str) -> dict[str, str]:
        data = self.obj(value, path)
        return {self.text(k, f"{path} key"): self.text(v, f"{path}.{k}") for k, v in data.items()}

    def inside(self, value, path: str) -> str:
        """A relative POSIX path that stays inside the bundle (``confine.bundle_parts``: the rule every path field
        of the manifest goes through; the files themselves are opened through ``confine.open_inside``)."""
        rel = self.text(value, path)
        if bundle_parts(rel) is None:
            self.fail(path, f"{rel!r:.80} is not a path inside the bundle")
        return rel


def _tensor(r: _Reader, value, path: str) -> TensorSpec:
    data = r.obj(value, path)
    shape = r.key(data, "shape", path)
    if not isinstance(shape, list) or not shape:
        r.fail(f"{path}.shape", f"must be a non-empty list of dimensions, got {shape!r:.60}")
    dims = tuple(r.integer(d, f"{path}.shape[{i}]", 1, MAX_DIM) for i, d in enumerate(shape))
    return TensorSpec(r.text(r.key(data, "name", path), f"{path}.name"), dims,
                      r.text(r.key(data, "dtype", path), f"{path}.dtype", DTYPES))


def _quantization(r: _Reader, value, path: str) -> QuantRecord | None:
    if value is None:
        return None
    data = r.obj(value, path)
    details = data.get("details") or {}
    r.obj(details, f"{path}.details")
    optional = {}
    for key, source in (("encodings", data), ("encodings_graph", details)):
        if source.get(key) is not None:
            optional[key] = r.inside(source[key], f"{path}.{'details.' if source is details else ''}{key}")
    bits = data.get("activation_bits")
    if bits is not None and bits not in (8, 16, "8+16"):
        r.fail(f"{path}.activation_bits", f"must be 8, 16 or '8+16', got {bits!r:.20}")
    backend = data.get("backend")
    return QuantRecord(None if backend is None else r.text(backend, f"{path}.backend"), bits, data.get("weight_bits"),
                       optional.get("encodings"), str(data.get("reason", "")), data.get("sweep"), details,
                       data.get("gate_fallback"), data.get("parity_fallback"))


def _graph(r: _Reader, name: str, value) -> GraphEntry:
    path = f"graphs.{name}"
    data = r.obj(value, path)
    specs = {}
    for kind in ("inputs", "outputs"):
        items = r.key(data, kind, path)
        if not isinstance(items, list) or not items:
            r.fail(f"{path}.{kind}", "must be a non-empty list")
        specs[kind] = tuple(_tensor(r, v, f"{path}.{kind}[{i}]") for i, v in enumerate(items))
    return GraphEntry(name, r.inside(r.key(data, "file", path), f"{path}.file"), specs["inputs"], specs["outputs"],
                      r.text(data.get("precision", "fp32"), f"{path}.precision"),
                      _quantization(r, data.get("quantization"), f"{path}.quantization"),
                      data.get("external_data") is True, data.get("simplified"), data.get("parity_fp32_vs_torch"),
                      None if data.get("opset") is None else r.integer(data["opset"], f"{path}.opset", 1, 1000))


def _wiring(r: _Reader, value, graphs: dict[str, GraphEntry]) -> Wiring:
    data = r.obj(value, "wiring")
    wired = {}
    for name, spec in r.obj(r.key(data, "graphs", "wiring"), "wiring.graphs").items():
        path = f"wiring.graphs.{name}"
        if name not in graphs:
            r.fail(path, "names a graph the manifest does not list")
        spec = r.obj(spec, path)
        wiring = GraphWiring(r.mapping(r.key(spec, "inputs", path), f"{path}.inputs"),
                             r.mapping(r.key(spec, "outputs", path), f"{path}.outputs"))
        names = {"inputs": {s.name for s in graphs[name].inputs}, "outputs": {s.name for s in graphs[name].outputs}}
        for kind in ("inputs", "outputs"):
            unknown = set(getattr(wiring, kind)) - names[kind]
            if unknown:
                r.fail(f"{path}.{kind}", f"{sorted(unknown)} are not {kind} of graph {name}")
        wired[name] = wiring
    steps_data = r.obj(r.key(data, "steps", "wiring"), "wiring.steps")
    steps = {}
    for kind in (FULL, CLOCKED):
        order = r.strings(r.key(steps_data, kind, "wiring.steps"), f"wiring.steps.{kind}")
        for graph in order:
            if graph not in wired:
                r.fail(f"wiring.steps.{kind}", f"runs graph {graph!r:.40}, which has no wiring")
        steps[kind] = order
    text = r.obj(r.key(data, "text", "wiring"), "wiring.text")
    decode = r.obj(r.key(data, "decode", "wiring"), "wiring.decode")
    result = Wiring(r.strings(r.key(data, "step_inputs", "wiring"), "wiring.step_inputs"), wired, steps,
                    r.mapping(r.key(data, "clocked_aliases", "wiring"), "wiring.clocked_aliases"),
                    r.mapping(r.key(data, "cache", "wiring"), "wiring.cache"),
                    r.text(r.key(data, "step_output", "wiring"), "wiring.step_output"),
                    r.text(r.key(text, "graph", "wiring.text"), "wiring.text.graph"),
                    r.text(r.key(text, "input", "wiring.text"), "wiring.text.input"),
                    r.text(r.key(decode, "graph", "wiring.decode"), "wiring.decode.graph"),
                    r.text(r.key(decode, "input", "wiring.decode"), "wiring.decode.input"),
                    r.text(r.key(decode, "output", "wiring.decode"), "wiring.decode.output"),
                    None if "input_2" not in text else r.text(text["input_2"], "wiring.text.input_2"),
                    r.text(text.get("empty_negative", "encode"), "wiring.text.empty_negative", EMPTY_NEGATIVE))
    for path, graph in (("wiring.text.graph", result.text_graph), ("wiring.decode.graph", result.decode_graph)):
        if graph not in graphs:
            r.fail(path, f"names graph {graph!r:.40}, which the manifest does not list")
    return result


EMPTY_NEGATIVE = ("encode", "zeros")
MAX_TIME_IDS = 16


def _time_features(r: _Reader, value, path: str = "time_features") -> dict:
    data = r.obj(value, path)
    r.text(r.key(data, "function", path), f"{path}.function", ("sinusoidal",))
    r.integer(r.key(data, "dim", path), f"{path}.dim", 2, 1 << 16)
    for key in ("max_period", "downscale_freq_shift", "scale"):
        r.number(r.key(data, key, path), f"{path}.{key}")
    if not isinstance(r.key(data, "flip_sin_to_cos", path), bool):
        r.fail(f"{path}.flip_sin_to_cos", "must be true or false")
    if data["dim"] // 2 == data["downscale_freq_shift"]:
        r.fail(f"{path}.downscale_freq_shift", "equals dim / 2 (the frequencies would divide by zero)")
    return data


def _add_time_features(r: _Reader, value, wiring: Wiring) -> dict | None:
    """SDXL's added time features: a time-feature spec plus its fixed ids; present exactly when the wiring's step
    inputs name ``add_time_features``."""
    wired = "add_time_features" in wiring.step_inputs
    if value is None:
        if wired:
            r.fail("add_time_features", "missing (wiring.step_inputs names add_time_features)")
        return None
    if not wired:
        r.fail("add_time_features", "present, but wiring.step_inputs does not name add_time_features")
    data = _time_features(r, value, "add_time_features")
    ids = r.key(data, "time_ids", "add_time_features")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_TIME_IDS:
        r.fail("add_time_features.time_ids", f"must be a list of 1 to {MAX_TIME_IDS} numbers, got {ids!r:.60}")
    for i, v in enumerate(ids):
        r.number(v, f"add_time_features.time_ids[{i}]")
    return data


PARITY_FIELDS = ("prompt_set", "prompts_sha256", "session_options", "thresholds", "gate")


def _parity(r: _Reader, value) -> ParityRecord | None:
    """The parity record's frame (its numbers are validate's to re-measure, not this reader's to judge)."""
    if value is None:
        return None
    data = r.obj(value, "parity")
    for key in PARITY_FIELDS:
        r.key(data, key, "parity")
    gate = r.obj(data["gate"], "parity.gate")
    if not isinstance(r.key(gate, "passed", "parity.gate"), bool):
        r.fail("parity.gate.passed", "must be true or false")
    r.obj(r.key(data, "graphs", "parity"), "parity.graphs")
    return ParityRecord(r.text(data["prompt_set"], "parity.prompt_set"),
                        r.text(data["prompts_sha256"], "parity.prompts_sha256"),
                        r.obj(data["session_options"], "parity.session_options"),
                        r.obj(data["thresholds"], "parity.thresholds"), gate,
                        {k: v for k, v in data.items() if k not in PARITY_FIELDS})


MAX_LORAS = 64


def _loras(r: _Reader, value) -> tuple[LoraRecord, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_LORAS:
        r.fail("loras", f"must be a list of at most {MAX_LORAS} records, got {value!r:.60}")
    records = []
    for i, entry in enumerate(value):
        path = f"loras[{i}]"
        data = r.obj(entry, path)
        unknown = sorted(set(data) - {"file", "sha256", "scale"})
        if unknown:
            r.fail(f"{path}.{unknown[0]:.40}", "is not a field of a LoRA record (file, sha256, scale)")
        digest = r.text(r.key(data, "sha256", path), f"{path}.sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            r.fail(f"{path}.sha256", "must be 64 lower-case hex digits")
        records.append(LoraRecord(r.text(r.key(data, "file", path), f"{path}.file"), digest,
                                  r.number(r.key(data, "scale", path), f"{path}.scale")))
    return tuple(records)


def parse_manifest(data: object, where: str = "bundle") -> Manifest:
    """The typed manifest of ``data`` (manifest.json's JSON object); a BundleError names the first bad field."""
    r = _Reader(where)
    data = r.obj(data, "(top level)")
    files = {}
    for rel, entry in r.obj(r.key(data, "files", ""), "files").items():
        path = f"files[{rel!r:.60}]"
        r.inside(rel, path)
        entry = r.obj(entry, path)
        digest = r.text(entry.get("sha256"), f"{path}.sha256")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            r.fail(f"{path}.sha256", "must be 64 lower-case hex digits")
        files[rel] = (digest, r.integer(entry.get("size"), f"{path}.size", 0, 1 << 50))
    graphs = {}
    for name, entry in r.obj(r.key(data, "graphs", ""), "graphs").items():
        if name not in GRAPHS:
            r.fail(f"graphs.{name:.40}", f"is not a graph a bundle can hold ({', '.join(GRAPHS)})")
        graphs[name] = _graph(r, name, entry)
    schedule = r.obj(r.key(data, "schedule", ""), "schedule")
    steps = r.integer(r.key(schedule, "steps", "schedule"), "schedule.steps", 1, MAX_STEPS)
    clock = r.integer(r.key(schedule, "clock", "schedule"), "schedule.clock", 1, steps)
    sampler = r.obj(r.key(data, "sampler", ""), "sampler")
    latent = r.obj(r.key(data, "latent", ""), "latent")
    shape = r.key(latent, "shape", "latent")
    if not isinstance(shape, list) or len(shape) != 4 or shape[:1] != [1]:
        r.fail("latent.shape", f"must be [1, channels, height, width], got {shape!r:.60}")
    latent_shape = tuple(r.integer(d, f"latent.shape[{i}]", 1, MAX_DIM) for i, d in enumerate(shape))
    for soc, per_graph in r.obj(data.get("context_binaries", {}), "context_binaries").items():  # QNN EPContext
        for graph, entry in r.obj(per_graph, f"context_binaries.{soc}").items():
            path = f"context_binaries.{soc}.{graph}"
            for key in ("model", "binary"):
                r.inside(r.key(r.obj(entry, path), key, path), f"{path}.{key}")
    tokenizer = r.obj(r.key(data, "tokenizer", ""), "tokenizer")
    adaptor = r.obj(r.key(data, "adaptor", ""), "adaptor")
    wiring = _wiring(r, r.key(data, "wiring", ""), graphs)
    tokenizer_2 = None
    if wiring.text_input_2 is not None:  # SDXL's second tokenizer
        second = r.obj(r.key(data, "tokenizer_2", ""), "tokenizer_2")
        tokenizer_2 = r.inside(r.key(second, "folder", "tokenizer_2"), "tokenizer_2.folder")
        r.integer(r.key(second, "model_max_length", "tokenizer_2"), "tokenizer_2.model_max_length", 2, 4096)
    return Manifest(
        schema_version=r.integer(r.key(data, "schema_version", ""), "schema_version", 0, 1 << 30),
        files=files, graphs=graphs, wiring=wiring,
        schedule=SamplingSchedule(r.text(r.key(sampler, "name", "sampler"), "sampler.name"), steps, clock,
                                  r.number(r.key(data, "guidance_scale", ""), "guidance_scale")),
        sampler_config=r.obj(r.key(sampler, "config", "sampler"), "sampler.config"),
        latent_shape=latent_shape,
        time_features=_time_features(r, r.key(data, "time_features", "")),
        tokenizer_folder=r.inside(r.key(tokenizer, "folder", "tokenizer"), "tokenizer.folder"),
        model_max_length=r.integer(r.key(tokenizer, "model_max_length", "tokenizer"), "tokenizer.model_max_length",
                                   2, 4096),
        adaptor_kind=r.text(r.key(adaptor, "kind", "adaptor"), "adaptor.kind", ADAPTOR_KINDS),
        parity=_parity(r, data.get("parity")), loras=_loras(r, data.get("loras")),
        tokenizer_2_folder=tokenizer_2, add_time_features=_add_time_features(r, data.get("add_time_features"), wiring),
        raw=data)
