"""Builds killed with SIGKILL at known stages leave no bundle (and never a half-written one), keep an existing bundle
intact, and their temporary folders are gone after the next run.

The build sleeps at a stage when ``CW_EXPORT_TEST_PAUSE_AT=<stage>`` is set (``cw_export.atomic.pause_point``) and
says so on stderr; the test then kills it there. The killed builds run in parallel to keep the module fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from reliability_helpers import SUBPROCESS_ENV
from user_errors import assert_user_error, temps_in

from cw_export.atomic import PAUSE_ENV, clean_stale_temps
from cw_export.contract.manifest import read_manifest, verify_bundle

PAUSED = "cw-export: test pause at "
PAUSE_TIMEOUT_S = 400
EXIT_TIMEOUT_S = 300  # after the signal: seconds to clean up and exit (a local CI run under extra load exceeded 120)


class PausedProcess:
    """A subprocess run with ``CW_EXPORT_TEST_PAUSE_AT=stage``; ``wait_paused()`` returns once it sleeps there."""

    def __init__(self, args: list[str], stage: str) -> None:
        self.stage = stage
        env = {**os.environ, **SUBPROCESS_ENV, PAUSE_ENV: stage}
        # SIGINT as a terminal gives it: a suite started in the background (``cmd &``) has SIGINT ignored, which
        # children inherit, and Python then installs no KeyboardInterrupt handler (the SIGINT tests hung there)
        self.proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.stderr: list[str] = []
        self._paused = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            if line.startswith(PAUSED + self.stage):
                self._paused.set()
        self._paused.set()  # EOF: the process ended without pausing; wait_paused reports it

    def wait_paused(self) -> None:
        if not self._paused.wait(PAUSE_TIMEOUT_S) or self.proc.poll() is not None:
            self.kill()
            pytest.fail(f"never paused at {self.stage}: exit {self.proc.returncode}\n{''.join(self.stderr)[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)


def build_args(out: Path, *extra: str) -> list[str]:
    return ["-m", "cw_export.cli", "--model", "tiny-random", "--target", "cpu-fp32", "--quiet", "--out", str(out),
            *extra]


@dataclass
class Observation:
    """What was on disk while the process slept at its stage, and right after it was killed."""

    own_temps: list[str] = field(default_factory=list)  # its temporary folders, with their files, before the kill
    out_exists_after_kill: bool = False
    old_manifest_after_kill: bytes | None = None


@pytest.fixture(scope="module")
def killed(tmp_path_factory, fp32_bundle):
    """Three builds killed in parallel: fresh builds at load and export, and an --overwrite one after its manifest."""
    fresh = tmp_path_factory.mktemp("fresh")
    replace = tmp_path_factory.mktemp("replace")
    old = Path(shutil.copytree(fp32_bundle, replace / "bundle"))
    old_manifest = (old / "manifest.json").read_bytes()
    runs = {
        "load": PausedProcess(build_args(fresh / "bundle"), "load"),
        "export": PausedProcess(build_args(fresh / "bundle"), "export"),
        "overwrite_manifest": PausedProcess(build_args(old, "--overwrite"), "manifest"),
    }
    seen = {}
    try:
        for name, run in runs.items():
            run.wait_paused()
            parent = replace if name.startswith("overwrite") else fresh
            mine = [t for t in temps_in(parent) if f"-{run.proc.pid}-" in t.name]
            files = sorted(f"{t.name}/{p.relative_to(t).as_posix()}" for t in mine for p in t.rglob("*") if p.is_file())
            run.kill()
            seen[name] = Observation(files, (parent / "bundle").exists(),
                                     (old / "manifest.json").read_bytes() if parent == replace else None)
    finally:
        for run in runs.values():
            run.kill()
    return {"fresh": fresh, "replace": replace, "old_manifest": old_manifest, "seen": seen}


def test_kill_during_model_load_leaves_nothing(killed):
    seen = killed["seen"]["load"]
    assert seen.own_temps == [] and not seen.out_exists_after_kill


def test_kill_during_export_leaves_no_bundle(killed):
    seen = killed["seen"]["export"]
    assert any(f.endswith("/graphs/text_encoder.onnx") for f in seen.own_temps), seen.own_temps  # killed mid-build
    assert not any(f.endswith("manifest.json") for f in seen.own_temps)
    assert not seen.out_exists_after_kill


def test_kill_after_manifest_written_keeps_the_old_bundle(killed):
    """The most dangerous moment of an --overwrite build: a complete-looking new bundle in the temporary folder,
    not yet renamed over the old one. The old bundle must be untouched."""
    seen = killed["seen"]["overwrite_manifest"]
    assert any(f.endswith("/manifest.json") for f in seen.own_temps), seen.own_temps
    assert seen.out_exists_after_kill
    assert seen.old_manifest_after_kill == killed["old_manifest"]
    old = killed["replace"] / "bundle"
    assert verify_bundle(old, read_manifest(old)) == []


def test_next_run_cleans_up(killed, make_fp32_bundle, cw):
    """After the kills the next build succeeds and leaves exactly the bundle; a refused run cleans up too."""
    fresh, replace = killed["fresh"], killed["replace"]
    bundle = make_fp32_bundle(fresh / "bundle")
    assert sorted(p.name for p in fresh.iterdir()) == ["bundle"]
    assert verify_bundle(bundle, read_manifest(bundle)) == []
    assert temps_in(replace), "the killed --overwrite left its temporary folder"
    assert_user_error(cw("--model", "tiny-random", "--target", "cpu-fp32", "--out", replace / "bundle"),
                      "already exists")
    assert sorted(p.name for p in replace.iterdir()) == ["bundle"]


SWAP = """
import sys
from pathlib import Path
from cw_export import atomic
if sys.argv[2] == "fallback":
    atomic._exchange = lambda a, b: False  # platforms without renameat2(RENAME_EXCHANGE)
with atomic.atomic_directory(sys.argv[1], overwrite=True) as tmp:
    (Path(tmp) / "data.txt").write_text("new")
"""


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
def test_kill_between_the_renames_of_a_replace(tmp_path, mode):
    """Killed in the middle of replacing a folder: ``out`` is old or new, whole; the next run leaves no litter."""
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "data.txt").write_text("old")
    run = PausedProcess(["-c", SWAP, str(out), mode], "rename")
    run.wait_paused()
    run.kill()
    if mode == "exchange":  # one atomic swap: the new folder is in place, the old one waits to be deleted
        assert (out / "data.txt").read_text() == "new"
    else:  # two renames: the old folder was moved aside and the new one not yet moved in
        assert not out.exists()
    assert temps_in(tmp_path)
    clean_stale_temps(tmp_path)
    assert (out / "data.txt").read_text() == ("new" if mode == "exchange" else "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# --- SIGTERM and SIGINT: the process ends itself, cleaning up (issue #20 A.6) ------------------------------------

SIGNALS = {"SIGTERM": (signal.SIGTERM, 143, "cw-export: terminated"),
           "SIGINT": (signal.SIGINT, 130, "cw-export: interrupted")}


def _signalled(run: PausedProcess, name: str) -> None:
    """Send the signal while the process sleeps at its stage; it must exit with its code and one line."""
    sig, code, line = SIGNALS[name]
    run.wait_paused()
    run.proc.send_signal(sig)
    try:
        assert run.proc.wait(EXIT_TIMEOUT_S) == code, "".join(run.stderr)[-3000:]
    finally:
        run.kill()
    lines = [s for s in "".join(run.stderr).splitlines() if s.strip() and not s.startswith(PAUSED)]
    assert lines == [line], lines


@pytest.fixture(scope="module")
def signalled_builds(tmp_path_factory):
    """One build per signal, each signalled while it exports into its temporary folder (run in parallel)."""
    parents = {name: tmp_path_factory.mktemp(name.lower()) for name in SIGNALS}
    runs = {name: PausedProcess(build_args(parents[name] / "bundle"), "export") for name in SIGNALS}
    try:
        for name, run in runs.items():
            run.wait_paused()
            assert temps_in(parents[name]), "the build had no temporary folder when signalled"
            _signalled(run, name)
    finally:
        for run in runs.values():
            run.kill()
    return parents


@pytest.mark.parametrize("name", list(SIGNALS))
def test_signalled_build_leaves_nothing(signalled_builds, name):
    """SIGTERM cleans up like SIGINT: no bundle and no ``.<out>.cwtmp-PID-*`` beside --out."""
    assert sorted(p.name for p in signalled_builds[name].iterdir()) == []


@pytest.mark.parametrize("name", list(SIGNALS))
def test_signalled_run_leaves_no_temporary_file(fp32_bundle, tmp_path, name):
    """``run`` signalled with its output's temporary file written, not yet renamed: neither is left."""
    out = tmp_path / "latents.npy"
    run = PausedProcess(["-m", "cw_export.cli", "run", str(fp32_bundle), "--prompt", "x", "--seed", "1", "--steps",
                         "1", "--clock", "1", "--quiet", "--latents-out", str(out)], "write")
    run.wait_paused()
    assert temps_in(tmp_path), "no temporary file while paused"
    _signalled(run, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
