"""Load, build and save Stable-Diffusion-format pipelines (the first stage of the data flow).

``--model builtin`` is a tiny pipeline created deterministically from a fixed seed (nothing is downloaded);
``--model PATH`` is a diffusers pipeline folder. Both come back as one ``SDModel`` whose ``source`` records where the
weights came from and a content hash, so that a bundle can name its source and ``validate`` can re-check parity.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from . import configs
from .clockwork_folder import ADAPTOR_PATH, copy_model_folder, folder_adaptor, is_clockwork_file

BUILTIN_NAME = "builtin"  # the default model of the main job
TINY_RANDOM_NAME = "tiny-random"  # seeded random weights: the fast fixture of the unit tests
TINY_SDXL_NAME = "tiny-sdxl"  # the same for the SDXL structure
BUILTIN_SEED = 0
REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")


@dataclass
class SDModel:
    """The components a bundle is built from, in eval mode, float32, on the CPU."""

    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    scheduler_config: dict
    source: dict = field(default_factory=dict)
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)  # CLIP vocab.json/merges.txt/... as shipped
    folder: Path | None = None  # the model folder it was read from (None: generated in code); its clockwork/ data
    # SDXL-style pipelines: the second text encoder (CLIPTextModelWithProjection) and its tokenizer; None otherwise
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    tokenizer_2_files: dict[str, bytes] = field(default_factory=dict)
    # SDXL pipelines' model_index.json flag: an empty negative prompt is all-zero embeddings, not the encoded ""
    force_zeros_for_empty_prompt: bool = False

    @property
    def dual_text(self) -> bool:
        """Two text encoders (SDXL): the UNet's context is both penultimate layers side by side."""
        return self.text_encoder_2 is not None

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled text (the adaptor's text input; SDXL's ``text_embeds``)."""
        if self.dual_text:
            return int(self.text_encoder_2.config.projection_dim)
        return int(self.text_encoder.config.hidden_size)

    def components(self) -> tuple:
        """(name, module) of every torch component, in a fixed order: for hashing and eval mode."""
        parts = [("unet", self.unet), ("text_encoder", self.text_encoder)]
        if self.dual_text:
            parts.append(("text_encoder_2", self.text_encoder_2))
        return tuple(parts + [("vae", self.vae)])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    def tokenize(self, prompts: list[str]):
        """Token ids as diffusers' StableDiffusionPipeline makes them (pad to max length, truncate)."""
        return _ids(self.tokenizer, prompts)

    def text_feeds(self, prompts: list[str]) -> dict:
        """The text encoder graph's inputs for ``prompts`` (torch int64): ``input_ids`` and, with two encoders,
        ``input_ids_2`` from the second tokenizer (SDXL's pads with another token)."""
        feeds = {"input_ids": self.tokenize(prompts)}
        if self.dual_text:
            feeds["input_ids_2"] = _ids(self.tokenizer_2, prompts)
        return feeds


def _ids(tokenizer, prompts: list[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _set_offline() -> None:
    # Nothing can be fetched here; make every hub call fail fast instead of hanging on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Library progress bars and info logs would interleave with ours and with one-line errors on stderr.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def _read_tokenizer_files(folder: Path) -> dict[str, bytes]:
    """The slow-format CLIP files (what the torch-free runtime tokenizer reads), where the folder has them."""
    return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}


def write_tokenizer_files(model: "SDModel", out_dir: Path, files: dict[str, bytes] | None = None) -> None:
    """Write the CLIP vocab.json + merges.txt (+ configs) that both transformers and our runtime load (``files``:
    another tokenizer's, e.g. SDXL's tokenizer_2; default the first tokenizer's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in sorted((model.tokenizer_files if files is None else files).items()):
        (out_dir / name).write_bytes(data)


def _build_tokenizer():
    from transformers import CLIPTokenizer

    from .tokenizer_files import builtin_corpus, train_clip_bpe, write_clip_tokenizer

    vocab, merges = train_clip_bpe(builtin_corpus())
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(tmp, vocab, merges)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True), _read_tokenizer_files(Path(tmp))


def build_tiny_random_model() -> SDModel:
    """Create the tiny random-weight pipeline; identical weights on every call (seeded per component)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, tokenizer_files = _build_tokenizer()
    torch.manual_seed(BUILTIN_SEED)
    unet = UNet2DConditionModel(**configs.TINY_UNET)
    torch.manual_seed(BUILTIN_SEED + 1)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **configs.TINY_TEXT_ENCODER,
    )
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(BUILTIN_SEED + 2)
    vae = AutoencoderKL(**configs.TINY_VAE)
    model = SDModel(unet, text_encoder, tokenizer, vae, dict(configs.SD_NOISE_SCHEDULE),
                    tokenizer_files=tokenizer_files)
    _to_eval(model)
    model.source = {"kind": "builtin", "name": TINY_RANDOM_NAME, "seed": BUILTIN_SEED,
                    "sha256": weights_hash(model)}
    return model


def _to_eval(model: SDModel) -> None:
    for _, module in model.components():
        module.eval().requires_grad_(False)


def weights_hash(model: SDModel) -> str:
    """sha256 over every parameter and buffer, by name: identifies weights independently of file layout."""
    digest = hashlib.sha256()
    for prefix, module in model.components():
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{prefix}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


MODEL_DEFAULTS_NAME = "cw_export.json"  # build defaults a model folder declares (cw_export.models.declared)


def folder_hash(path: Path) -> str:
    """sha256 over relative paths and bytes of every file under ``path`` (sorted), for provenance: the model's
    weights, configs and tokenizer. Its ``cw_export.json`` and ``clockwork/`` (cw_export.models.clockwork_folder)
    are left out: they declare build defaults (guidance, prompt sets; cw_export.models.declared) and carry the
    distilled adaptor, which every manifest records on its own, so a changed default does not make the same weights
    another model (and an adaptor distilled on the weights can name them by this hash)."""
    digest = hashlib.sha256()
    files = (p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() != MODEL_DEFAULTS_NAME
             and not is_clockwork_file(p.relative_to(path).as_posix()))
    for file in sorted(files):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model folder not found: {path}")
    if not path.is_dir():
        raise ModelError(f"model path is not a folder: {path}")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"not a diffusers pipeline folder (no model_index.json): {path}")
    try:
        json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"corrupt model_index.json in {path}: {_json_problem(exc)}") from None
    missing = [name for name in REQUIRED_SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise ModelError(f"model folder {path} lacks component folder(s): {', '.join(missing)}")


def _json_problem(exc: Exception) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


WEIGHT_COMPONENTS = ("unet", "text_encoder", "vae")
DUAL_TEXT_FOLDERS = ("text_encoder_2", "tokenizer_2")  # an SDXL-style pipeline's second text encoder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _is_dual_text(folder: Path) -> bool:
    """An SDXL-style folder: both second-encoder folders present (one without the other is refused)."""
    present = [name for name in DUAL_TEXT_FOLDERS if (folder / name).is_dir()]
    if present and len(present) < len(DUAL_TEXT_FOLDERS):
        missing = next(n for n in DUAL_TEXT_FOLDERS if n not in present)
        raise ModelError(f"model folder {folder} has {present[0]}/ but no {missing}/ (an SDXL pipeline has both)")
    return bool(present)


def _index_flag(folder: Path, key: str) -> bool:
    """A boolean of model_index.json (already parsed once by _check_folder); anything but true is false."""
    return json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get(key) is True


def _check_weights(folder: Path, dual: bool = False) -> None:
    """Weights are read from safetensors only: a pickle (.bin) is never opened, as unpickling can run code. Checked
    before the libraries look, so that their own logged 'An error occurred ...' line never reaches stderr."""
    for name in WEIGHT_COMPONENTS + (("text_encoder_2",) if dual else ()):
        files = sorted(p.name for p in (folder / name).iterdir() if p.is_file())
        if any(f.endswith(".safetensors") for f in files):
            continue
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ModelError(f"{name} in {folder} has pickle weights only ({pickles[0]}); cw-export reads "
                             "safetensors only (unpickling can run code): convert them, e.g. save_pretrained("
                             "..., safe_serialization=True)")
        raise ModelError(f"cannot load {name} from {folder}: no .safetensors weights in {folder / name}")


# diffusers schedulers of the DDPM family: the noise schedule in their config (betas, prediction type, timestep
# spacing) is what _noise_schedule_from keeps; the sampler is the recipe's (cw_export.runtime.schedulers.SAMPLERS)
NOISE_SCHEDULE_CLASSES = (
    "DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "LMSDiscreteScheduler",
    "PNDMScheduler", "UniPCMultistepScheduler")


def _read_scheduler_config(folder: Path) -> dict:
    """scheduler_config.json as an object of a known scheduler class; an unknown class (e.g. flow matching) has a
    noise schedule we would silently misread, so it is refused."""
    path = folder / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"cannot read scheduler config in {folder}: {_json_problem(exc)}") from None
    if not isinstance(config, dict):
        raise ModelError(f"cannot read scheduler config in {folder}: {path.name} must hold a JSON object, "
                         f"got a {type(config).__name__}")
    name = config.get("_class_name")
    if name not in NOISE_SCHEDULE_CLASSES:
        raise ModelError(f"scheduler _class_name {name!r:.60} in {path} is not supported: cw-export reads the noise "
                         f"schedule of {', '.join(NOISE_SCHEDULE_CLASSES)} (and samples with the recipe's sampler)")
    return config


def _check_unet_config(unet, folder: Path) -> None:
    size = unet.config.sample_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ModelError(f"unet config in {folder}: sample_size must be an integer >= 1 (the latent size), "
                         f"got {size!r:.40}")


def load_model_folder(path: str | os.PathLike) -> SDModel:
    """Load a diffusers Stable Diffusion pipeline folder offline; any broken component is a ModelError."""
    folder = Path(path).resolve()
    model = read_pipeline_folder(folder)
    folder_adaptor(folder)  # an unsafe clockwork/adaptor.safetensors is refused whichever adaptor the build uses
    model.folder = folder
    model.source = {"kind": "folder", "path": str(folder), "sha256": folder_hash(folder)}
    return model


def read_pipeline_folder(folder: Path) -> SDModel:
    """The components of a pipeline folder (``_check_folder``'s layout, each component checked as it loads),
    weights memory-mapped from its safetensors (file-backed pages, which the kernel can drop and re-read under
    memory pressure); no provenance set."""
    _check_folder(folder)
    _set_offline()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scheduler_config = _read_scheduler_config(folder)
    dual = _is_dual_text(folder)
    _check_weights(folder, dual)
    safe = {"local_files_only": True, "use_safetensors": True}
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **safe),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **safe),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
        "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", **safe),
    }
    if dual:
        from transformers import CLIPTextModelWithProjection

        loaders["text_encoder_2"] = lambda: CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", **safe)
        loaders["tokenizer_2"] = lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2",
                                                                       local_files_only=True)
    parts = {}
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except Exception as exc:  # boundary: any library failure on user files becomes one line
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load {name} from {folder}: {first_line}") from None
    _check_unet_config(parts["unet"], folder)
    model = SDModel(parts["unet"], parts["text_encoder"], parts["tokenizer"], parts["vae"],
                    _noise_schedule_from(scheduler_config), text_encoder_2=parts.get("text_encoder_2"),
                    tokenizer_2=parts.get("tokenizer_2"),
                    force_zeros_for_empty_prompt=dual and _index_flag(folder, "force_zeros_for_empty_prompt"))
    model.tokenizer_files = _read_tokenizer_files(folder / "tokenizer")
    if dual:
        model.tokenizer_2_files = _read_tokenizer_files(folder / "tokenizer_2")
    for name, files in (("tokenizer", model.tokenizer_files), ("tokenizer_2", model.tokenizer_2_files)):
        if (name == "tokenizer" or dual) and not {"vocab.json", "merges.txt"} <= set(files):
            raise ModelError(f"{name} in {folder} lacks vocab.json/merges.txt (CLIP BPE files the runtime needs)")
    _to_eval(model)
    return model


def _noise_schedule_from(scheduler_config: dict) -> dict:
    """Keep the source's noise schedule (betas, offsets, prediction type) under the DPM++ 2M sampler defaults."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "timestep_spacing", "steps_offset")
    schedule = dict(configs.SD_NOISE_SCHEDULE)
    schedule.update({k: scheduler_config[k] for k in keys if scheduler_config.get(k) is not None})
    return schedule


def build_builtin_model() -> SDModel:
    """The model ``--model builtin`` names: the trained shapes model, so the main job shows real images
    (recorded under its own name, ``shapes``, so a bundle says which weights it holds)."""
    return build_shapes_model()


def build_architecture_model(name: str, device: str = "cpu") -> SDModel:
    """``sd15-arch`` / ``sd21-arch``: a published architecture (configs.ARCHITECTURES) with seeded random weights.

    Generated once into the build cache and read back from it (``generated_cache``: the weights are then
    file-backed, not anonymous memory). ``device="meta"`` builds shapes only (for FLOP counting; no memory, no
    hash). The text encoder's vocab_size is the project BPE tokenizer's
    length, so token ids differ from real CLIP; architecture, parameter count (but the embedding table) and FLOPs match.
    """
    if device == "meta":
        model = build_from_configs(configs.ARCHITECTURES[name], device)
        model.source = {"kind": "builtin", "name": name, "seed": BUILTIN_SEED, "sha256": None}
        return model
    return load_generated_model(name, configs.ARCHITECTURES[name])


def load_generated_model(name: str, arch: dict, root: Path | None = None, seed: int = BUILTIN_SEED) -> SDModel:
    """``name``'s model generated at ``seed``, read from its cache entry: file-backed weights, the generated
    model's provenance (``kind: builtin``, no folder), the configs' noise schedule; a hash mismatch is a ModelError."""
    from .generated_cache import generated_folder

    folder, expected = generated_folder(name, arch, seed, root)
    model = read_pipeline_folder(folder)
    model.scheduler_config = dict(arch["noise_schedule"])
    model.force_zeros_for_empty_prompt = bool(arch.get("force_zeros_for_empty_prompt", False))
    actual = weights_hash(model)
    if actual != expected:
        raise ModelError(f"the cached weights of {name} in {folder.parent} do not hash to what was generated "
                         f"({actual[:12]} vs {expected[:12]}): delete that folder to generate them again")
    model.source = {"kind": "builtin", "name": name, "seed": seed, "sha256": actual}
    return model


def build_from_configs(arch: dict, device: str = "cpu", seed: int = BUILTIN_SEED) -> SDModel:
    """A pipeline of random weights drawn from ``seed`` (each component from its own offset) from component
    configs (configs.ARCHITECTURES' form): ``unet``,
    ``text_encoder``, ``vae``, ``noise_schedule`` and, for SDXL-style models, ``text_encoder_2`` (a
    CLIPTextModelWithProjection sharing the project tokenizer) and ``force_zeros_for_empty_prompt``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_files = _build_tokenizer()

    def text_config(values: dict):
        return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **values)

    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**arch["unet"])
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(text_config(arch["text_encoder"]))
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL(**arch["vae"])
        text_encoder_2 = None
        if "text_encoder_2" in arch:
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(text_config(arch["text_encoder_2"]))
    model = SDModel(unet, text_encoder, tokenizer, vae, dict(arch["noise_schedule"]), tokenizer_files=tokenizer_files,
                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer if text_encoder_2 is not None else None,
                    tokenizer_2_files=dict(tokenizer_files) if text_encoder_2 is not None else {},
                    force_zeros_for_empty_prompt=bool(arch.get("force_zeros_for_empty_prompt", False)))
    _to_eval(model)
    return model


def build_tiny_sdxl_model() -> SDModel:
    """``tiny-sdxl``: the SDXL structure (3 levels, two text encoders, text_time conditioning) at toy widths, seeded
    random weights: the fast fixture of the SDXL tests."""
    model = build_from_configs(configs.TINY_SDXL)
    model.source = {"kind": "builtin", "name": TINY_SDXL_NAME, "seed": BUILTIN_SEED, "sha256": weights_hash(model)}
    return model


ARCHITECTURE_NAMES = tuple(configs.ARCHITECTURES)  # sd15-arch, sd21-arch, sdxl-arch

SHAPES_NAME = "shapes"  # the small text-to-image model trained by tools/train_builtin.py (docs/builtin_model.md)
SHAPES_DIR = Path(__file__).with_name("builtin")
# its learned Clockwork adaptor, distilled on the shapes training captions (DPM++ 2M, 8 steps, clock 2;
# docs/builtin_model.md), where every model folder carries its own (docs/model_folder.md)
SHAPES_ADAPTOR = SHAPES_DIR / ADAPTOR_PATH


def shipped_adaptor(model: "SDModel") -> Path | None:
    """The adaptor checkpoint the model's folder ships (``clockwork/adaptor.safetensors``; the built-in shapes model
    and any folder written by ``cw-export model`` or ``cw-export distill --out-model``), if present."""
    return None if model.folder is None else folder_adaptor(model.folder)


def build_shapes_model() -> SDModel:
    """The trained shapes model (tools/train_builtin.py, docs/builtin_model.md); also ``builtin``."""
    model = load_model_folder(SHAPES_DIR)
    model.source = {"kind": "builtin", "name": SHAPES_NAME, "sha256": model.source["sha256"]}
    return model


BUILTIN_MODELS = {BUILTIN_NAME: build_builtin_model, TINY_RANDOM_NAME: build_tiny_random_model,
                  TINY_SDXL_NAME: build_tiny_sdxl_model,
                  SHAPES_NAME: build_shapes_model,
                  **{name: (lambda n=name: build_architecture_model(n)) for name in ARCHITECTURE_NAMES}}


def check_model_spec(spec: str) -> None:
    """Cheap up-front check of ``--model`` (name or folder layout) before any heavy work starts."""
    if spec not in BUILTIN_MODELS:
        _check_folder(Path(spec).resolve())
        folder_adaptor(Path(spec).resolve())


def check_out_apart(spec: str, out: Path) -> None:
    """An output folder inside the model folder would change the model's own hash (the bundle's provenance), and
    one that contains it would delete the model on --overwrite: both are refused before any work."""
    if spec in (BUILTIN_NAME, SHAPES_NAME):
        folder = SHAPES_DIR
    elif spec in BUILTIN_MODELS:
        return  # generated in code: no folder
    else:
        folder = Path(spec)
    folder, where = folder.resolve(), Path(out).parent.resolve() / Path(out).name
    if where.is_relative_to(folder):
        raise ModelError(f"--out {out} is inside the model folder {folder}; write the bundle elsewhere")
    if folder.is_relative_to(where):
        raise ModelError(f"--out {out} contains the model folder {folder}; write the bundle elsewhere")


def load_model(spec: str) -> SDModel:
    """A built-in model name (``builtin``, ``tiny-random``) or a pipeline folder path."""
    _set_offline()
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec]()
    return load_model_folder(spec)


def save_model(model: SDModel, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a standard diffusers folder (loadable by StableDiffusionPipeline.from_pretrained), atomically.

    A model read from a folder (the built-in shapes model) is byte-copied with its ``cw_export.json`` and
    ``clockwork/adaptor.safetensors`` (docs/model_folder.md), so a build from the copy is the build of the original;
    a model generated in code is written by diffusers' ``save_pretrained``."""
    from ..atomic import atomic_directory

    if model.folder is not None:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            copy_model_folder(model.folder, Path(tmp))
        return Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_pipeline_folder(model, Path(tmp))
    return Path(out_dir)


def write_pipeline_folder(model: SDModel, folder: Path, max_shard_size: str | None = None) -> None:
    """A model generated in code as a diffusers folder: ``save_pretrained`` (safetensors, shards of
    ``max_shard_size`` where given, else diffusers' default) and the tokenizer files the runtime reads."""
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    diffusers_pipeline(model).save_pretrained(folder, safe_serialization=True, **shards)
    write_tokenizer_files(model, folder / "tokenizer")
    if model.dual_text:
        write_tokenizer_files(model, folder / "tokenizer_2", model.tokenizer_2_files)


def diffusers_pipeline(model: SDModel, scheduler=None):
    """diffusers' own pipeline over ``model``'s components (StableDiffusionXLPipeline for two text encoders), with
    DPM++ 2M on the model's noise schedule unless ``scheduler`` is given: what ``cw-export model`` saves and what
    the tests compare the bundle with."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler or DPMSolverMultistepScheduler.from_config(model.scheduler_config)
    if model.dual_text:
        return StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt)
    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_model_with_adaptor(folder: Path, out_dir: str | os.PathLike, adaptor: Path, guidance_scale: float,
                            overwrite: bool = False) -> Path:
    """``cw-export distill --out-model``: the model folder ``folder`` byte-copied with ``adaptor`` (the checkpoint
    just distilled) as its ``clockwork/adaptor.safetensors`` and, in its ``cw_export.json``, the guidance it was
    distilled at, so that a default build from the copy uses it (docs/model_folder.md). Atomic."""
    from ..atomic import atomic_directory
    from .clockwork_folder import ADAPTOR_NAME, CLOCKWORK_DIR

    defaults_path = Path(folder) / MODEL_DEFAULTS_NAME
    defaults = json.loads(defaults_path.read_text(encoding="utf-8")) if defaults_path.is_file() else {}
    if defaults.get("guidance_scale") != guidance_scale:
        defaults["guidance_scale"] = float(guidance_scale)
        defaults["why"] = "the guidance its clockwork/adaptor.safetensors was distilled at (cw-export distill)"
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        copy_model_folder(folder, Path(tmp))
        (Path(tmp) / CLOCKWORK_DIR).mkdir(exist_ok=True)
        shutil.copyfile(adaptor, Path(tmp) / CLOCKWORK_DIR / ADAPTOR_NAME)
        (Path(tmp) / MODEL_DEFAULTS_NAME).write_text(json.dumps(defaults, sort_keys=True, indent=2) + "\n",
                                                      encoding="utf-8")
    return Path(out_dir)
