"""Trajectory-driven calibration data (calibrate stage): every graph's real inputs at the steps where it runs.

Steps:
  1. take ``calibration_prompts`` prompts of the calibration set; prompt k starts from unit noise seeded seed + k
  2. run the FP32 clocked pipeline exactly as the bundle will (the runtime's own loop, sampler table, clock,
     guidance and adaptor; batch [uncond, cond]) with the torch graphs, and at each step read every graph's inputs
     from the step's slots, so ``low_res`` sees full-step inputs and the adaptor clocked-step inputs
  3. keep at most ``calibration_samples`` samples per graph, stratified over the steps that graph runs at, and write
     each kept sample to disk as it is produced (memory stays at one trajectory); the once-per-image graphs get one
     sample per prompt: the text encoder its token ids ([uncond, cond], which also give the trajectory its
     embeddings through the FP32 text encoder graph), the VAE decoder the trajectory's final latents
  4. write ``meta.json`` last and rename the folder into the cache: a later build with the same settings (model
     hash, prompts hash, steps, clock, guidance, sampler, adaptor, shapes, seeds, cap) reuses it

The data comes back as ``CalibrationData`` readers (``get_next()`` -> dict of named arrays or None, the interface
onnxruntime's quantizer takes); aimet reads them through a small adapter in its backend.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..cache import META_NAME, cache_root, cached_entry
from ..contract.schedule import SamplingSchedule, schedule_fields, step_kinds
from ..runtime.noise import seeded_noise
from ..runtime.pipeline import BundleRunner

CALIBRATION_FORMAT = 3  # bump when the on-disk layout or the capture changes: old cache entries are then ignored
# (2: text_encoder token ids and vae_decoder final latents are captured too)

Tokenize = Callable[[str], dict]  # prompt -> the text encoder graph's token-id feeds (int64 [2, 77] each; [uncond, cond])


def graph_feeds(manifest: dict, graph: str, slots: dict) -> dict[str, np.ndarray]:
    """The inputs ``graph`` read at a step, from the step's slots (each slot is written once per step)."""
    spec = manifest["wiring"]["graphs"][graph]
    return {name: slots[slot] for name, slot in spec["inputs"].items()}


def graph_outputs(manifest: dict, graph: str, slots: dict) -> dict[str, np.ndarray]:
    spec = manifest["wiring"]["graphs"][graph]
    return {name: slots[slot] for name, slot in spec["outputs"].items()}


def unit_noise(shape: list[int], seed: int) -> np.ndarray:
    """The initial unit Gaussian noise of one trajectory (``cw-export run --seed``'s draw)."""
    return seeded_noise(shape, seed)


# -- which samples to keep -----------------------------------------------------------------------------------------
def graph_steps(manifest: dict, steps: int, clock: int) -> dict[str, list[int]]:
    """For each graph of the denoising loop, the 0-based step indices at which the runtime runs it."""
    kinds = step_kinds(steps, clock)
    order = manifest["wiring"]["steps"]
    in_loop = sorted({g for graphs in order.values() for g in graphs})
    return {g: [i for i, kind in enumerate(kinds) if g in order[kind]] for g in in_loop}


def stratified_selection(num_prompts: int, steps: list[int], cap: int) -> set[tuple[int, int]]:
    """(prompt, step) pairs to keep: every step gets an equal share of ``cap``, the remainder going to steps spread
    evenly over the schedule (with fewer samples than steps, e.g. 4 of 8, the kept steps span it: 0, 2, 4, 6, never
    just the first four, whose activation ranges miss the late steps'), and within a step the prompts are spread
    evenly, offset per step so that different steps see different prompts."""
    pairs = {(p, s) for p in range(num_prompts) for s in steps}
    if len(pairs) <= cap:
        return pairs
    base, extra = divmod(cap, len(steps))
    keep = set()
    for j, step in enumerate(steps):
        quota = min(num_prompts, base + (1 if (j * extra) % len(steps) < extra else 0))
        for k in range(quota):
            keep.add(((k * num_prompts // quota + j) % num_prompts, step))
    return keep


# -- settings and cache key ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSettings:
    """Everything the captured data depends on; its hash is the cache key (and it is recorded in the manifest)."""

    model_sha256: str
    adaptor: str
    adaptor_sha256: str | None
    prompts_sha256: str
    num_prompts: int
    schedule: SamplingSchedule
    latent_shape: tuple[int, ...]
    input_shapes: dict  # graph -> {input name: shape}
    seed: int
    samples_per_graph: int
    format: int = CALIBRATION_FORMAT

    def key(self) -> str:
        return hashlib.sha256(json.dumps(schedule_fields(self), sort_keys=True).encode()).hexdigest()[:32]


def settings_for(manifest: dict, model_sha256: str, prompts: list[str], seed: int, samples_per_graph: int,
                 adaptor_sha256: str | None = None) -> CalibrationSettings:
    from ..prompts import prompt_set_hash

    shapes = {g: {s["name"]: list(s["shape"]) for s in spec["inputs"]}
              for g, spec in sorted(manifest["graphs"].items())}
    return CalibrationSettings(
        model_sha256=model_sha256, adaptor=manifest["adaptor"]["kind"], adaptor_sha256=adaptor_sha256,
        prompts_sha256=prompt_set_hash(prompts), num_prompts=len(prompts),
        schedule=SamplingSchedule.of_manifest(manifest), latent_shape=tuple(manifest["latent"]["shape"]),
        input_shapes=shapes, seed=seed, samples_per_graph=samples_per_graph)


# -- reading -------------------------------------------------------------------------------------------------------
class CalibrationData:
    """One graph's samples: ``get_next()`` returns {input name: array} or None (onnxruntime's CalibrationDataReader
    protocol); ``rewind()`` starts over; iterating yields every sample once. Samples are loaded from disk lazily."""

    def __init__(self, graph: str, files: list[Path], steps: list[int]) -> None:
        self.graph = graph
        self.files = list(files)
        self.steps = list(steps)  # the step index of each sample, for tests and the manifest
        self._next = 0

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for path in self.files:
            yield self.load(path)

    @staticmethod
    def load(path: Path) -> dict[str, np.ndarray]:
        with np.load(path) as data:
            return {name: data[name] for name in data.files}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.files):
            return None
        self._next += 1
        return self.load(self.files[self._next - 1])

    def rewind(self) -> None:
        self._next = 0

    def subset(self, count: int) -> "CalibrationData":
        """An evenly spaced subset of at most ``count`` samples (for the sensitivity sweep)."""
        if count >= len(self.files):
            return CalibrationData(self.graph, self.files, self.steps)
        idx = [i * len(self.files) // count for i in range(count)]
        return CalibrationData(self.graph, [self.files[i] for i in idx], [self.steps[i] for i in idx])


@dataclass
class CalibrationSet:
    """Per-graph readers plus the provenance recorded in the manifest."""

    folder: Path
    settings: CalibrationSettings
    graphs: dict[str, CalibrationData]
    reused: bool

    def provenance(self) -> dict:
        s = self.settings
        return {"cache_key": s.key(), "prompts_sha256": s.prompts_sha256,  # no run-dependent fields: builds are byte-reproducible
                "num_prompts": s.num_prompts, "seeds": [s.seed + k for k in range(s.num_prompts)],
                **s.schedule.as_fields(),
                "adaptor": s.adaptor, "samples_per_graph_cap": s.samples_per_graph,
                "samples": {g: {"count": len(d), "steps": sorted(set(d.steps))} for g, d in self.graphs.items()}}


def _open(folder: Path, settings: CalibrationSettings, reused: bool) -> CalibrationSet:
    meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    graphs = {g: CalibrationData(g, [folder / f for f in entry["files"]], entry["steps"])
              for g, entry in meta["graphs"].items()}
    return CalibrationSet(folder, settings, graphs, reused)


# -- capture -------------------------------------------------------------------------------------------------------
def collect(manifest: dict, graphs: dict, tokenize: Tokenize, prompts: list[str], settings: CalibrationSettings,
            cache: Path | None = None, progress: bool = False) -> CalibrationSet:
    """The calibration data of ``settings``: from the cache when present, else captured (and cached).

    ``graphs`` maps every graph name of ``manifest`` to a session-like FP32 graph (``TorchGraph``), the text encoder
    included: ``tokenize`` turns a prompt into token ids, the text encoder graph turns those into the embeddings.
    """
    root = (cache or cache_root()) / "calibration"
    folder, reused = cached_entry(
        root, settings.key(), lambda tmp: _capture(manifest, graphs, tokenize, prompts, settings, tmp, progress))
    return _open(folder, settings, reused=reused)


def image_graph_steps(manifest: dict, steps: int) -> dict[str, list[int]]:
    """The once-per-image graphs and the step index their sample is recorded at: the text encoder runs before
    step 0, the VAE decoder after the last step (index ``steps``)."""
    wiring = manifest["wiring"]
    return {g: [i] for g, i in ((wiring["text"]["graph"], 0), (wiring["decode"]["graph"], steps))
            if g in manifest["graphs"]}


def _capture(manifest: dict, graphs: dict, tokenize: Tokenize, prompts: list[str], settings: CalibrationSettings,
             out: Path, progress: bool) -> dict:
    per_graph_steps = {**graph_steps(manifest, settings.schedule.steps, settings.schedule.clock),
                       **image_graph_steps(manifest, settings.schedule.steps)}
    keep = {g: stratified_selection(len(prompts), steps, settings.samples_per_graph)
            for g, steps in per_graph_steps.items()}
    text, decode = manifest["wiring"]["text"], manifest["wiring"]["decode"]
    files: dict[str, list[tuple[int, int, str]]] = {g: [] for g in per_graph_steps}
    for g in per_graph_steps:
        (out / g).mkdir()
    runner = BundleRunner.from_sessions(manifest, graphs)
    from ..progress import progress_bar

    for p, prompt in progress_bar(enumerate(prompts), enabled=progress, total=len(prompts), desc="calibrate",
                                  unit="prompt"):
        def save(graph: str, i: int, feeds: dict[str, np.ndarray], p: int = p) -> None:
            if (p, i) in keep.get(graph, ()):
                rel = f"{graph}/p{p:04d}_s{i:03d}.npz"
                np.savez(out / rel, **feeds)
                files[graph].append((p, i, rel))

        ids = tokenize(prompt)
        save(text["graph"], 0, dict(ids))
        hidden, pooled = runner.encode_ids(ids)

        def on_step(i: int, kind: str, slots: dict) -> None:
            for graph in manifest["wiring"]["steps"][kind]:
                save(graph, i, graph_feeds(manifest, graph, slots))

        trajectory = runner.generate(hidden, pooled, unit_noise(list(settings.latent_shape), settings.seed + p),
                                     on_step=on_step)
        save(decode["graph"], settings.schedule.steps, {decode["input"]: trajectory.latents.astype(np.float32)})
    # order samples step-major so that any prefix / evenly spaced subset covers the trajectory
    return {"settings": schedule_fields(settings),
            "graphs": {g: {"files": [rel for _, _, rel in sorted(entries, key=lambda e: (e[1], e[0]))],
                           "steps": [i for _, i, _ in sorted(entries, key=lambda e: (e[1], e[0]))]}
                       for g, entries in files.items()}}
