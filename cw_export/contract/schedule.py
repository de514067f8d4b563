"""The clock schedule: which denoising steps run the full UNet and which reuse low-res features.

PAPER.md "Clock schedule": clock N runs the full UNet every N steps and the adaptor otherwise; the first step is
always full. With 8 steps and clock 2 the adaptor runs at steps 2, 4, 6, 8 (1-indexed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


def adaptor_steps(steps: int, clock: int) -> list[int]:
    """0-based indices of the steps on which the runtime runs the adaptor."""
    return [i for i, kind in enumerate(step_kinds(steps, clock)) if kind == CLOCKED]


@dataclass(frozen=True)
class SamplingSchedule:
    """The denoising schedule a bundle, its adaptor's teacher data and its calibration are tied to: the sampler, its
    number of steps, the clock and the classifier-free guidance scale. The recipe's [build] section, the distill
    and evaluate options spell these four as flat fields (``.schedule`` gives this record); everything downstream
    carries this one record."""

    sampler: str
    steps: int
    clock: int
    guidance_scale: float

    @property
    def step_kinds(self) -> list[str]:
        return step_kinds(self.steps, self.clock)

    @property
    def adaptor_steps(self) -> list[int]:
        return adaptor_steps(self.steps, self.clock)

    def as_fields(self) -> dict:
        """The four values as flat fields, as cache keys and records spell them."""
        return asdict(self)

    @staticmethod
    def of_manifest(manifest: dict) -> "SamplingSchedule":
        """The schedule a bundle was built for (manifest.json's schedule, sampler and guidance_scale)."""
        return SamplingSchedule(manifest["sampler"]["name"], manifest["schedule"]["steps"],
                                manifest["schedule"]["clock"], float(manifest["guidance_scale"]))


def schedule_fields(record) -> dict:
    """A settings dataclass holding a ``schedule`` as one flat dict: its other fields and the schedule's four, so its
    cache key and its recorded form are those of the flat record it replaced."""
    data = asdict(record)
    data.update(data.pop("schedule"))
    return data
