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
from .schema import Manifest, parse_manifest

SCHEMA_VERSION = 2  # 2: high_res_in reads "time_features" (manifest["time_features"]) instead of the timestep
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # the SD 1.5 manifest is ~0.2 MiB; a larger one is not read into memory
SELF_HASH_KEY = "manifest_sha256"  # sha256 of the manifest's canonical bytes without this key: covers manifest.json


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical serialisation (sorted keys, fixed indent) so equal manifests are byte-identical.

    It carries the sha256 of its own other content under ``manifest_sha256``, so that the one file the ``files``
    table cannot list is covered too: ``verify_bundle`` re-serialises what it reads and requires the same bytes.
    """
    body = {key: value for key, value in manifest.items() if key != SELF_HASH_KEY}
    return _canonical({**body, SELF_HASH_KEY: hashlib.sha256(_canonical(body)).hexdigest()})


def _manifest_problem(bundle: Path) -> str | None:
    """Why manifest.json is not exactly the bytes ``manifest_bytes`` wrote (None when it is)."""
    try:
        raw = (bundle / MANIFEST_NAME).read_bytes()
        data = json.loads(raw)
        if SELF_HASH_KEY not in data:
            return f"{MANIFEST_NAME} has no {SELF_HASH_KEY} (written by an older cw-export or by hand); rebuild it"
        same = manifest_bytes(data) == raw
    except (OSError, ValueError, TypeError, AttributeError):
        same = False
    return None if same else f"{MANIFEST_NAME} changed since it was written (its bytes do not match {SELF_HASH_KEY})"


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
    """Load manifest.json and check every field the runtime reads (``load_manifest``); returns the JSON object."""
    return load_manifest(bundle).raw


def load_manifest(bundle: str | os.PathLike) -> Manifest:
    """The typed manifest of a bundle folder; any problem is a one-line BundleError."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder not found: {bundle}")
    path = bundle / MANIFEST_NAME
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BundleError(f"{bundle}: {MANIFEST_NAME} is not a regular file")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{bundle}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"not a bundle (no {MANIFEST_NAME}): {bundle}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        what = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise BundleError(f"corrupt {MANIFEST_NAME} in {bundle}: {what}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"corrupt {MANIFEST_NAME} in {bundle}: not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{bundle}: manifest schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    for key in ("files", "graphs", "wiring", "schedule", "sampler", "latent", "time_features"):
        if key not in manifest:
            raise BundleError(f"{bundle}: manifest lacks '{key}'")
    _check_tables(bundle, manifest)
    return parse_manifest(manifest, str(bundle))


def _inside(rel: object) -> bool:
    """A relative POSIX path that stays inside the bundle (no absolute paths, no '..')."""
    return isinstance(rel, str) and bool(rel) and not rel.startswith("/") and ".." not in rel.split("/")


def _check_tables(bundle: Path, manifest: dict) -> None:
    """The shapes verify_bundle and the runtime rely on, so a hand-edited manifest is one BundleError, not a crash."""
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
            _inside(rel) and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("size"), int) for rel, entry in files.items()):
        raise BundleError(f"{bundle}: manifest 'files' must map paths inside the bundle to their sha256 and size")
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or not all(isinstance(g, dict) and _inside(g.get("file")) for g in graphs.values()):
        raise BundleError(f"{bundle}: manifest 'graphs' must give each graph a 'file' inside the bundle")


def verify_bundle(bundle: str | os.PathLike, manifest: dict) -> list[str]:
    """Every mismatch between the files on disk and the manifest, as human-readable lines (empty = intact)."""
    bundle = Path(bundle)
    problems = [p for p in [_manifest_problem(bundle)] if p]
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
