"""Quantized parity, measured in onnxruntime the way the bundle runs, and the build gate on it.

On held-out prompts (never the calibration prompts), with the session settings the runtime will use:
  1. per graph: SQNR of the quantized ORT graph vs the FP32 torch graph on the same inputs (the FP32 trajectory's
     inputs at every step where that graph runs; the text encoder on the held-out prompts' token ids, the VAE
     decoder on the FP32 trajectories' final latents), signal and noise power pooled over samples, worst output
     counted
  2. per step: latent PSNR of the quantized clocked trajectory (its embeddings from the bundle's text encoder,
     quantized or not) vs the FP32 clocked torch trajectory from the same noise
     (PSNR = 10 log10(max|FP32 latent|^2 / MSE)), combined over prompts as the recipe says (``AGGREGATES``)
  3. per step: guidance ratio std(cond - uncond) of the quantized UNet step / of the FP32 one on the same (FP32
     trajectory) inputs: quantization that shrinks the guidance direction changes the image even when the latents
     look close; the same ratio along each trajectory's own path is recorded too
  4. final latent PSNR (the last step's)
Thresholds come from the recipe's [parity] section; ``gate`` names the worst graph and step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..calibrate.collect import graph_feeds, graph_outputs, unit_noise
from ..errors import ParityError
from ..runtime.pipeline import BundleRunner

DB_DIGITS = 3
REMEASURE_DB_TOLERANCE = 0.05  # validate: a re-measured dB number may differ this much (thread-order float noise)
REMEASURE_RATIO_TOLERANCE = 1e-3


AGGREGATES = {  # how trajectory and image numbers combine over the held-out prompts (recipe: parity.prompt_aggregate)
    "pooled": "MSE pooled over prompts (the peak: the largest over prompts), guidance ratio and SSIM averaged",
    "median": "median of the per-prompt values (one prompt near a bifurcation cannot decide alone)",
}


def _db(signal: float, noise: float) -> float:
    if noise <= 0:
        return 999.0
    return round(10.0 * math.log10(max(signal, 1e-30) / noise), DB_DIGITS)


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """SQNR of ``actual`` against ``reference`` in dB, in float64 (999.0 when they are equal)."""
    reference = reference.astype(np.float64)
    return _db(float(np.sum(reference**2)), float(np.sum((actual.astype(np.float64) - reference) ** 2)))


class PooledSqnr:
    """Signal and noise power pooled over samples, per output."""

    def __init__(self) -> None:
        self.signal: dict[str, float] = {}
        self.noise: dict[str, float] = {}
        self.guidance_signal: dict[str, float] = {}
        self.guidance_noise: dict[str, float] = {}
        self.samples = 0

    def add(self, reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
        self.samples += 1
        for name, ref in reference.items():
            ref = ref.astype(np.float64)
            err = actual[name].astype(np.float64) - ref
            self.signal[name] = self.signal.get(name, 0.0) + float(np.sum(ref**2))
            self.noise[name] = self.noise.get(name, 0.0) + float(np.sum(err**2))
            if ref.ndim and ref.shape[0] == 2:  # batch [uncond, cond]: the direction guidance amplifies
                diff = ref[1] - ref[0]
                self.guidance_signal[name] = self.guidance_signal.get(name, 0.0) + float(np.sum(diff**2))
                self.guidance_noise[name] = self.guidance_noise.get(name, 0.0) + float(np.sum((err[1] - err[0])**2))

    def add_run(self, reference, actual, feeds: dict[str, np.ndarray]) -> None:
        """One sample: ``reference`` (FP32 TorchGraph) and ``actual`` (quantized session) on the same feeds."""
        names = reference.output_names
        self.add(dict(zip(names, reference.run(names, feeds))), dict(zip(names, actual.run(names, feeds))))

    def result(self) -> dict:
        outputs = {name: _db(self.signal[name], self.noise[name]) for name in sorted(self.signal)}
        out = {"sqnr_db": min(outputs.values()), "outputs": outputs, "samples": self.samples}
        if self.guidance_signal:  # SQNR of cond - uncond: noise there is multiplied by the guidance scale
            out["guidance_sqnr_db"] = min(_db(self.guidance_signal[n], self.guidance_noise[n])
                                          for n in self.guidance_signal)
        return out


def graph_sqnr(session, reference, samples) -> dict:
    """SQNR of ``session`` (quantized ORT) vs ``reference`` (FP32 TorchGraph) over an iterable of feeds."""
    pooled = PooledSqnr()
    for feeds in samples:
        pooled.add_run(reference, session, feeds)
    return pooled.result()


@dataclass
class ImageReferences:
    """What end-to-end image parity needs beyond the graphs: the unclocked FP32 pipeline and two decoders.

    ``full_fp32((hidden, pooled), noise)`` -> final latents of the FP32 UNet without clocking (diffusers' scheduler + the
    original UNet, i.e. StableDiffusionPipeline with the same noise); ``decode_fp32`` decodes with the torch VAE;
    ``decode_bundle`` with the bundle's own vae_decoder graph in onnxruntime (what the phone will show).
    """

    full_fp32: Callable[[tuple[np.ndarray, np.ndarray], np.ndarray], np.ndarray]
    decode_fp32: Callable[[np.ndarray], np.ndarray]
    decode_bundle: Callable[[np.ndarray], np.ndarray]


def _image_pair(reference: list[np.ndarray], actual: list[np.ndarray], aggregate: str = "pooled") -> dict:
    """PSNR and SSIM of uint8 images: MSE pooled over prompts and mean SSIM, or (``median``) the medians of the
    per-prompt values; the per-prompt values are kept either way."""
    from ..runtime.image import ssim

    mses = [float(np.mean((r.astype(np.float64) - a.astype(np.float64)) ** 2)) for r, a in zip(reference, actual)]
    ssims = [round(float(ssim(r, a)), 5) for r, a in zip(reference, actual)]
    psnrs = [_db(255.0**2, m) for m in mses]
    if aggregate == "median":
        psnr, structural = float(np.median(psnrs)), float(np.median(ssims))
    else:
        psnr, structural = _db(255.0**2, float(np.mean(mses))), float(np.mean(ssims))
    return {"psnr_db": round(psnr, DB_DIGITS), "ssim": round(structural, 5), "psnr_db_per_prompt": psnrs,
            "ssim_per_prompt": ssims}


def image_parity(images: ImageReferences, texts: list[tuple[np.ndarray, np.ndarray]], noises: list[np.ndarray],
                 clocked_fp32: list[np.ndarray], quantized: list[np.ndarray], aggregate: str = "pooled") -> dict:
    """Image parity of the quantized clocked bundle vs FP32 unclocked and FP32 clocked, per held-out prompt."""
    full = [images.decode_fp32(images.full_fp32(t, n)) for t, n in zip(texts, noises)]
    clocked = [images.decode_fp32(x) for x in clocked_fp32]
    ours = [images.decode_bundle(x) for x in quantized]
    return {"vs_full_fp32": _image_pair(full, ours, aggregate), "vs_clockwork_fp32": _image_pair(clocked, ours, aggregate),
            "clockwork_fp32_vs_full_fp32": _image_pair(full, clocked, aggregate),
            "definition": f"uint8 RGB; PSNR = 10*log10(255^2 / MSE); SSIM: mean of 7x7 windows on grey levels; "
                          f"over prompts: {AGGREGATES[aggregate]}; references decoded by the torch VAE, the "
                          "bundle's images by its vae_decoder graph in onnxruntime"}


def same_input_guidance_ratio(manifest: dict, runner, kind: str, slots: dict) -> float:
    """std(cond - uncond) of the quantized UNet step / of the FP32 one, both on the FP32 trajectory's step inputs.

    Measured on the same inputs so that it shows what quantization does to the guidance signal (the collapse that
    made a w8a16 UNet's images near-monochrome), not how far the two trajectories have drifted apart: along its own
    trajectory a trained model's ratio moves by 10-27% per prompt at late steps even at W8A16 (shapes model), which
    is divergence, not a guidance defect (that ratio is recorded per prompt as well)."""
    wiring = manifest["wiring"]
    produced = {slot for graph in wiring["steps"][kind] for slot in wiring["graphs"][graph]["outputs"].values()}
    forced = {name: value for name, value in slots.items() if name not in produced}
    for graph in wiring["steps"][kind]:
        runner.run_graph(graph, forced)
    ours = np.diff(np.split(forced[wiring["step_output"]], 2), axis=0)
    ref = np.diff(np.split(slots[wiring["step_output"]], 2), axis=0)
    return float(np.std(ours)) / max(float(np.std(ref)), 1e-30)


def step_table(latent_mse: np.ndarray, latent_peak: np.ndarray, ratios: np.ndarray, kinds: list[str],
               aggregate: str) -> list[dict]:
    """Per-step rows from [prompt, step] arrays of latent MSE, max|FP32 latent| and guidance ratio."""
    rows = []
    for i, kind in enumerate(kinds):
        per_prompt = [_db(latent_peak[k, i] ** 2, latent_mse[k, i]) for k in range(latent_mse.shape[0])]
        if aggregate == "median":
            psnr, ratio = round(float(np.median(per_prompt)), DB_DIGITS), float(np.median(ratios[:, i]))
        else:
            psnr = _db(float(np.max(latent_peak[:, i])) ** 2, float(np.mean(latent_mse[:, i])))
            ratio = float(np.mean(ratios[:, i]))
        rows.append({"step": i, "kind": kind, "latent_psnr_db": psnr, "guidance_ratio": round(ratio, 5),
                     "latent_psnr_db_per_prompt": per_prompt,
                     "guidance_ratio_per_prompt": [round(float(r), 5) for r in ratios[:, i]]})
    return rows


def measure(manifest: dict, fp32_graphs: dict, quantized: dict, tokenize: Callable[[str], dict],
            prompts: list[str], seed: int, images: ImageReferences | None = None, aggregate: str = "pooled") -> dict:
    """All parity numbers for ``quantized`` (graph name -> ORT session) against ``fp32_graphs`` (TorchGraphs, the
    text encoder and VAE decoder included); with ``images``, also end-to-end image parity (``image_parity``).

    ``tokenize`` gives each prompt's token ids: the FP32 trajectory takes its embeddings from the FP32 text encoder,
    the quantized one from ``quantized``'s text encoder where there is one, so latent and image parity are end to end.

    ``aggregate`` says how trajectory numbers combine over prompts (``AGGREGATES``): a trained model has prompts
    whose trajectory sits near a bifurcation, where any perturbation moves the final latent far (measured on the
    shapes model: low_res alone at W16A16 gave 22.7 dB on one prompt of six, 44-58 dB on the others), and pooled MSE
    lets that one prompt decide. Per-prompt values are recorded either way.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"unknown prompt aggregate {aggregate!r}; valid: {sorted(AGGREGATES)}")
    reference_runner = BundleRunner.from_sessions(manifest, fp32_graphs)
    quantized_runner = BundleRunner.from_sessions(manifest, {**fp32_graphs, **quantized})
    pooled = {graph: PooledSqnr() for graph in quantized}
    steps = manifest["schedule"]["steps"]
    latent_mse = np.zeros((len(prompts), steps))
    latent_peak = np.zeros((len(prompts), steps))
    ratios = np.zeros((len(prompts), steps))
    trajectory_ratios = np.zeros((len(prompts), steps))
    kinds: list[str] = []
    finals: dict[str, list] = {"text": [], "noise": [], "fp32": [], "quantized": []}
    text, decode = manifest["wiring"]["text"], manifest["wiring"]["decode"]
    for k, prompt in enumerate(prompts):
        ids = tokenize(prompt)
        hidden, pooled_text = reference_runner.encode_ids(ids)
        ours_hidden, ours_pooled = quantized_runner.encode_ids(ids)
        if text["graph"] in quantized:
            pooled[text["graph"]].add_run(fp32_graphs[text["graph"]], quantized[text["graph"]], dict(ids))
        noise = unit_noise(manifest["latent"]["shape"], seed + k)

        def on_step(i: int, kind: str, slots: dict) -> None:
            for graph in manifest["wiring"]["steps"][kind]:
                if graph in quantized:
                    outputs = graph_outputs(manifest, graph, slots)
                    names = list(outputs)
                    actual = quantized[graph].run(names, graph_feeds(manifest, graph, slots))
                    pooled[graph].add(outputs, dict(zip(names, actual)))
            ratios[k, i] = same_input_guidance_ratio(manifest, quantized_runner, kind, slots)

        ref = reference_runner.generate(hidden, pooled_text, noise, on_step=on_step)
        ours = quantized_runner.generate(ours_hidden, ours_pooled, noise)
        if decode["graph"] in quantized:
            pooled[decode["graph"]].add_run(fp32_graphs[decode["graph"]], quantized[decode["graph"]],
                                            {decode["input"]: ref.latents.astype(np.float32)})
        kinds = ref.kinds
        if images is not None:
            for key, value in (("text", (hidden, pooled_text)), ("noise", noise), ("fp32", ref.latents),
                               ("quantized", ours.latents)):
                finals[key].append(value)
        for i in range(steps):
            a, b = ref.step_latents[i].astype(np.float64), ours.step_latents[i].astype(np.float64)
            latent_mse[k, i] = float(np.mean((a - b) ** 2))
            latent_peak[k, i] = float(np.max(np.abs(a)))
            trajectory_ratios[k, i] = ours.guidance_ratios[i] / max(ref.guidance_ratios[i], 1e-30)
    step_rows = step_table(latent_mse, latent_peak, ratios, kinds, aggregate)
    for i, row in enumerate(step_rows):  # recorded, not gated: it mixes quantization with trajectory divergence
        row["guidance_ratio_own_trajectory_per_prompt"] = [round(float(r), 5) for r in trajectory_ratios[:, i]]
    numbers = {
        "prompts": list(prompts), "seeds": [seed + k for k in range(len(prompts))],
        "graphs": {graph: p.result() for graph, p in sorted(pooled.items())},
        "steps": step_rows, "final_latent_psnr_db": step_rows[-1]["latent_psnr_db"],
        "final_latent_psnr_db_per_prompt": step_rows[-1]["latent_psnr_db_per_prompt"],
        "prompt_aggregate": aggregate,
        "psnr_definition": f"10*log10(max|fp32 latent|^2 / MSE); over prompts: {AGGREGATES[aggregate]}",
    }
    if images is not None:
        numbers["image"] = image_parity(images, finals["text"], finals["noise"], finals["fp32"],
                                        finals["quantized"], aggregate)
    return numbers


def failures(numbers: dict, thresholds) -> list[str]:
    """Every threshold ``numbers`` misses, worst graph and worst step first; empty when the gate passes."""
    found = []
    if thresholds.graph_min_sqnr_db > 0 and numbers["graphs"]:
        worst = min(numbers["graphs"], key=lambda g: numbers["graphs"][g]["sqnr_db"])
        bad = [g for g, r in numbers["graphs"].items() if r["sqnr_db"] < thresholds.graph_min_sqnr_db]
        if bad:
            found.append(f"worst graph {worst}: SQNR {numbers['graphs'][worst]['sqnr_db']:.2f} dB < "
                         f"{thresholds.graph_min_sqnr_db:g} dB ({len(bad)} graph(s) below)")
    rows = numbers["steps"]
    if thresholds.step_min_psnr_db > 0:
        worst = min(rows, key=lambda r: r["latent_psnr_db"])
        if worst["latent_psnr_db"] < thresholds.step_min_psnr_db:
            found.append(f"worst step {worst['step'] + 1} ({worst['kind']}): latent PSNR "
                         f"{worst['latent_psnr_db']:.2f} dB < {thresholds.step_min_psnr_db:g} dB")
    final = numbers["final_latent_psnr_db"]
    if thresholds.final_latent_min_psnr_db > 0 and final < thresholds.final_latent_min_psnr_db:
        found.append(f"final latent PSNR {numbers['final_latent_psnr_db']:.2f} dB < "
                     f"{thresholds.final_latent_min_psnr_db:g} dB")
    image = numbers.get("image", {}).get("vs_clockwork_fp32")
    image_min = getattr(thresholds, "image_min_psnr_db", 0)
    if image is not None and image_min > 0 and image["psnr_db"] < image_min:
        found.append(f"image PSNR vs clockwork FP32 {image['psnr_db']:.2f} dB < {image_min:g} dB")
    ssim_min = getattr(thresholds, "image_min_ssim", 0)
    if image is not None and ssim_min > 0 and image["ssim"] < ssim_min:
        found.append(f"image SSIM vs clockwork FP32 {image['ssim']:.4f} < {ssim_min:g}")
    if thresholds.guidance_ratio_tolerance > 0:
        worst = max(rows, key=lambda r: abs(r["guidance_ratio"] - 1.0))
        if abs(worst["guidance_ratio"] - 1.0) > thresholds.guidance_ratio_tolerance:
            found.append(f"step {worst['step'] + 1}: guidance ratio {worst['guidance_ratio']:.4f} outside "
                         f"1 +/- {thresholds.guidance_ratio_tolerance:g}")
    return found


def gate(numbers: dict, thresholds, allow_low_parity: bool) -> dict:
    """The gate's verdict for the manifest; raises ParityError (nothing written) unless allowed by flag."""
    found = failures(numbers, thresholds)
    if found and not allow_low_parity:
        raise ParityError(f"quantized bundle below the recipe's parity thresholds: {'; '.join(found)} "
                          "(bundle not written; --allow-low-parity writes it anyway)")
    return {"passed": not found, "failures": found, "allowed_by_flag": bool(found and allow_low_parity)}


def compare(recorded: dict, remeasured: dict) -> list[str]:
    """Differences between a manifest's parity numbers and re-measured ones (empty when they agree)."""
    diffs = []
    for graph, rec in recorded["graphs"].items():
        new = remeasured["graphs"].get(graph)
        if new is None or abs(new["sqnr_db"] - rec["sqnr_db"]) > REMEASURE_DB_TOLERANCE:
            diffs.append(f"{graph} SQNR {rec['sqnr_db']} dB recorded, {new and new['sqnr_db']} dB measured")
    for rec, new in zip(recorded["steps"], remeasured["steps"]):
        if abs(rec["latent_psnr_db"] - new["latent_psnr_db"]) > REMEASURE_DB_TOLERANCE:
            diffs.append(f"step {rec['step'] + 1} PSNR {rec['latent_psnr_db']} dB recorded, "
                         f"{new['latent_psnr_db']} dB measured")
        if abs(rec["guidance_ratio"] - new["guidance_ratio"]) > REMEASURE_RATIO_TOLERANCE:
            diffs.append(f"step {rec['step'] + 1} guidance ratio {rec['guidance_ratio']} recorded, "
                         f"{new['guidance_ratio']} measured")
    for pair, rec in recorded.get("image", {}).items():
        new = remeasured.get("image", {}).get(pair)
        if not isinstance(rec, dict):
            continue
        if new is None or abs(new["psnr_db"] - rec["psnr_db"]) > REMEASURE_DB_TOLERANCE \
                or abs(new["ssim"] - rec["ssim"]) > REMEASURE_RATIO_TOLERANCE:
            diffs.append(f"image {pair} {rec} recorded, {new} measured")
    return diffs
