"""``cw-export evaluate BUNDLE``: prompt accuracy and Fréchet distance of a shapes bundle and its FP32 references.

Why: a bundle's parity numbers say how far its latents are from FP32; this says whether its *images* still show what
the prompt asks for. Every variant draws the same captions from the same initial noise (image i: numpy seed
``seed + i``, the draw of ``cw-export run --seed``), and is scored by ``metrics.evaluate_images`` against one real
generator sample per caption:

  real                      generator samples of the same captions (the Fréchet floor)
  full_fp32                 torch StableDiffusionPipeline of the bundle's source model, clock 1
  clockwork_fp32            torch Clockwork at the bundle's clock, identity adaptor
  clockwork_fp32_learned    the same with the bundle's learned adaptor (learned-adaptor bundles only; the torch
                            weights come from ``--adaptor-checkpoint`` or the build cache, matched by sha256)
  clockwork_<p>_cpu         the bundle itself through runtime.pipeline.BundleRunner on the CPU (<p> = int8 for a
                            quantized bundle, fp32 for a cpu-fp32 one)
  clockwork_<p>_htp         the same on QNN HTP (``--provider qnn-htp`` only)

A variant that cannot be measured (HTP cannot run the graphs, learned weights not found) is reported on stderr and
recorded as ``{"error": ..., "prompt_accuracy": null, "frechet": null}``; numbers are never filled in.
Steps: 1. check the bundle, captions and output paths (cheap, before torch); 2. load the source model and check it is
the one the bundle was built from; 3. generate and score each variant; 4. print the table, write the JSON / images.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import CwExportError, InputError
from ..models.source import load_source_model

REAL = "real"
FULL_FP32 = "full_fp32"
CLOCKWORK_FP32 = "clockwork_fp32"
CLOCKWORK_FP32_LEARNED = "clockwork_fp32_learned"
PROVIDER_SUFFIX = {"cpu": "cpu", "qnn-htp": "htp"}
SHAPES_MODEL = "shapes"


def bundle_variant(precision: str, provider: str) -> str:
    """``clockwork_int8_cpu`` etc.: the name of the bundle run on one provider."""
    return f"clockwork_{precision}_{PROVIDER_SUFFIX[provider]}"


def bundle_precision(manifest: dict) -> str:
    """``int8`` when any graph is quantized (the snapdragon targets), else ``fp32``."""
    return "int8" if any(g.get("precision", "fp32") != "fp32" for g in manifest["graphs"].values()) else "fp32"


def _same_architecture(folder: Path, reference: Path) -> bool:
    """Whether ``folder`` holds a pipeline with the reference's UNet, text-encoder and VAE configs."""
    def config(root: Path, part: str) -> dict | None:
        path = root / part / "config.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return {k: v for k, v in data.items() if not k.startswith("_")}

    parts = ("unet", "text_encoder", "vae")
    return all(config(folder, p) is not None and config(folder, p) == config(reference, p) for p in parts)


def check_shapes_bundle(bundle: Path, manifest: dict) -> None:
    """The classifier only knows the shapes data set, so only a bundle of the shapes model can be scored."""
    source = manifest.get("source_model") or {}
    if source.get("name") == SHAPES_MODEL:
        return
    from ..models.pipeline import SHAPES_DIR, folder_hash

    if source.get("sha256"):
        if (SHAPES_DIR / "model_index.json").is_file() and source["sha256"] == folder_hash(SHAPES_DIR):
            return
    if source.get("kind") == "folder" and _same_architecture(Path(source.get("path", "")), SHAPES_DIR):
        return  # a retrained shapes model (tools/train_builtin.py --out DIR): same data set, same classifier
    built_from = source.get("name") or source.get("path") or "an unknown model"
    raise InputError(f"cw-export evaluate scores images with the shapes classifier; bundle {bundle} was built from "
                     f"'{built_from}', not the shapes model or a retrained copy of it (build one with: cw-export --model shapes ...)")


def load_captions(prompts: Path | None, repeats: int, limit: int) -> list[str]:
    """The held-out captions (default) or a caption file, ``repeats`` times, then the first ``limit`` (0 = all);
    every caption must name a shape, colour and position the classifier knows."""
    from ..models import shapes
    from .metrics import parse_or_raise
    from .torch_variants import held_out_captions

    if prompts is None:
        captions = held_out_captions(repeats)
    else:
        from ..prompts import read_prompt_file

        captions = read_prompt_file(prompts) * repeats
        for caption in captions:
            try:
                parse_or_raise(caption)
            except ValueError:
                raise InputError(
                    f"{prompts}: caption {caption!r} does not name exactly one shape ({', '.join(shapes.SHAPES)}), "
                    f"colour ({', '.join(shapes.COLOURS)}) and position ({', '.join(shapes.POSITIONS)}); "
                    "the evaluator's classifier knows only the shapes data set") from None
    return captions[:limit] if limit else captions


def find_adaptor_checkpoint(manifest: dict, given: Path | None) -> Path:
    """The learned adaptor's torch weights: ``given``, else the shipped shapes adaptor or the build cache's entry,
    whichever has the bundle's sha256."""
    import hashlib

    from ..cache import cache_root

    wanted = manifest["adaptor"].get("checkpoint_sha256")
    from ..models.pipeline import SHAPES_ADAPTOR

    candidates = [given] if given is not None else [SHAPES_ADAPTOR,
                                                     *sorted((cache_root() / "adaptors").glob("*.safetensors"))]
    for path in candidates:
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == wanted:
            return path
    if given is not None:
        raise InputError(f"--adaptor-checkpoint {given} is not the adaptor this bundle was built with "
                         f"(bundle records sha256 {str(wanted)[:12]}...)")
    raise CwExportError(f"learned adaptor weights (sha256 {str(wanted)[:12]}...) not found in "
                        f"{cache_root() / 'adaptors'}; pass --adaptor-checkpoint CKPT")


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """N x H x W x 3 floats in 0..1 -> uint8 (the runtime's rounding), uint8 unchanged."""
    if images.dtype == np.uint8:
        return images
    return np.clip(np.floor(images * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _write_images(folder: Path, variant: str, images: np.ndarray) -> None:
    from ..atomic import write_file_atomic
    from ..runtime.image import encode_png

    out = folder / variant
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(_to_uint8(images)):
        write_file_atomic(out / f"{i:03d}.png", encode_png(image))


def _error_entry(variant: str, exc: BaseException) -> dict:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"cw-export evaluate: {variant} not measured: {message}", file=sys.stderr, flush=True)
    return {"error": message, "prompt_accuracy": None, "frechet": None}


def evaluate_bundle(bundle: str | Path, captions: list[str], providers: tuple[str, ...] = ("cpu",), seed: int = 0,
                    adaptor_checkpoint: Path | None = None, images_out: Path | None = None,
                    on_variant=None) -> dict:
    """{variant: {"prompt_accuracy", "frechet", "attribute_accuracy", "n", "seconds", ...}} for one shapes bundle.

    ``on_variant(name, entry)`` is called as each variant finishes (the CLI prints its row there).
    """
    from ..adaptor import build_adaptor
    from ..runtime.pipeline import BundleRunner
    from .classifier import load_classifier
    from .generate import bundle_images, generate_images, runtime_noise
    from .metrics import evaluate_images, reference_images

    # 2. the bundle and its source model
    bundle = Path(bundle)
    runner = BundleRunner(bundle, provider="cpu")
    manifest = runner.manifest
    check_shapes_bundle(bundle, manifest)
    source = manifest["source_model"]
    model = load_source_model(manifest)  # with the LoRAs it was built with fused in (docs/lora.md)
    if model.source.get("sha256") != source.get("sha256"):
        raise InputError(f"the {source.get('name') or source.get('path')} model changed since bundle {bundle} was "
                         "built (weights sha256 differs); rebuild the bundle to compare it with FP32")
    steps, clock = manifest["schedule"]["steps"], manifest["schedule"]["clock"]
    guidance, sampler = float(manifest["guidance_scale"]), manifest["sampler"]["name"]
    common = {"steps": steps, "guidance_scale": guidance, "sampler": sampler, "seed": seed}
    noise = runtime_noise(runner.latent_shape(), len(captions), seed)
    classifier = load_classifier()
    reference = reference_images(captions)

    results: dict[str, dict] = {}

    def score(name: str, images: np.ndarray, started: float, **extra) -> None:
        entry = evaluate_images(images, captions, classifier=classifier, reference=reference)
        entry.update(common, seconds=round(time.perf_counter() - started, 2), **extra)
        results[name] = entry
        if images_out is not None:
            _write_images(images_out, name, images)
        if on_variant is not None:
            on_variant(name, entry)

    def failed(name: str, exc: BaseException, **extra) -> None:
        results[name] = {**_error_entry(name, exc), **common, **extra}
        if on_variant is not None:
            on_variant(name, results[name])

    # 3. each variant
    started = time.perf_counter()
    score(REAL, reference_images(captions, seed=seed + 1), started, source="generator", clock=None)
    started = time.perf_counter()
    score(FULL_FP32, generate_images(model, captions, steps=steps, clock=1, guidance_scale=guidance, noise=noise,
                                     sampler=sampler), started, source="torch", clock=1)
    started = time.perf_counter()
    score(CLOCKWORK_FP32, generate_images(model, captions, steps=steps, clock=clock, guidance_scale=guidance,
                                          noise=noise, sampler=sampler), started, source="torch", clock=clock,
          adaptor="identity")
    if manifest["adaptor"]["kind"] == "learned":
        started = time.perf_counter()
        try:
            from ..distill.checkpoint import read_checkpoint

            checkpoint = read_checkpoint(find_adaptor_checkpoint(manifest, adaptor_checkpoint))
            adaptor = build_adaptor(checkpoint.config, checkpoint.state_dict)
        except CwExportError as exc:
            failed(CLOCKWORK_FP32_LEARNED, exc, source="torch", clock=clock, adaptor="learned")
        else:
            images = generate_images(model, captions, steps=steps, clock=clock, guidance_scale=guidance,
                                     noise=noise, sampler=sampler, adaptor=adaptor)
            score(CLOCKWORK_FP32_LEARNED, images, started, source="torch", clock=clock, adaptor="learned")
    precision = bundle_precision(manifest)
    for provider in ("cpu", *[p for p in providers if p != "cpu"]):
        name = bundle_variant(precision, provider)
        extra = {"source": "bundle", "provider": provider, "clock": clock, "adaptor": manifest["adaptor"]["kind"]}
        started = time.perf_counter()
        try:
            run = runner if provider == "cpu" else BundleRunner(bundle, provider=provider, verify=False)
            images = bundle_images(run, captions, noise)
        except CwExportError as exc:  # e.g. a graph the HTP cannot place (runtime.sessions, one line)
            failed(name, exc, **extra)
            continue
        except Exception as exc:  # boundary: onnxruntime's own Fail/RuntimeException while a graph runs
            if provider == "cpu":
                raise
            failed(name, exc, **extra)
            continue
        score(name, images, started, **extra)
    return results


