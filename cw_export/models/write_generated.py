"""The child process of ``generated_cache``: generate an architecture model and write it as a pipeline folder.

Run as ``python -m cw_export.models.write_generated`` with ``{"name", "arch", "seed", "tmp"}`` as JSON on stdin; prints the
entry's metadata (the generated weights' hash) as JSON on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .generated_cache import FOLDER_NAME, FORMAT_VERSION

SHARD_SIZE = "2GB"  # diffusers' default (10 GB) would serialise a whole SDXL UNet shard at once


def write_generated(name: str, arch: dict, seed: int, tmp: Path) -> dict:
    """Generate the model at ``seed``, save it as a diffusers folder under ``tmp`` and return its metadata."""
    from .pipeline import _set_offline, build_from_configs, weights_hash, write_pipeline_folder

    _set_offline()  # also silences the libraries' "Writing model shards" bars
    model = build_from_configs(arch, seed=seed)
    sha256 = weights_hash(model)
    write_pipeline_folder(model, tmp / FOLDER_NAME, max_shard_size=SHARD_SIZE)
    return {"name": name, "seed": seed, "sha256": sha256, "format": FORMAT_VERSION}


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    print(json.dumps(write_generated(request["name"], request["arch"], int(request["seed"]),
                                     Path(request["tmp"]))))
