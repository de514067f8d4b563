"""``cw-export validate BUNDLE``: the command line over ``cw_export.validate.validate_bundle``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..contract.manifest import read_manifest
from ..errors import BundleError, InputError
from ..runtime.sessions import check_provider
from ..validate import validate_bundle
from ..validate.check import print_table


def validate_command(args: argparse.Namespace) -> int:
    provider = getattr(args, "provider", "cpu")
    check_provider(provider)
    record = getattr(args, "record", False)
    if record and provider == "cpu":
        raise InputError("--record stores numbers measured on another provider (--provider qnn-htp); the CPU EP's "
                         "are the manifest's own")
    bundle = Path(args.bundle)
    checks = validate_bundle(bundle, read_manifest(bundle), not args.no_parity, provider, record)
    print_table(checks)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise BundleError(f"bundle {bundle} failed {len(failed)} check(s): {', '.join(failed)}")
    print(f"bundle {bundle}: all {len(checks)} checks passed")
    return 0
