"""Architecture models (``sd15-arch``, ``sdxl-arch``, ...) generated once into the build cache, then read from it.

Why: weights generated in code live in anonymous memory for the whole build (sdxl-arch: 13.4 GiB), which the
kernel cannot reclaim while onnxruntime quantizes and calibrates; the same weights read from safetensors are
memory-mapped, file-backed pages it can drop and re-read (measured on sd15-arch read from a folder: 0.49 GiB
anonymous, 3.5 GiB file-backed after every UNet weight was read). The model is still the generated one: its
``source`` names the architecture and seed, its ``sha256`` is the weights hash of the generated tensors, checked
again on every read, so a changed or corrupt cache entry is an error and never a different model.

The entry is keyed by the configs, the seed and the library versions whose initialisers draw the weights, so
another install generates its own rather than reading weights it would not have drawn.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from ..cache import META_NAME, cache_root, cached_entry
from ..errors import ModelError

FORMAT_VERSION = 1
CACHE_DIR = "models"
FOLDER_NAME = "pipeline"
WRITER_MODULE = "cw_export.models.write_generated"  # the child's module (it imports the pipeline code)


def generated_cache_key(name: str, arch: dict, seed: int) -> str:
    """The cache entry's name: the architecture's name, its configs, the seed and the generating libraries."""
    import diffusers
    import torch
    import transformers

    settings = {"name": name, "arch": arch, "seed": seed, "format": FORMAT_VERSION,
                "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return f"{name}-{digest[:16]}"


def _generate_in_child(name: str, arch: dict, seed: int, tmp: Path) -> dict:
    """``write_generated`` in a fresh interpreter (the configs on its stdin, the metadata on its stdout), so the
    generated weights' memory goes back to the system with it (measured: a build that generated sdxl-arch in
    its own process and then read it back held 20.6 GiB anonymous, the read-back alone 0.53 GiB); its failure is
    a ModelError."""
    request = json.dumps({"name": name, "arch": arch, "seed": seed, "tmp": str(tmp)})
    done = subprocess.run([sys.executable, "-m", WRITER_MODULE], input=request, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or f"exit code {done.returncode}").splitlines()
        raise ModelError(f"generating {name} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def generated_folder(name: str, arch: dict, seed: int, root: Path | None = None) -> tuple[Path, str]:
    """The cached pipeline folder of architecture ``name`` generated at ``seed`` (written on first use by
    ``write_generated``) and its weights hash."""
    root = (cache_root() if root is None else root) / CACHE_DIR
    entry, _ = cached_entry(root, generated_cache_key(name, arch, seed), lambda tmp: _generate_in_child(name, arch, seed, tmp))
    try:
        meta = json.loads((entry / META_NAME).read_text(encoding="utf-8"))
        sha256 = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"unreadable cache entry {entry}: delete it to generate {name} again") from None
    return entry / FOLDER_NAME, sha256
