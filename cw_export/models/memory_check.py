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
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

GIB = 1024**3
RUNTIME_BASE = 3 * GIB // 2  # libraries + interpreter: a build of the tiny pipeline (7 MB of weights) peaks at
#                              ~1.3 GiB RSS (/usr/bin/time -v, CPU, torch 2.14)
EXPORT_COPY_SHARE = 0.8  # the exporter's transient copy, as a share of the largest component's weights: measured
#   (bench/sd15_export.py, stop 31) sdxl-arch cpu-fp32 256: low_res's torch.onnx.export +4.6 GiB over 9.6 GiB of
#   UNet weights (0.48), the 2.7 GiB text encoder's +2.1 GiB (0.79); whole build 22.25 GiB peak RSS, 9.5 GiB of it
#   the parity session's mapped low_res weights; this estimates 21.8 GiB
QUANTIZE_COPIES = 3.5  # quantized targets, the largest component's weights again: the quantizer's sims, the a16 and
#   a8 graphs of the mixed-precision sweep, their sessions. Measured whole-build peaks (/usr/bin/time -v) over the
#   loaded model (4.8 GiB; 3.2 GiB UNet) for sd15-arch snapdragon-int8: 64x64 with the a8 plan 14.27 GiB (+2.95 x the
#   UNet), 256x256 15.7 GiB (+3.4 x), 512x512 aimet without the a8 sweep 12.82 GiB (+2.5 x); this estimates 16.6,
#   16.8 and 18.9 GiB
ACTIVATION_TENSORS = 32  # live level-0 feature maps during a forward (skips, resnet/attention intermediates)
BATCH = 2  # classifier-free guidance: [uncond, cond]
FLOAT_BYTES = 4
MEMINFO = Path("/proc/meminfo")
SELF_STATUS = Path("/proc/self/status")
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


def resident_bytes(status: Path = SELF_STATUS) -> int:
    """This process's resident set (VmRSS of /proc/self/status); 0 where it cannot be read."""
    try:
        for line in status.read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def check_build_memory(model, latent_hw: tuple[int, int], available: int | None = None,
                       held: int | None = None, quantized: bool = False) -> None:
    """Raise ``InputError`` if the estimated peak exceeds what this process already holds plus the available
    memory (no check where it is unknown). The check runs after the model is loaded, so the estimate's libraries
    and weights are mostly resident already (``held``, this process's RSS): counting them against MemAvailable too
    would refuse builds that fit (sdxl-arch: 14.2 GiB held when the check runs)."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    needed = estimate_build_peak_bytes(model, latent_hw, quantized)
    held = min(resident_bytes() if held is None else held, needed)
    if needed - held > available:
        h, w = latent_hw
        raise InputError(f"this build needs an estimated {needed / GIB:.1f} GiB of memory ({held / GIB:.1f} GiB "
                         f"of it held already) but only {available / GIB:.1f} GiB is available "
                         f"(MemAvailable/cgroup; latent {h}x{w}); free memory or build a smaller --height/--width")
