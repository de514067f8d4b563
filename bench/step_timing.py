"""Step timing shared by bench/peers.py and bench/wallclock.py: one denoising loop timed as a whole and per step.

A loop takes an ``on_step(i, kind, ...)`` hook that it calls as each step ends (``cw_export.runtime``'s
``BundleRunner.generate`` and peers.py's torch loops both do); a step's time is the time since the previous step
ended (the first step's: since the loop started).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_steps(run: Callable[[Callable], object]) -> tuple[float, list[tuple[str, float]]]:
    """Calls ``run(on_step)``; returns the seconds it took and (kind, seconds) per step, in step order."""
    marks: list[tuple[str, float]] = []
    start = time.perf_counter()
    run(lambda i, kind, *_: marks.append((kind, time.perf_counter())))
    total = time.perf_counter() - start
    per_step, previous = [], start
    for kind, stamp in marks:
        per_step.append((kind, stamp - previous))
        previous = stamp
    return total, per_step


def add_step_times(times: dict[str, list[float]], per_step: list[tuple[str, float]]) -> None:
    """Appends each step's seconds to ``times[kind]``."""
    for kind, seconds in per_step:
        times.setdefault(kind, []).append(seconds)


def step_medians(times: dict[str, list[float]], digits: int) -> dict[str, float]:
    """Median seconds per step kind, rounded to ``digits``, keys sorted."""
    return {kind: round(statistics.median(seconds), digits) for kind, seconds in sorted(times.items())}
