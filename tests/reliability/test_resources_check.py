"""cw_export.models.memory_check: the memory estimate, where the available memory is read from, and the refusal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cw_export.models import memory_check as rc
from cw_export.errors import InputError


def test_estimate_of_the_tiny_pipeline_is_its_runtime_plus_a_little(tiny_model):
    estimate = rc.estimate_build_peak_bytes(tiny_model, (16, 16))
    assert rc.RUNTIME_BASE < estimate < rc.RUNTIME_BASE + 0.1 * rc.GIB
    assert rc.estimate_build_peak_bytes(tiny_model, (64, 64)) > estimate  # grows with the latent size


def test_estimate_of_sd15_is_in_the_range_such_exports_need():
    """SD 1.5's UNet built on the meta device (no memory): 4 GiB of fp32 weights, 64x64 latents."""
    import torch
    from diffusers import UNet2DConditionModel

    from cw_export.models import configs

    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs.SD15_UNET)
    small = torch.nn.Linear(1, 1)
    model = SimpleNamespace(unet=unet, components=lambda: (("unet", unet), ("text_encoder", small), ("vae", small)))
    estimate = rc.estimate_build_peak_bytes(model, (64, 64)) / rc.GIB
    assert 11 < estimate < 20, estimate  # the whole sd15-arch build measured an 11.4 GiB peak (docs/sd15.md)


def test_mem_available_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:  1000 kB\nMemAvailable:   12345678 kB\n")
    assert rc._meminfo_available(meminfo) == 12345678 * 1024
    meminfo.write_text("MemTotal:       32000000 kB\n")
    assert rc._meminfo_available(meminfo) is None
    assert rc._meminfo_available(tmp_path / "missing") is None


def test_cgroup_headroom(tmp_path):
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert rc._cgroup_available(tmp_path) == 3 * rc.GIB
    (tmp_path / "memory.max").write_text("max\n")
    assert rc._cgroup_available(tmp_path) is None


def test_available_is_the_smaller_of_meminfo_and_cgroup(monkeypatch):
    monkeypatch.setattr(rc, "_meminfo_available", lambda: 8 * rc.GIB)
    monkeypatch.setattr(rc, "_cgroup_available", lambda: 2 * rc.GIB)
    assert rc.available_memory_bytes() == 2 * rc.GIB
    monkeypatch.setattr(rc, "_cgroup_available", lambda: None)
    assert rc.available_memory_bytes() == 8 * rc.GIB


def test_check_names_both_numbers_and_passes_when_unknown_or_enough(tiny_model, monkeypatch):
    with pytest.raises(InputError, match=r"needs an estimated 1\.5 GiB .* only 0\.5 GiB is available"):
        rc.check_build_memory(tiny_model, (16, 16), available=rc.GIB // 2, held=0)
    rc.check_build_memory(tiny_model, (16, 16), available=64 * rc.GIB)
    monkeypatch.setattr(rc, "available_memory_bytes", lambda: None)
    rc.check_build_memory(tiny_model, (16, 16))  # no /proc/meminfo (macOS, Windows): no refusal


def test_memory_the_process_already_holds_is_not_counted_twice(tiny_model, tmp_path):
    """The check runs after the model is loaded: what the process holds is part of the estimate, not a new need."""
    needed = rc.estimate_build_peak_bytes(tiny_model, (16, 16))
    rc.check_build_memory(tiny_model, (16, 16), available=needed // 2, held=needed // 2 + 1)
    with pytest.raises(InputError, match=r"of it held already"):
        rc.check_build_memory(tiny_model, (16, 16), available=needed // 2, held=needed // 4)
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t  2048 kB\n")
    assert rc.resident_bytes(status) == 2048 * 1024
    assert rc.resident_bytes(tmp_path / "missing") == 0
    assert rc.resident_bytes() > 0  # this process, on Linux
