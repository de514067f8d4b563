"""The clock schedule: which denoising steps run the full UNet and which reuse low-res features.

PAPER.md "Clock schedule": clock N runs the full UNet every N steps and the adaptor otherwise; the first step is
always full. With 8 steps and clock 2 the adaptor runs at steps 2, 4, 6, 8 (1-indexed).
"""

from __future__ import annotations

from ..errors import InputError

FULL = "full"
CLOCKED = "clocked"


def check_steps_and_clock(steps: int, clock: int) -> None:
    """Reject impossible settings with a message that names both values."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"--steps must be an integer >= 1, got {steps!r}")
    if isinstance(clock, bool) or not isinstance(clock, int) or clock < 1:
        raise InputError(f"--clock must be an integer >= 1, got {clock!r}")
    if clock > steps:
        raise InputError(f"--clock {clock} is larger than --steps {steps}: no step would use the adaptor schedule")


def step_kinds(steps: int, clock: int) -> list[str]:
    """'full' or 'clocked' for each step (0-indexed step i is full when i % clock == 0)."""
    check_steps_and_clock(steps, clock)
    return [FULL if i % clock == 0 else CLOCKED for i in range(steps)]
