"""Run a bundle: the clocked denoising loop in numpy + onnxruntime (no torch, no diffusers).

Per step (the manifest's ``wiring`` says which graph reads and writes which slot):
  full step:    high_res_in -> low_res -> high_res_out        (r_out cached as r_out_prev)
  clocked step: high_res_in -> adaptor -> high_res_out        (identity adaptor: r_out := r_out_prev)
The cache is refreshed after every step, clocked ones included: a clocked step reads the previous step's r_out (a
learned adaptor's prediction after a clocked step; with the identity adaptor, the last full step's).
then classifier-free guidance and one sampler update from the manifest's per-step table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..contract.graphs import TEXT_OUTPUTS
from ..errors import InputError, NumericError
from . import schedulers
from ..contract.confine import read_inside
from ..contract.manifest import load_verified
from ..contract.schedule import CLOCKED, step_kinds
from .sessions import bundle_session, check_provider
from .time_features import sinusoidal_time_features

StepHook = Callable[[int, str, dict], None]


@dataclass
class Trajectory:
    """Final latents (before VAE scaling) plus what happened at each step, for parity checks."""

    latents: np.ndarray
    kinds: list[str]
    timesteps: list[int]
    step_latents: list[np.ndarray] = field(default_factory=list)
    guidance_ratios: list[float] = field(default_factory=list)


class BundleRunner:
    """Loads a verified bundle's graphs once and runs trajectories through them."""

    def __init__(self, bundle: str | os.PathLike, provider: str = "cpu", verify: bool = True,
                 threads: int = 0, arena: str = "shared") -> None:
        """``threads``: onnxruntime intra-op threads per session (0: onnxruntime's default, one per physical core);
        ``arena``: "shared" (one CPU memory arena for the runner's sessions) or "off" (``sessions.session_options``).
        Speed and memory settings only: the outputs depend on neither (tests/runtime/test_sessions.py)."""
        self.bundle = Path(bundle)
        self.threads = threads
        self.arena = arena
        check_provider(provider)
        self.manifest = load_verified(self.bundle, verify=verify)
        self.provider = provider
        self._sessions: dict = {}
        self._calls: dict = {}
        self._plans: dict = {}

    @classmethod
    def from_sessions(cls, manifest: dict, sessions: dict) -> "BundleRunner":
        """A runner over graphs already in memory (graph name -> anything with onnxruntime's ``run(outputs,
        feeds)``: ORT sessions or FP32 torch graphs), with no bundle folder: calibration and parity run exactly the
        loop the bundle runs, before the bundle exists. Only ``sessions``' graphs can run."""
        runner = cls.__new__(cls)
        runner.bundle = None
        runner.manifest = manifest
        runner.provider = "cpu"
        runner.threads = 0
        runner.arena = "off"
        runner._sessions = dict(sessions)
        runner._calls = {}
        runner._plans = {}
        return runner

    def session(self, graph: str):
        if graph not in self._sessions:
            if self.bundle is None:
                raise KeyError(f"graph {graph} was not given to BundleRunner.from_sessions")
            # the session settings parity was measured under (manifest "session_options"; PLATFORM.md), the graph
            # read through the bundle's confinement (sessions.bundle_session)
            self._sessions[graph] = bundle_session(self.bundle, self.manifest, graph, self.provider,
                                                  threads=self.threads, arena=self.arena)
        return self._sessions[graph]

    # -- text ---------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(encoder_hidden_states, pooled_text) for the batch [uncond, cond], via the bundle's text encoder."""
        from .tokenizer import ClipTokenizer

        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("--prompt must be a non-empty string")
        for flag, text in (("--prompt", prompt), ("--negative-prompt", negative_prompt)):
            try:
                text.encode("utf-8")  # argv bytes that are not UTF-8 arrive as lone surrogates
            except UnicodeEncodeError:
                raise InputError(f"{flag} is not UTF-8 text (check the terminal's or the script's "
                                 "encoding)") from None
        text = self.manifest["wiring"]["text"]
        feeds = {}
        for key, manifest_key in (("input", "tokenizer"), ("input_2", "tokenizer_2")):  # SDXL: a second tokenizer
            if key in text:
                folder = self.manifest[manifest_key]["folder"]
                tokenizer = ClipTokenizer.from_files(lambda name, folder=folder: read_inside(
                    self.bundle, f"{folder}/{name}", missing_ok=name in ClipTokenizer.OPTIONAL_FILES))
                feeds[text[key]] = tokenizer([negative_prompt, prompt])
        return self.encode_ids(feeds, empty_negative=not negative_prompt)

    def encode_ids(self, feeds: dict[str, np.ndarray], empty_negative: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(encoder_hidden_states, pooled_text) of the text encoder graph's token-id feeds ([2, 77] each, [uncond,
        cond]; shared with calibration and parity, which feed an FP32 or a quantized text encoder, always with an
        empty negative prompt). ``empty_negative``: where the manifest says so (SDXL's
        force_zeros_for_empty_prompt), the uncond embeddings of an empty negative prompt are zeros."""
        text = self.manifest["wiring"]["text"]
        hidden, pooled = self.session(text["graph"]).run(
            list(TEXT_OUTPUTS), {name: np.asarray(ids, dtype=np.int64) for name, ids in feeds.items()})
        if empty_negative and text.get("empty_negative") == "zeros":
            hidden, pooled = hidden.copy(), pooled.copy()
            hidden[0], pooled[0] = 0.0, 0.0
        return hidden, pooled

    def check_text_embeds(self, hidden: np.ndarray, pooled: np.ndarray | None) -> None:
        expected = next(o["shape"] for o in self.manifest["graphs"]["text_encoder"]["outputs"]
                        if o["name"] == "encoder_hidden_states")
        if tuple(hidden.shape) != tuple(expected):
            raise InputError(f"text embeddings have shape {list(hidden.shape)}; the bundle needs {expected}"
                             " (uncond and cond, each [1, seq, dim])")
        pooled_expected = next(o["shape"] for o in self.manifest["graphs"]["text_encoder"]["outputs"]
                               if o["name"] == "pooled_text")
        needed = "add_time_features" in self.manifest["wiring"]["step_inputs"] or "adaptor" in self.manifest["graphs"]
        if needed and pooled is None:
            raise InputError("this bundle needs the pooled text embeddings too (pooled_text)")
        if pooled is not None and needed and tuple(pooled.shape) != tuple(pooled_expected):
            raise InputError(f"pooled text has shape {list(pooled.shape)}; expected {pooled_expected}")

    def graph_input_shape(self, graph: str, name: str) -> list[int]:
        for spec in self.manifest["graphs"][graph]["inputs"]:
            if spec["name"] == name:
                return spec["shape"]
        raise KeyError(f"{graph} has no input {name}")

    # -- decoding -----------------------------------------------------------------------------------------------
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Final latents -> [H, W, 3] uint8 RGB through the bundle's VAE decoder."""
        from .image import to_uint8

        decode = self.manifest["wiring"]["decode"]
        (image,) = self.session(decode["graph"]).run([decode["output"]], {decode["input"]: latents.astype(np.float32)})
        if not np.all(np.isfinite(image)):  # to_uint8 would clip NaN and inf into a plausible-looking PNG
            raise NumericError("the VAE decoder produced NaN or infinite pixels (the latents are far out of range: "
                               f"max |x| {float(np.max(np.abs(latents))):.3g})")
        return to_uint8(image)

    # -- denoising ----------------------------------------------------------------------------------------------
    def latent_shape(self) -> list[int]:
        return list(self.manifest["latent"]["shape"])

    @np.errstate(over="ignore", invalid="ignore")  # overflow is one NumericError naming the step, not warnings
    def generate(
        self,
        encoder_hidden_states: np.ndarray,
        pooled_text: np.ndarray | None,
        init_latents: np.ndarray,
        steps: int | None = None,
        clock: int | None = None,
        guidance_scale: float | None = None,
        progress: bool = False,
        on_step: StepHook | None = None,
    ) -> Trajectory:
        """Denoise unit-Gaussian ``init_latents`` [1, C, h, w]; returns final latents before VAE scaling."""
        schedule = self.manifest["schedule"]
        steps = schedule["steps"] if steps is None else steps
        clock = schedule["clock"] if clock is None else clock
        guidance = self.manifest["guidance_scale"] if guidance_scale is None else guidance_scale
        if not np.isfinite(guidance):
            raise InputError(f"--guidance must be a finite number, got {guidance}")
        kinds = step_kinds(steps, clock)
        if tuple(init_latents.shape) != tuple(self.latent_shape()):
            raise InputError(f"init latents have shape {list(init_latents.shape)}; the bundle needs {self.latent_shape()}")
        self.check_text_embeds(encoder_hidden_states, pooled_text)
        plan = self._step_plan(steps)
        table = plan.table
        wiring = self.manifest["wiring"]
        aliases = tuple(wiring["clocked_aliases"].items())
        cache_wiring = tuple(wiring["cache"].items())
        step_output = wiring["step_output"]
        graphs = {kind: tuple(wiring["steps"][kind]) for kind in set(kinds)}
        # read-only per image: cast once (no copy when the caller's arrays are float32 already), not once per step
        hidden = np.asarray(encoder_hidden_states, dtype=np.float32)
        pooled = None if pooled_text is None else np.asarray(pooled_text, dtype=np.float32)
        scale = np.float32(guidance)

        latents = init_latents.astype(np.float32) * np.float32(schedulers.init_noise_sigma(table))
        state: dict = {}
        cache: dict[str, np.ndarray] = {}
        trajectory = Trajectory(latents=latents, kinds=kinds, timesteps=list(plan.timesteps))
        iterator = range(steps)
        if progress:
            from ..progress import progress_bar

            iterator = progress_bar(iterator, desc="denoise", unit="step")
        for i in iterator:
            kind = kinds[i]
            sample = np.concatenate([latents, latents])
            if plan.input_scale[i] != 1.0:  # x * 1.0 is exact in float64: skipping it changes no bit
                sample = schedulers.scale_model_input(table, i, sample)
            slots = {"sample": sample, "time_features": plan.time_features[i], "encoder_hidden_states": hidden}
            if pooled is not None:
                slots["pooled_text"] = pooled
            if plan.add_time_features is not None:
                slots["add_time_features"] = plan.add_time_features
            if kind == CLOCKED:
                slots.update(cache)
                for target, source in aliases:
                    slots[target] = slots[source]
            for graph in graphs[kind]:
                self.run_graph(graph, slots)
            for target, source in cache_wiring:
                cache[target] = slots[source]
            if on_step is not None:
                on_step(i, kind, slots)
            prediction = slots[step_output]
            half = prediction.shape[0] // 2  # [uncond, cond] (np.split into 2 gives the same two views)
            noise_uncond, noise_cond = prediction[:half], prediction[half:]
            delta = noise_cond - noise_uncond
            noise = noise_uncond + scale * delta
            latents = schedulers.sampler_step(table, i, noise, latents, state).astype(np.float32, copy=False)
            if not np.isfinite(latents).all():
                raise NumericError(f"step {i + 1} of {steps} ({kind}) produced NaN or infinite latents: the inputs "
                                   f"are far out of range (guidance {guidance:g}, init latents max |x| "
                                   f"{float(np.max(np.abs(init_latents))):.3g})")
            trajectory.step_latents.append(latents)
            trajectory.guidance_ratios.append(float(np.std(delta)))
        trajectory.latents = latents
        return trajectory

    def run_graph(self, graph: str, slots: dict) -> None:
        """Run one graph of the loop on the step's slots: read its inputs, write its outputs (the manifest's wiring)."""
        session, inputs, outputs, targets = self._graph_call(graph)
        values = session.run(outputs, {name: slots[slot] for name, slot in inputs})
        for target, value in zip(targets, values):
            slots[target] = value

    def _graph_call(self, graph: str) -> tuple:
        """(session, ((input name, slot), ...), [output names], (output slots)) of a graph, worked out once."""
        call = self._calls.get(graph)
        if call is None:
            spec = self.manifest["wiring"]["graphs"][graph]
            outputs = list(spec["outputs"])
            call = self._calls[graph] = (self.session(graph), tuple(spec["inputs"].items()), outputs,
                                         tuple(spec["outputs"][name] for name in outputs))
        return call

    def _step_plan(self, steps: int) -> "_StepPlan":
        """The sampler's step table and each step's time features for ``steps`` steps, computed once per runner (the
        same functions on the same manifest entries every call, so every value is the one a per-image rebuild gives)."""
        sampler, time_spec = self.manifest["sampler"], self.manifest["time_features"]
        key = (steps, json.dumps([sampler["name"], sampler["config"], time_spec], sort_keys=True, default=str))
        plan = self._plans.get(key)
        if plan is None:
            table = schedulers.build_step_table(sampler["name"], sampler["config"], steps)
            features = []
            batch = 2 * self.latent_shape()[0]  # [uncond, cond]
            for t in table["timesteps"]:
                values = sinusoidal_time_features(np.full((batch,), t), time_spec)
                values.setflags(write=False)  # shared by every image of this runner
                features.append(values)
            plan = self._plans[key] = _StepPlan(table, tuple(int(t) for t in table["timesteps"]),
                                                tuple(float(s) for s in table["input_scale"]), tuple(features),
                                                self._add_time_features(batch))
        return plan

    def _add_time_features(self, batch: int) -> np.ndarray | None:
        """SDXL's ``add_time_features`` [batch, 6 * dim]: the sinusoid of the manifest's fixed time ids (the same
        for every step and image of the bundle); None for a bundle without text_time conditioning."""
        spec = self.manifest.get("add_time_features")
        if spec is None:
            return None
        row = sinusoidal_time_features(np.asarray(spec["time_ids"], dtype=np.float64), spec).reshape(1, -1)
        values = np.repeat(row, batch, axis=0)
        values.setflags(write=False)
        return values


@dataclass(frozen=True)
class _StepPlan:
    """What every image of a given step count shares: the step table, its timesteps, input scales, time features
    (and SDXL's added time features)."""

    table: dict
    timesteps: tuple[int, ...]
    input_scale: tuple[float, ...]
    time_features: tuple[np.ndarray, ...]
    add_time_features: np.ndarray | None = None
