"""Read and verify a bundle's manifest.json (standard library only, so the runtime can use it without torch).

The manifest is the contract with mobile teams: every file with its sha256 and size, each graph's I/O, the wiring
between graphs, the clock schedule and the sampler's per-step table. ``verify_bundle`` reports every problem it finds
(changed, missing or extra bytes) rather than stopping at the first.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical serialisation (sorted keys, fixed indent) so equal manifests are byte-identical."""
    return (json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")


def list_files(bundle: Path) -> dict[str, dict]:
    """sha256 and size of every file in the bundle except the manifest itself, keyed by POSIX relative path."""
    entries = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entries[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return entries


def read_manifest(bundle: str | os.PathLike) -> dict:
    """Load and schema-check manifest.json; any problem is a one-line BundleError."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder not found: {bundle}")
    path = bundle / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"not a bundle (no {MANIFEST_NAME}): {bundle}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"corrupt {MANIFEST_NAME} in {bundle}: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"corrupt {MANIFEST_NAME} in {bundle}: not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{bundle}: manifest schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    for key in ("files", "graphs", "wiring", "schedule", "sampler", "latent"):
        if key not in manifest:
            raise BundleError(f"{bundle}: manifest lacks '{key}'")
    return manifest


def verify_bundle(bundle: str | os.PathLike, manifest: dict) -> list[str]:
    """Every mismatch between the files on disk and the manifest, as human-readable lines (empty = intact)."""
    bundle = Path(bundle)
    problems = []
    expected = manifest["files"]
    actual_names = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    for rel in sorted(set(expected) - actual_names):
        problems.append(f"missing file: {rel}")
    for rel in sorted(actual_names - set(expected)):
        problems.append(f"extra file not in manifest: {rel}")
    for rel in sorted(set(expected) & actual_names):
        path = bundle / rel
        if path.stat().st_size != expected[rel]["size"]:
            problems.append(f"size changed: {rel} ({path.stat().st_size} != {expected[rel]['size']} bytes)")
        elif sha256_file(path) != expected[rel]["sha256"]:
            problems.append(f"sha256 changed: {rel}")
    for name, graph in manifest["graphs"].items():
        if graph.get("file") not in expected:
            problems.append(f"graph {name} file {graph.get('file')!r} is not listed in the manifest's files")
    return problems


def load_verified(bundle: str | os.PathLike, verify: bool = True) -> dict:
    """Manifest of a bundle that passed its integrity check (the only kind ``run`` accepts by default)."""
    manifest = read_manifest(bundle)
    if verify:
        problems = verify_bundle(bundle, manifest)
        if problems:
            more = f" (+{len(problems) - 1} more; run 'cw-export validate')" if len(problems) > 1 else ""
            raise BundleError(f"bundle {bundle} failed its integrity check: {problems[0]}{more}")
    return manifest
