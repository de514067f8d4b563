"""``cw-export validate``: every check of a bundle, run and reported in one table before the verdict, so a user sees
all problems at once:
  integrity  sha256 of every file, ONNX checker, graph I/O vs the manifest, wiring (``integrity``)
  lint       AIMET encodings vs ONNX tensors, QDQ pairs, bit widths, opsets, context binaries (``lint``)
  parity     re-measured against the source model when it is reachable (``parity``); with ``--sample N`` on another
             provider, each quantized graph there on N of the gate's inputs instead (``sampled``)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CwExportError
from .check import Check
from .integrity import integrity_checks, wiring_check
from .lint import encodings_checks, lint_checks


def static_checks(bundle: Path, manifest: dict) -> list[Check]:
    """Integrity, then the lint and the wiring (only when every file is the one the manifest lists)."""
    checks = integrity_checks(bundle, manifest)
    if not checks[0].ok:
        return checks
    checks += encodings_checks(bundle, manifest)
    unreadable = {name for name in manifest["graphs"] if any(c.name == f"{name} onnx" for c in checks)}
    checks += lint_checks(bundle, manifest, skip=unreadable)
    checks.append(wiring_check(manifest))
    return checks


@dataclass(frozen=True)
class SampledOptions:
    """``validate --sample N``: each quantized graph on N of the gate's inputs on the provider (``sampled``)."""

    samples: int
    workers: int | None = None  # None: as many as cores and memory allow
    json_out: Path | None = None
    progress: bool = True
    graphs: tuple[str, ...] = ()  # --graph: only these quantized graphs (empty: all)


def validate_bundle(bundle: Path, manifest: dict, parity: bool = True, provider: str = "cpu",
                    record: bool = False, sampled: SampledOptions | None = None) -> list[Check]:
    """Every check of ``bundle``; parity only when the static checks pass (``record``: see ``validate.parity``;
    ``sampled``: the sampled check on ``provider`` instead of the whole trajectory)."""
    from .parity import parity_checks

    checks = static_checks(bundle, manifest)
    if all(c.ok for c in checks) and parity:
        try:
            checks += parity_checks(bundle, manifest, provider, record, sampled)
        except CwExportError as exc:
            checks.append(Check("parity", False, str(exc)))
    return checks
