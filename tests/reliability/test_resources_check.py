"""cw_export.models.memory_check: the memory estimate, where the available memory is read from, and the refusal."""

from __future__ import annotations

import pytest

from cw_export.models import memory_check as rc
from cw_export.errors import InputError


def test_estimate_of_the_tiny_pipeline_is_its_runtime_plus_a_little(tiny_model):
    estimate = rc.estimate_build_peak_bytes(tiny_model, (16, 16))
    assert rc.RUNTIME_BASE < estimate < rc.RUNTIME_BASE + 0.1 * rc.GIB
    assert rc.estimate_build_peak_bytes(tiny_model, (64, 64)) > estimate  # grows with the latent size


# Measured whole-build peaks (bench/sd15_export.py or /usr/bin/time -v; docs/sd15.md, docs/sdxl.md): model, latent,
# quantized, peak RSS GiB, of it the anonymous peak GiB (what the kernel cannot drop: not the .data pages the export's
# parity session maps, nor weights memory-mapped from safetensors), and whether the model's weights were mapped (the
# architecture models are read back from the build cache since stop 33; before, they were generated in memory).
# The int8 rows of stops 29-31 (14.3-15.7 GiB) measured the quantizer before stop 32 took its copies out, with the
# weights in memory; they are not the code any more.
MEASURED_PEAKS = [
    ("sd15-arch", (8, 8), False, 8.00, 8.00 - 3.07, False),     # cpu-fp32 64x64, stop 30
    ("sd15-arch", (64, 64), False, 8.33, 8.33 - 3.07, False),   # cpu-fp32 512x512, stop 31
    ("sdxl-arch", (32, 32), False, 22.25, 22.25 - 9.46, False),  # cpu-fp32 256x256, stop 31
    ("sdxl-arch", (32, 32), False, 17.61, 4.41, True),           # cpu-fp32 256x256, stop 33 (weights mapped)
    ("sd15-arch", (8, 8), True, 8.81, 8.81, False),             # snapdragon-w8a16 64x64, stop 32
    ("sdxl-arch", (32, 32), True, 19.65, 18.36, True),  # snapdragon-int8 256x256 --a8-sweep off, stop 33
    ("sdxl-arch", (32, 32), True, 19.83, 18.44, True),  # the same, memory check on, a fresh machine, stop 34
]


@pytest.mark.parametrize("name, latent, quantized, peak, anonymous, mapped", MEASURED_PEAKS)
def test_estimate_covers_the_measured_peaks_without_doubling_them(name, latent, quantized, peak, anonymous, mapped):
    """The published configs built on the meta device (no memory): what the check asks for (the estimate, less
    the weights where they were mapped) is at least each measured build's anonymous peak and under 1.6x its whole
    peak, so it neither lets an OOM through nor refuses builds that fit (sdxl-arch int8 at 256x256 fits this 24 GB
    machine, measured)."""
    from cw_export.models.pipeline import build_architecture_model

    model = build_architecture_model(name, device="meta")
    weights = sum(rc._param_bytes(module) for _, module in model.components()) if mapped else 0
    need = (rc.estimate_build_peak_bytes(model, latent, quantized) - weights) / rc.GIB
    assert anonymous <= need <= 1.6 * peak, (need, anonymous, peak)


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


def test_weights_mapped_from_their_files_are_not_a_need(tiny_model):
    """Weights memory-mapped from safetensors (a model folder, a cached architecture model) need no anonymous
    memory: a build that fits only without them passes, and the refusal says how much was left out."""
    needed = rc.estimate_build_peak_bytes(tiny_model, (16, 16))
    weights = sum(rc._param_bytes(m) for _, m in tiny_model.components())
    rc.check_build_memory(tiny_model, (16, 16), available=needed - weights // 2, held=0, mapped=weights)
    with pytest.raises(InputError, match=r"besides 0\.0 GiB of weights mapped from their files"):
        rc.check_build_memory(tiny_model, (16, 16), available=needed - 2 * weights, held=0, mapped=weights)
    with pytest.raises(InputError):
        rc.check_build_memory(tiny_model, (16, 16), available=needed - weights // 2, held=0, mapped=0)


def test_file_mappings_are_read_from_proc_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f0000000000-7f0000100000 r--p 00000000 fd:01 1234 /m/unet/model.safetensors\n"
                    "7f0000200000-7f0000300000 rw-p 00000000 00:00 0 \n"
                    "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n")
    assert rc._file_mappings(maps) == [(0x7F0000000000, 0x7F0000100000)]
    assert rc._file_mappings(tmp_path / "missing") == []


def test_a_folder_model_is_counted_as_mapped_and_the_check_uses_anonymous_rss(tiny_model, tmp_path):
    from cw_export.models.pipeline import load_model_folder, save_model

    generated = rc.file_backed_weight_bytes(tiny_model)
    folder_model = load_model_folder(save_model(tiny_model, tmp_path / "m"))
    weights = sum(rc._param_bytes(m) for _, m in folder_model.components())
    assert generated == 0 and rc.file_backed_weight_bytes(folder_model) >= weights
    status = tmp_path / "status"
    status.write_text("VmRSS:\t 4000000 kB\nRssAnon:\t 1000000 kB\nRssFile:\t 3000000 kB\n")
    assert rc.resident_bytes(status) == 4000000 * 1024
    assert rc.resident_bytes(status, field="RssAnon") == 1000000 * 1024
