"""Progress bars that stay out of the way: shown on a terminal only, cleared when done or failed.

On a non-terminal stderr (CI, pipes, tests) bars are disabled, so an error stays the single line on stderr.
"""

from __future__ import annotations

from typing import Any


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar (leave=False) that is disabled when ``enabled`` is False or stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None if enabled else True, leave=False, dynamic_ncols=True, **kwargs)
