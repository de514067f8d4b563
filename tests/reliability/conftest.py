"""Fixtures of the reliability battery (issue #9): run the CLI, damaged copies of bundles and models, tmpfs mounts.

Most cases call ``cw_export.cli.main`` in this process with file-descriptor capture (``capfd``), so torch and the
tiny model are loaded once; cases that need a real process (kills, the console entry point) use
``reliability_helpers.cw_subprocess``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reliability_helpers, for the test modules

from user_errors import CliResult  # noqa: E402


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """One torch thread: on two shared, busy cores more threads make these CPU-bound builds several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cw(capfd):
    """``cw(*args)``: ``cw_export.cli.main`` in-process; stdout/stderr captured at the file-descriptor level."""
    from cw_export.cli import main

    def call(*args: str) -> CliResult:
        capfd.readouterr()
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return CliResult(code, out, err)

    return call


@pytest.fixture(scope="module")
def model_folder(tiny_model, tmp_path_factory) -> Path:
    """The tiny random pipeline saved as a diffusers folder (read-only: tests damage copies of it)."""
    from cw_export.models.pipeline import save_model

    return save_model(tiny_model, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture
def bundle_copy(fp32_bundle, tmp_path) -> Path:
    """A private copy of the session's FP32 bundle, free to damage."""
    return Path(shutil.copytree(fp32_bundle, tmp_path / "bundle"))


@pytest.fixture
def mount_tmpfs():
    """``mount_tmpfs(dir, options)`` mounts a tmpfs (root only); every mount is undone after the test."""
    mounted: list[Path] = []

    def mount(folder: Path, options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=False)
