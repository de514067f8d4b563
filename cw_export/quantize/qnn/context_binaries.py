"""QNN context binaries: each quantized graph compiled offline for a Snapdragon SoC (``cw-export --soc NAME``).

An app that loads a QDQ ONNX graph with onnxruntime's QNN execution provider compiles it for the HTP at every
session creation (seconds to minutes on a phone). A context binary is that compiled form, made once here with
onnxruntime-qnn's HTP backend (emulated on x86_64) and loaded on the device as an ``EPContext`` model:

  context/<SOC>/<graph>_ctx.onnx        one com.microsoft EPContext node; same float32 inputs/outputs as the graph
  context/<SOC>/<graph>_ctx_qnn.bin     the QNN context binary it points to (embed_mode 0: kept beside it)

Steps per SoC and quantized graph:
  1. a QNN HTP session on the graph with ``ep.context_enable=1``, ``ep.context_embed_mode=0``,
     ``ep.context_file_path=<graph>_ctx.onnx`` and the SoC's ``soc_model`` / ``htp_arch`` (recipes/socs.toml); CPU
     fallback disabled, graph-I/O quantization kept on the HTP, so the whole graph is one HTP partition
  2. on failure, one line naming the graph and what the HTP refused (op types and the first rejected node, read from
     the QNN EP's own log); the build then fails and leaves no bundle
  3. the manifest lists the files under ``context_binaries[soc][graph]``; their sha256 come from the file list

Known limit (docs/qnn_htp.md): the bundle graphs do not all place on the HTP yet, and such a graph has no context.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ...errors import BundleError, InputError, RecipeError
from ...resources import data_dir

SOCS_FILE = "socs.toml"
CONTEXT_DIR = "context"
CONTEXT_SUFFIX = "_ctx.onnx"
SOC_KEYS = {"soc_model", "htp_arch", "device"}


@dataclass(frozen=True)
class Soc:
    """One row of recipes/socs.toml: the QNN provider options a context binary for this SoC is compiled with."""

    name: str
    soc_model: int  # QNN SoC id (QNN_SOC_MODEL_* in the QNN SDK)
    htp_arch: int  # Hexagon tensor processor version (75 = v75)
    device: str  # marketing name, for humans

    def provider_options(self) -> dict[str, str]:
        return {"soc_model": str(self.soc_model), "htp_arch": str(self.htp_arch)}


def load_socs(path: Path | None = None) -> dict[str, Soc]:
    """The known SoCs by name, from recipes/socs.toml (checked strictly: a typo must not pass silently)."""
    path = path or data_dir("recipes") / SOCS_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"cannot read the SoC table {path}: {exc}") from None
    if data.get("schema_version") != 1 or not isinstance(data.get("socs"), dict) or set(data) != {"schema_version",
                                                                                                   "socs"}:
        raise RecipeError(f"{path.name}: expected schema_version = 1 and [socs.NAME] tables only")
    socs = {}
    for name, row in data["socs"].items():
        if not isinstance(row, dict) or set(row) != SOC_KEYS or not all(
                isinstance(row[k], int) and not isinstance(row[k], bool) for k in ("soc_model", "htp_arch")):
            raise RecipeError(f"{path.name}: [socs.{name}] needs exactly {sorted(SOC_KEYS)} "
                              "(soc_model and htp_arch integers)")
        socs[name] = Soc(name, row["soc_model"], row["htp_arch"], str(row["device"]))
    return socs


def parse_socs(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``--soc`` values (repeatable, comma-separated, any case) -> known SoC names, in order, without repeats.

    An unknown name is one InputError listing the known ones, raised before any heavy work."""
    names: list[str] = []
    for value in values or ():
        for part in str(value).split(","):
            name = part.strip().upper()
            if name and name not in names:
                names.append(name)
    if values and not names:
        raise InputError("--soc needs a SoC name, e.g. --soc SM8650")
    known = load_socs()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(f"unknown SoC '{unknown[0]}'; known: {', '.join(known)} (recipes/{SOCS_FILE})")
    return tuple(names)


def check_context_settings(socs: tuple[str, ...], quantized: bool) -> None:
    """Before any heavy work: known SoCs, a quantized target, and onnxruntime-qnn importable."""
    if not socs:
        return
    parse_socs(list(socs))
    if not quantized:
        raise InputError("--soc compiles quantized graphs for the NPU; use a quantized target (snapdragon-*)")
    from ...runtime.sessions import qnn_devices

    qnn_devices()  # InputError when onnxruntime-qnn is missing


# -- the QNN EP's own diagnosis ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what native code writes to file descriptor 2 (onnxruntime's logger) while the block runs; restored
    on exit. The QNN EP reports the nodes it refuses only there."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


_UNSUPPORTED = re.compile(r"\{ name: ([^,]*), type: (\w+) \}")
_ADD_NODE_FAILED = re.compile(r"graphAddNode\(\) failed for node `([^`]+)` of type `(\w+)`(?: with error code (\d+))?")


def _op_types(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {node.name: node.op_type for node in model.graph.node}


def diagnose(path: Path, log: list[str], reason: str) -> str:
    """What the HTP refused, from the QNN EP's log lines: op types it did not take (with counts) and the first node
    its graph composition rejected; ``reason`` (the exception text) when the log names neither."""
    unsupported: Counter = Counter()
    examples: dict[str, str] = {}
    rejected = None
    for line in log:
        if "Unsupported nodes in QNN EP" in line:  # one line per capability pass, each listing every such node
            nodes = _UNSUPPORTED.findall(line)
            for op, count in Counter(op for _, op in nodes).items():
                unsupported[op] = max(unsupported[op], count)
            for name, op in nodes:
                if name.strip():
                    examples.setdefault(op, name.strip())
        match = _ADD_NODE_FAILED.search(line)
        if match and rejected is None:
            rejected = match.groups()
    parts = []
    if rejected:
        node, qnn_type, code = rejected
        op = _op_types(path).get(node, qnn_type)
        parts.append(f"the HTP rejects {op} (first at node {node}, QNN type {qnn_type}"
                     f"{f', error {code}' if code else ''})")
    if unsupported:
        listed = ", ".join(f"{op} x{count}" + (f" (e.g. {examples[op]})" if op in examples else "")
                           for op, count in sorted(unsupported.items()))
        parts.append(f"not placed on the HTP: {listed}")
    if not parts:
        parts.append(" ".join(reason.split())[:200])
    return "; ".join(parts)


# -- generation ----------------------------------------------------------------------------------------------------
def _qnn_options(soc: Soc | None, config: dict | None, generate: Path | None):
    """SessionOptions for the QNN HTP with CPU fallback disabled; ``generate`` = the EPContext model to write."""
    import onnxruntime as ort

    from ...runtime.sessions import OPTIMIZATION_LEVELS, qnn_devices

    devices, backend = qnn_devices()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors: the EP's "Unsupported nodes" and graphAddNode failures (captured)
    if config is not None:
        options.graph_optimization_level = OPTIMIZATION_LEVELS[config["graph_optimization_level"]]
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if generate is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_embed_mode", "0")
        options.add_session_config_entry("ep.context_file_path", str(generate))
    provider = {"backend_path": backend, "offload_graph_io_quantization": "0"}
    if soc is not None:
        provider.update(soc.provider_options())
    options.add_provider_for_devices(devices, provider)
    return options


def _context_binary(model: Path) -> tuple[str, int]:
    """(the .bin file an EPContext model points to, relative to it; its embed_mode)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "EPContext"]
    if len(nodes) != 1 or len(graph.node) != 1:
        raise BundleError(f"{model.name}: expected exactly one EPContext node, found {len(graph.node)} node(s) "
                          f"({len(nodes)} EPContext)")
    attrs = {a.name: a for a in nodes[0].attribute}
    return attrs["ep_cache_context"].s.decode("utf-8"), int(attrs["embed_mode"].i)


def generate_context(graph: Path, out_model: Path, soc: Soc, config: dict | None = None,
                     name: str | None = None) -> tuple[Path, Path]:
    """Compile one QDQ graph for ``soc``: returns (EPContext model, context binary); BundleError naming the graph
    and what the HTP refused when the graph does not place fully on the HTP (nothing is written then)."""
    import onnxruntime as ort

    name = name or graph.stem
    out_model.parent.mkdir(parents=True, exist_ok=True)
    options = _qnn_options(soc, config, out_model)
    try:
        with _captured_stderr() as log:
            ort.InferenceSession(str(graph), options, disabled_optimizers=list((config or {}).get(
                "disabled_optimizers", [])))
    except Exception as exc:  # boundary: onnxruntime raises its own EPFail/Fail types
        for stale in out_model.parent.glob(f"{out_model.stem}*"):
            stale.unlink()
        raise BundleError(f"graph {name}: no QNN context binary for {soc.name}: {diagnose(graph, log, str(exc))} "
                          "(every node must run on the HTP; docs/qnn_htp.md)") from None
    if not out_model.is_file():
        raise BundleError(f"graph {name}: onnxruntime-qnn wrote no context model for {soc.name}")
    binary, embed_mode = _context_binary(out_model)
    if embed_mode != 0 or not (out_model.parent / binary).is_file():
        raise BundleError(f"graph {name}: context model for {soc.name} has embed_mode {embed_mode} / binary "
                          f"{binary!r} missing beside it")
    return out_model, out_model.parent / binary


def load_context(model: Path):
    """An onnxruntime session on an EPContext model (the device path: QNN HTP, CPU fallback disabled)."""
    import onnxruntime as ort

    try:
        with _captured_stderr() as log:
            return ort.InferenceSession(str(model), _qnn_options(None, None, None))
    except Exception as exc:  # boundary: a broken or foreign context binary is a finding
        detail = " ".join(str(exc).split())[:160]
        errors = [line for line in log if "E:" in line]
        raise BundleError(f"context model {model.name} does not load on the QNN HTP: {detail}"
                          f"{'; ' + ' '.join(errors[-1].split())[:160] if errors else ''}") from None


def context_stage(bundle: Path, manifest: dict, socs: tuple[str, ...], progress: bool = False) -> dict:
    """Compile every quantized graph of ``manifest`` for each SoC into ``bundle/context/<SOC>/``; returns the
    manifest's ``context_binaries`` record (SoC -> graph -> files and versions). The first graph that does not
    place fails the build (one line)."""
    import onnxruntime_qnn

    from ...progress import progress_bar
    from ...runtime.sessions import manifest_session_config

    known = load_socs()
    socs = parse_socs(list(socs))  # names as the table spells them
    config = manifest_session_config(manifest)
    graphs = sorted(n for n, g in manifest["graphs"].items() if g.get("precision", "fp32") != "fp32")
    if not graphs:
        raise BundleError("--soc: this bundle has no quantized graph to compile for the HTP")
    jobs = [(soc, graph) for soc in socs for graph in graphs]
    table: dict = {}
    for soc_name, graph in progress_bar(jobs, enabled=progress, desc="context", unit="graph"):
        soc = known[soc_name]
        model, binary = generate_context(bundle / manifest["graphs"][graph]["file"],
                                         bundle / CONTEXT_DIR / soc.name / f"{graph}{CONTEXT_SUFFIX}", soc, config,
                                         name=graph)
        node = _ep_context_attributes(model)
        table.setdefault(soc.name, {})[graph] = {
            "model": model.relative_to(bundle).as_posix(), "binary": binary.relative_to(bundle).as_posix(),
            "embed_mode": 0, "soc_model": soc.soc_model, "htp_arch": soc.htp_arch, "device": soc.device,
            "qnn_sdk": node.get("ep_sdk_version"), "onnxruntime_qnn": onnxruntime_qnn.__version__,
            "inputs": manifest["graphs"][graph]["inputs"], "outputs": manifest["graphs"][graph]["outputs"]}
    return table


def _ep_context_attributes(model: Path) -> dict:
    import onnx

    node = onnx.load(str(model), load_external_data=False).graph.node[0]
    return {a.name: (a.s.decode("utf-8") if a.type == onnx.AttributeProto.STRING else a.i) for a in node.attribute}


__all__ = ["Soc", "load_socs", "parse_socs", "check_context_settings", "generate_context", "load_context",
           "context_stage", "diagnose", "CONTEXT_DIR"]
