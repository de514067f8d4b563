"""Read and verify a bundle's manifest.json (standard library only, so the runtime can use it without torch).

The manifest is the contract with mobile teams: every file with its sha256 and size, each graph's I/O, the wiring
between graphs, the clock schedule and the sampler's per-step table. ``verify_bundle`` reports every problem it finds
(changed, missing or extra bytes, symlinks) rather than stopping at the first. Every file is read through
``confine`` (regular files inside the bundle, no symlink followed), whatever the manifest's hashes say.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import BundleError
from .confine import open_inside, read_inside, sha256_handle, walk_bundle
from .schema import Manifest, parse_manifest

SCHEMA_VERSION = 2  # 2: high_res_in reads "time_features" (manifest["time_features"]) instead of the timestep
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # the SD 1.5 manifest is ~0.2 MiB; a larger one is not read into memory
SELF_HASH_KEY = "manifest_sha256"  # sha256 of the manifest's canonical bytes without this key: covers manifest.json


def sha256_file(path: Path) -> str:
    """sha256 of a file the caller wrote itself (a bundle's files are read through ``confine``)."""
    with open(path, "rb") as handle:
        return sha256_handle(handle)


def _canonical(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")


def manifest_bytes(manifest: dict) -> bytes:
    """Canonical serialisation (sorted keys, fixed indent) so equal manifests are byte-identical.

    It carries the sha256 of its own other content under ``manifest_sha256``, so that the one file the ``files``
    table cannot list is covered too: ``verify_bundle`` re-serialises what it reads and requires the same bytes.
    """
    body = {key: value for key, value in manifest.items() if key != SELF_HASH_KEY}
    return _canonical({**body, SELF_HASH_KEY: hashlib.sha256(_canonical(body)).hexdigest()})


def _manifest_problem(bundle: Path, manifest: dict) -> str | None:
    """Why manifest.json is not exactly the bytes ``manifest_bytes`` writes for ``manifest`` (None when it is).

    ``manifest`` is the object the caller goes on to use, so the bytes checked are those of what is used."""
    if SELF_HASH_KEY not in manifest:
        return f"{MANIFEST_NAME} has no {SELF_HASH_KEY} (written by an older cw-export or by hand); rebuild it"
    try:
        same = manifest_bytes(manifest) == read_inside(bundle, MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
    except (BundleError, ValueError, TypeError):
        same = False
    return None if same else f"{MANIFEST_NAME} changed since it was written (its bytes do not match {SELF_HASH_KEY})"


def list_files(bundle: Path) -> dict[str, dict]:
    """sha256 and size of every regular file in the bundle except the manifest itself, keyed by POSIX relative path
    (read as ``verify_bundle`` reads them: symlinks are not followed, and not listed)."""
    entries = {}
    for rel in walk_bundle(bundle)[0]:
        if rel == MANIFEST_NAME:
            continue
        with open_inside(bundle, rel) as handle:
            entries[rel] = {"sha256": sha256_handle(handle), "size": os.fstat(handle.fileno()).st_size}
    return entries


def read_manifest(bundle: str | os.PathLike) -> dict:
    """Load manifest.json and check every field the runtime reads (``load_manifest``); returns the JSON object."""
    return load_manifest(bundle).raw


def load_manifest(bundle: str | os.PathLike) -> Manifest:
    """The typed manifest of a bundle folder; any problem is a one-line BundleError."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder not found: {bundle}")
    try:
        raw = read_inside(bundle, MANIFEST_NAME, missing_ok=True, limit=MAX_MANIFEST_BYTES)
        if raw is None:
            raise BundleError(f"not a bundle (no {MANIFEST_NAME}): {bundle}")
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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
    return parse_manifest(manifest, str(bundle))


def verify_bundle(bundle: str | os.PathLike, manifest: dict) -> list[str]:
    """Every mismatch between the files on disk and the manifest, as human-readable lines (empty = intact).

    A symlink or other non-regular entry is a finding of its own and is never followed or hashed through (what
    lies behind a symlinked folder is not listed as missing: the link is the finding)."""
    bundle = Path(bundle)
    problems = [p for p in [_manifest_problem(bundle, manifest)] if p]
    files, odd = walk_bundle(bundle)
    for rel in odd:
        kind = "symbolic link in the bundle (not followed)" if (bundle / rel).is_symlink() else "not a regular file"
        problems.append(f"{kind}: {rel}")
    expected = manifest["files"]
    actual_names = set(files) - {MANIFEST_NAME}
    behind_odd = {rel for rel in expected if any(rel == o or rel.startswith(f"{o}/") for o in odd)}
    for rel in sorted(set(expected) - actual_names - behind_odd):
        problems.append(f"missing file: {rel}")
    for rel in sorted(actual_names - set(expected)):
        problems.append(f"extra file not in manifest: {rel}")
    for rel in sorted(set(expected) & actual_names):
        try:
            with open_inside(bundle, rel) as handle:
                size = os.fstat(handle.fileno()).st_size
                if size != expected[rel]["size"]:
                    problems.append(f"size changed: {rel} ({size} != {expected[rel]['size']} bytes)")
                elif sha256_handle(handle) != expected[rel]["sha256"]:
                    problems.append(f"sha256 changed: {rel}")
        except BundleError as exc:  # replaced since the walk: reported, never followed
            problems.append(str(exc))
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
