"""``cw-export inspect (BUNDLE | --model NAME)``: the command line over ``cw_export.bundle.flops``."""

from __future__ import annotations

import argparse

from ..bundle.flops import format_report, inspect_bundle, inspect_model


def inspect_command(args: argparse.Namespace) -> int:
    """``cw-export inspect (BUNDLE | --model X)``: print the table, optionally write the JSON."""
    import json

    from ..errors import InputError
    from ..contract.schedule import check_steps_and_clock

    if (args.bundle is None) == (args.model is None):
        raise InputError("cw-export inspect: give either a BUNDLE folder or --model NAME, not both")
    if args.bundle is not None:
        if args.adaptor != "identity" or args.height or args.width:
            raise InputError("--adaptor/--height/--width apply to --model; a bundle's graphs fix them")
        from ..contract.manifest import read_manifest

        schedule = read_manifest(args.bundle)["schedule"]
        steps = schedule["steps"] if args.steps is None else args.steps
        clock = schedule["clock"] if args.clock is None else args.clock
        check_steps_and_clock(steps, clock)
        report = inspect_bundle(args.bundle, steps, clock)
    else:
        from ..models.pipeline import check_model_spec
        from ..recipe import DEFAULT_TARGET, load_recipe

        check_model_spec(args.model)
        defaults = load_recipe(DEFAULT_TARGET).build
        steps = defaults.steps if args.steps is None else args.steps
        clock = defaults.clock if args.clock is None else args.clock
        check_steps_and_clock(steps, clock)
        report = inspect_model(args.model, steps, clock, args.height, args.width, args.adaptor)
    print(format_report(report))
    if args.json is not None:
        from ..atomic import write_file_atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(args.json, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return 0
