"""``cw-export validate BUNDLE``: the command line over ``cw_export.validate.validate_bundle``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..contract.manifest import read_manifest
from ..errors import BundleError, InputError
from ..runtime.sessions import check_provider
from ..validate import SampledOptions, validate_bundle
from ..validate.check import print_table


def validate_command(args: argparse.Namespace) -> int:
    provider = getattr(args, "provider", "cpu")
    check_provider(provider)
    record = getattr(args, "record", False)
    if record and provider == "cpu":
        raise InputError("--record stores numbers measured on another provider (--provider qnn-htp); the CPU EP's "
                         "are the manifest's own")
    sample = getattr(args, "sample", None)
    check_sample_flags(args, provider, sample)
    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    if sample is not None and "parity" not in manifest:
        raise InputError(f"--sample checks a quantized bundle's graphs on {provider}; {bundle} is FP32 (no graph "
                         "runs there; validate without --sample)")
    only = tuple(getattr(args, "graph", None) or ())
    recorded = manifest.get("parity")
    if only and isinstance(recorded, dict) and isinstance(recorded.get("graphs"), dict):  # before the FP32 runs
        from ..validate.sampled import selected_graphs

        selected_graphs(sorted(recorded["graphs"]), only)
    sampled = None if sample is None else SampledOptions(
        sample, getattr(args, "workers", None), getattr(args, "json", None), not getattr(args, "quiet", False),
        only)
    checks = validate_bundle(bundle, manifest, not args.no_parity, provider, record, sampled)
    print_table(checks)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise BundleError(f"bundle {bundle} failed {len(failed)} check(s): {', '.join(failed)}")
    print(f"bundle {bundle}: all {len(checks)} checks passed")
    return 0


def check_sample_flags(args: argparse.Namespace, provider: str, sample: int | None) -> None:
    """--sample and the flags that go with it, checked before the bundle is read (one line, exit 2)."""
    if sample is None:
        for flag in ("workers", "json", "graph"):
            if getattr(args, flag, None) is not None:
                raise InputError(f"--{flag} goes with --sample N (the sampled check on --provider qnn-htp)")
        return
    if provider == "cpu":
        raise InputError("--sample runs each graph on another provider (--provider qnn-htp); on the CPU EP validate "
                         "re-measures the whole parity gate")
    if getattr(args, "no_parity", False):
        raise InputError("--sample measures parity; it cannot be combined with --no-parity")
    if getattr(args, "record", False):
        raise InputError("--record stores the full gate measured on the provider; a --sample run measures only "
                         "graphs (run without --sample to record)")
