"""Regenerating a generated file of a bundle that is already written (report.html, README.md) after its manifest
gained a record (``validate --provider``'s parity) or its renderer changed: the file is replaced atomically and its
entry in the manifest's file table follows, so the bundle stays consistent."""

from __future__ import annotations

from pathlib import Path

from ..atomic import write_file_atomic
from ..contract.manifest import MANIFEST_NAME, manifest_bytes, sha256_file


def replace_generated(bundle: Path, manifest: dict, name: str, data: bytes) -> bool:
    """Write ``bundle/name`` when its bytes differ from ``data`` and update its entry in ``manifest["files"]``;
    returns whether it changed (the caller writes the manifest with ``write_manifest_in_place``)."""
    path = Path(bundle) / name
    if path.is_file() and path.read_bytes() == data:
        return False
    write_file_atomic(path, data)
    manifest["files"][name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return True


def write_manifest_in_place(bundle: Path, manifest: dict) -> None:
    """manifest.json of a written bundle, in its canonical bytes."""
    write_file_atomic(Path(bundle) / MANIFEST_NAME, manifest_bytes(manifest))
