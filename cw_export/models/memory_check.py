"""Refuse a build that will not fit in memory, before the export starts (resource limits, issue #9).

A build killed by the OOM killer half-way through an export wastes the user's time and says nothing useful, so
``build`` estimates its peak memory right after the model is loaded and stops with one line naming both numbers
when the estimate exceeds what the process already holds plus what the machine (or the container's memory cgroup)
has available.

The estimate is a deliberately rough upper-side figure, not a measurement:

    peak ~= RUNTIME_BASE                                   interpreter + torch/onnx/onnxruntime libraries
          + fp32 weights of every component               the loaded model
          + COPIES x the largest component's weights      EXPORT_COPY_SHARE: the exporter's transient copy;
                                                          quantized targets QUANTIZE_COPIES (the quantizer's copies)
          + activations of one batch-2 UNet forward at the latent size
              (ACTIVATION_TENSORS live feature maps at level 0, plus the level-0 attention maps twice: scores + softmax)

The export's parity session over a graph above 2 GB maps its weights from the page-aligned ``.data`` file unpacked
(``export.to_onnx``): those pages count in RSS but are file-backed and clean, so the kernel can drop them under
pressure, and they are not a term of their own. Calibration and distillation stream their data to disk, so they add
no term proportional to the prompt count.

Weights read from safetensors (a model folder, or an architecture model read back from the build cache,
``generated_cache``) are memory-mapped the same way: the check takes them out of what the build needs, and counts
only the anonymous part of what the process holds already (RssAnon), so file pages are counted on neither side.
Under pressure the kernel re-reads them from the model files: slower, not killed.
"""

from __future__ import annotations

import bisect
from pathlib import Path

from ..errors import InputError

GIB = 1024**3
RUNTIME_BASE = 3 * GIB // 2  # libraries + interpreter: a build of the tiny pipeline (7 MB of weights) peaks at
#                              ~1.3 GiB RSS (/usr/bin/time -v, CPU, torch 2.14)
EXPORT_COPY_SHARE = 0.8  # the exporter's transient copy, as a share of the largest component's weights: measured
#   (bench/sd15_export.py, stop 31) sdxl-arch cpu-fp32 256: low_res's torch.onnx.export +4.6 GiB over 9.6 GiB of
#   UNet weights (0.48), the 2.7 GiB text encoder's +2.1 GiB (0.79); whole build 22.25 GiB peak RSS, 9.5 GiB of it
#   the parity session's mapped low_res weights; this estimates 21.8 GiB
QUANTIZE_COPIES = 2.0  # quantized targets, the largest component's weights again: the quantizer loads a graph once
#   and writes its QDQ copy (the 8- and 16-bit graphs one after the other). Measured (bench/sd15_export.py, stop 33):
#   sdxl-arch snapdragon-int8 256x256 (--a8-sweep off, weights mapped) peaks at 18.36 GiB anonymous (19.65 GiB RSS)
#   in the quantize stage: 1.9 x low_res's 9.46 GiB; this asks for 20.7 GiB beside the mapped weights (stop 34:
#   passed with the check on, 22.05 GiB available; 18.44 GiB anonymous). sd15-arch snapdragon-w8a16 64x64 (stop 32,
#   weights in memory): 8.81 GiB, estimated 12.7
ACTIVATION_TENSORS = 32  # live level-0 feature maps during a forward (skips, resnet/attention intermediates)
BATCH = 2  # classifier-free guidance: [uncond, cond]
FLOAT_BYTES = 4
MEMINFO = Path("/proc/meminfo")
SELF_STATUS = Path("/proc/self/status")
SELF_MAPS = Path("/proc/self/maps")
CGROUP_DIR = Path("/sys/fs/cgroup")


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _attention_heads(unet) -> int:
    heads = unet.config.get("num_attention_heads") or unet.config.get("attention_head_dim") or 8
    return max(heads) if isinstance(heads, (list, tuple)) else int(heads)


def estimate_build_peak_bytes(model, latent_hw: tuple[int, int], quantized: bool = False) -> int:
    """Rough peak resident memory of building a bundle of ``model`` at latent size ``latent_hw``, quantized or
    FP32 (see module doc)."""
    components = [module for _, module in model.components()]
    weights = [_param_bytes(m) for m in components]
    h, w = latent_hw
    channels = int(model.unet.config.block_out_channels[0])
    features = BATCH * channels * h * w * FLOAT_BYTES * ACTIVATION_TENSORS
    level0_attention = getattr(model.unet.down_blocks[0], "has_cross_attention", False)
    attention = 2 * BATCH * _attention_heads(model.unet) * (h * w) ** 2 * FLOAT_BYTES if level0_attention else 0
    copies = QUANTIZE_COPIES if quantized else EXPORT_COPY_SHARE
    return int(RUNTIME_BASE + sum(weights) + copies * max(weights) + features + attention)


def _meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(cgroup: Path = CGROUP_DIR) -> int | None:
    """memory.max - memory.current of this process's cgroup v2, if it is limited (containers)."""
    try:
        limit = (cgroup / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        return max(int(limit) - int((cgroup / "memory.current").read_text(encoding="ascii").strip()), 0)
    except (OSError, ValueError):
        return None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, lowered to the memory cgroup's headroom if that is smaller; None if unknown."""
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(known) if known else None


def resident_bytes(status: Path = SELF_STATUS, field: str = "VmRSS") -> int:
    """This process's resident set (``field`` of /proc/self/status: VmRSS, or RssAnon for its anonymous part);
    0 where it cannot be read."""
    try:
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def _file_mappings(maps: Path = SELF_MAPS) -> list[tuple[int, int]]:
    """[start, end) of every file-backed mapping of this process (inode != 0), sorted; [] where unreadable."""
    spans = []
    try:
        for line in maps.read_text(encoding="ascii", errors="replace").splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and not fields[5].startswith("["):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    except (OSError, ValueError):
        return []
    return sorted(spans)


def file_backed_weight_bytes(model, maps: Path = SELF_MAPS) -> int:
    """Bytes of ``model``'s parameters and buffers whose storage lies in a file mapping (weights memory-mapped from
    safetensors): pages the kernel can drop and re-read, which need no anonymous memory."""
    spans = _file_mappings(maps)
    if not spans:
        return 0
    starts = [start for start, _ in spans]
    total, seen = 0, set()
    for _, module in model.components():
        for tensor in list(module.parameters()) + list(module.buffers()):
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in seen or pointer == 0:
                continue
            seen.add(pointer)
            index = bisect.bisect_right(starts, pointer) - 1
            if index >= 0 and pointer + storage.nbytes() <= spans[index][1]:
                total += storage.nbytes()
    return total


def check_build_memory(model, latent_hw: tuple[int, int], available: int | None = None,
                       held: int | None = None, quantized: bool = False, mapped: int | None = None) -> None:
    """Raise ``InputError`` if the estimated peak exceeds what this process already holds plus the available
    memory (no check where it is unknown). The check runs after the model is loaded, so the estimate's libraries
    and weights are mostly resident already (``held``, this process's anonymous RSS): counting them against
    MemAvailable too would refuse builds that fit (sdxl-arch: 14.2 GiB held when the check runs). Weights mapped
    from their files (``mapped``, default ``file_backed_weight_bytes``) need no anonymous memory at all."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    mapped = file_backed_weight_bytes(model) if mapped is None else mapped
    needed = estimate_build_peak_bytes(model, latent_hw, quantized) - mapped
    held = min(resident_bytes(field="RssAnon") if held is None else held, needed)
    if needed - held > available:
        h, w = latent_hw
        weights = f", besides {mapped / GIB:.1f} GiB of weights mapped from their files" if mapped else ""
        raise InputError(f"this build needs an estimated {needed / GIB:.1f} GiB of memory ({held / GIB:.1f} GiB "
                         f"of it held already{weights}) but only {available / GIB:.1f} GiB is available "
                         f"(MemAvailable/cgroup; latent {h}x{w}); free memory or build a smaller --height/--width")
