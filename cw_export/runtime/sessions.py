"""onnxruntime sessions for bundle graphs, per execution provider.

``cpu`` is plain onnxruntime. ``qnn-htp`` runs quantized graphs (manifest precision other than fp32) on the QNN HTP
backend (onnxruntime-qnn's plugin EP; on x86_64 the HTP is emulated) with CPU fallback disabled, so a graph either runs
entirely on the NPU or fails with one line naming it and its unsupported op types; FP32 graphs stay on the CPU EP
(docs/qnn_htp.md). onnxruntime's graph optimisations change QDQ numerics (PLATFORM.md: one W8A8 QDQ UNet
fell from 23 dB to 5 dB SQNR under ORT_ENABLE_ALL), so a bundle records the session settings its parity was measured
under (``manifest["session_options"]``) and the runtime creates every session with exactly those settings.

A bundle's graphs reach onnxruntime as bytes, with their external data in memory (``bundle_session``): onnxruntime
opens no file of a bundle, so it cannot follow a symlink out of it (``graph_file``).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from ..contract.confine import map_inside
from ..errors import BundleError, InputError
from .graph_file import read_graph

PROVIDERS = ("cpu", "qnn-htp")

QNN_EP = "QNNExecutionProvider"
# QNN HTP provider options. Without soc_model, graph finalisation fails with QNN_COMMON_ERROR_MEM_ALLOC (PLATFORM.md);
# 57 is the SoC the platform measurements used. offload_graph_io_quantization "1" (the default) assigns the graph-input
# QuantizeLinear / graph-output DequantizeLinear to the CPU EP, which fallback-disabled sessions refuse (and which
# segfaulted on a whole UNet, PLATFORM.md): "0" keeps them on the HTP so the whole graph is one HTP partition.
QNN_HTP_OPTIONS = {"soc_model": "57", "offload_graph_io_quantization": "0"}

OPTIMIZATION_LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
DEFAULT_SESSION_CONFIG = {"graph_optimization_level": "all", "disabled_optimizers": []}


def session_config(graph_optimization_level: str = "all", disabled_optimizers: list[str] | None = None) -> dict:
    """The JSON-able description of session settings stored in the manifest (checked here, once)."""
    if graph_optimization_level not in OPTIMIZATION_LEVELS:
        raise InputError(f"onnxruntime optimisation level '{graph_optimization_level}' unknown; "
                         f"available: {', '.join(OPTIMIZATION_LEVELS)}")
    disabled = list(disabled_optimizers or [])
    if not all(isinstance(name, str) and name for name in disabled):
        raise InputError(f"disabled onnxruntime optimizers must be non-empty names, got {disabled!r}")
    return {"graph_optimization_level": graph_optimization_level, "disabled_optimizers": sorted(disabled)}


def manifest_session_config(manifest: dict) -> dict:
    """A bundle's recorded session settings; bundles from before they were recorded get onnxruntime's defaults."""
    config = manifest.get("session_options", DEFAULT_SESSION_CONFIG)
    try:
        return session_config(config["graph_optimization_level"], config.get("disabled_optimizers"))
    except (KeyError, TypeError, InputError) as exc:
        raise BundleError(f"manifest session_options are invalid: {exc}") from None


ARENAS = ("off", "shared")  # CPU activation memory: malloc per call, or one arena shared by the process's sessions
_shared_arena_registered = False


def _register_shared_arena() -> None:
    """Register one CPU arena allocator in onnxruntime's environment (once per process) for sessions that opt in
    with ``session.use_env_allocators``: they reuse each other's freed blocks, so the process holds about the
    largest graph's activation memory instead of every graph's (a per-session arena) or none (arena off, where every
    call maps and faults in its large buffers anew)."""
    global _shared_arena_registered
    if not _shared_arena_registered:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
        _shared_arena_registered = True


def session_options(disabled_optimizers: list[str] | None = None, threads: int = 0,
                    graph_optimization_level: str = "all", arena: str = "off") -> ort.SessionOptions:
    """SessionOptions for one level; ``disabled_optimizers`` is accepted for symmetry and applied by create_session.

    ``arena`` "off" (the build's and validate's sessions): no CPU memory arena. A per-session arena keeps each
    session's peak activation memory for the session's lifetime, and a bundle holds one session per graph: measured
    on the SD 1.5 snapdragon-int8 bundle at 256x256 (`cw-export run`, 8 steps) peak RSS 4.94 GiB with it, 2.02 GiB
    without; at 512x512 the 4096-token attention of every high-res graph stayed allocated in the build's parity
    stage (21.4 GiB). "shared" (the runtime, ``BundleRunner``): one arena for all sessions of the process
    (``_register_shared_arena``); measured on the SD 1.5 FP32 graphs at 256x256, 2 threads: high_res_in 0.61 vs
    0.75 s per call, high_res_out 1.29 vs 1.42 s, low_res 3.07 vs 3.11 s (docs/benchmarks.md). The allocator
    changes no output (tests/runtime/test_sessions.py).
    """
    if arena not in ARENAS:
        raise InputError(f"onnxruntime arena setting '{arena}' unknown; available: {', '.join(ARENAS)}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if arena == "shared":
        _register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    else:
        options.enable_cpu_mem_arena = False
    options.graph_optimization_level = OPTIMIZATION_LEVELS[graph_optimization_level]
    if threads:
        options.intra_op_num_threads = threads
    return options


@dataclass(frozen=True)
class InMemoryGraph:
    """A graph's ONNX bytes and its external data files (location -> bytes-like), already read: onnxruntime is
    given these and opens no file."""

    name: str
    data: bytes
    external: dict[str, object] = field(default_factory=dict)


def _session(model: Path | InMemoryGraph, options: ort.SessionOptions, **kwargs) -> ort.InferenceSession:
    """An InferenceSession of a graph file or of an InMemoryGraph (its files registered on ``options``, which is
    used once: onnxruntime copies what it needs while the session is created)."""
    if not isinstance(model, InMemoryGraph):
        return ort.InferenceSession(str(model), options, **kwargs)
    if model.external:
        names = list(model.external)
        buffers = [model.external[name] for name in names]
        options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    return ort.InferenceSession(model.data, options, **kwargs)


def create_session(path: Path | InMemoryGraph, provider: str = "cpu", options: ort.SessionOptions | None = None,
                   config: dict | None = None, precision: str | None = None, threads: int = 0,
                   arena: str = "off"):
    """An InferenceSession for one graph (a file, or an InMemoryGraph: ``bundle_session``) on the named provider.

    ``precision`` is the manifest's graph precision: on ``qnn-htp`` an ``fp32`` graph runs on the CPU EP, any other
    (or unknown) precision on the HTP with CPU fallback disabled.

    ``config`` (a ``session_config`` dict, e.g. a manifest's ``session_options``) sets the optimisation level and the
    disabled optimizers; without it onnxruntime's defaults apply. ``threads`` (with ``config``) sets the intra-op
    thread count (0: onnxruntime's default) and ``arena`` the CPU memory arena (``session_options``).
    """
    check_provider(provider)
    if provider == "qnn-htp" and precision != "fp32":
        arena = "off"  # the shared arena was measured on the CPU EP only
    disabled: list[str] = []
    if config is not None:
        options = session_options(graph_optimization_level=config["graph_optimization_level"], threads=threads,
                                  arena=arena)
        disabled = list(config.get("disabled_optimizers", []))
    kwargs = {"disabled_optimizers": disabled} if disabled else {}
    model = path if isinstance(path, InMemoryGraph) else Path(path)
    if provider == "qnn-htp" and precision != "fp32":
        return _qnn_htp_session(model, options or session_options(), kwargs)
    return _session(model, options or session_options(), providers=["CPUExecutionProvider"], **kwargs)


def bundle_session(bundle: str | os.PathLike, manifest: dict, graph: str, provider: str = "cpu", threads: int = 0,
                   arena: str = "off"):
    """The session of one graph of a bundle, under the manifest's recorded session settings.

    The graph file and its external data are read through the confinement (``graph_file.read_graph``, files mapped
    from the descriptors ``open_inside`` checked) and handed over in memory: a location outside the bundle or a
    symlink is one BundleError before onnxruntime sees the graph, and what onnxruntime loads is what was checked."""
    spec = manifest["graphs"][graph]
    config = manifest_session_config(manifest)
    data, model, external = read_graph(bundle, spec["file"])
    del model  # only the locations were needed; the bytes are what onnxruntime parses
    files = {location: map_inside(bundle, rel) for location, rel in external.items()}
    try:
        return create_session(InMemoryGraph(graph, data, files), provider, config=config,
                              precision=spec.get("precision", "fp32"), threads=threads, arena=arena)
    finally:
        for mapped in files.values():
            if isinstance(mapped, mmap.mmap):
                mapped.close()


def check_provider(provider: str) -> None:
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider '{provider}'; available: {', '.join(PROVIDERS)}")


def qnn_devices() -> tuple[list, str]:
    """(the QNN EP's devices, the HTP backend library path); registers the plugin EP library once per process."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise InputError("provider 'qnn-htp' needs the onnxruntime-qnn package (pip install onnxruntime-qnn)") from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:  # not registered yet in this process (registering twice is an error in onnxruntime)
        ort.register_execution_provider_library(QNN_EP, onnxruntime_qnn.get_library_path())
        devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        raise InputError("provider 'qnn-htp': onnxruntime-qnn registered no QNN device")
    return devices, onnxruntime_qnn.get_qnn_htp_path()


def _qnn_htp_options(options: ort.SessionOptions, fallback: bool) -> ort.SessionOptions:
    devices, backend = qnn_devices()
    options.log_severity_level = 4  # the EP logs unsupported nodes as errors; they go into our one-line error instead
    if not fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.add_provider_for_devices(devices, {"backend_path": backend, **QNN_HTP_OPTIONS})
    return options


def cpu_assigned_ops(model: Path | InMemoryGraph, options: ort.SessionOptions, kwargs: dict) -> list[str]:
    """Op types of ``model`` that onnxruntime assigns to the CPU EP when QNN HTP is tried with fallback allowed."""
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = _session(model, _qnn_htp_options(options, fallback=True), **kwargs)
    return sorted({node.op_type for subgraph in session.get_provider_graph_assignment_info()
                   if subgraph.ep_name != QNN_EP for node in subgraph.get_nodes()})


def _qnn_htp_session(model: Path | InMemoryGraph, options: ort.SessionOptions, kwargs: dict):
    level = options.graph_optimization_level
    try:
        return _session(model, _qnn_htp_options(options, fallback=False), **kwargs)
    except Exception as exc:  # boundary: onnxruntime raises its own Fail/RuntimeError types
        reason = " ".join(str(exc).split())[:160]
    try:
        retry = ort.SessionOptions()
        retry.graph_optimization_level = level
        ops = cpu_assigned_ops(model, retry, kwargs)
    except Exception as exc:  # boundary: the diagnosis is best effort
        ops, reason = [], f"{reason}; placement unknown ({' '.join(str(exc).split())[:80]})"
    compute = [op for op in ops if op not in ("QuantizeLinear", "DequantizeLinear")]  # Q/DQ go with their op
    detail = f"unsupported op types {', '.join(compute or ops)}" if ops else reason
    name = model.name if isinstance(model, InMemoryGraph) else model.stem
    raise BundleError(f"graph {name} cannot run fully on qnn-htp: {detail}")
