"""Export torch graphs to ONNX files with static shapes, simplified and checked (export stage).

Each graph is exported with the TorchScript exporter (``dynamo=False``; PLATFORM.md: clean at opset 17, ~1e-6 vs
torch), simplified with onnxsim where it helps, written with external data when the protobuf would pass 2 GB, checked
with ``onnx.checker`` and its torch-vs-onnxruntime parity measured on the example inputs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..contract.schema import GraphEntry, TensorSpec
from ..external_data import gather_external_data

PROTOBUF_LIMIT = 2 * 1024**3
NUMPY_TO_ONNX_DTYPE = {"float32": "float32", "int64": "int64", "float16": "float16"}


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    """The manifest's spec of one graph input or output, read off its example tensor."""
    return TensorSpec(name, tuple(int(d) for d in tensor.shape), str(tensor.dtype).replace("torch.", ""))


@dataclass(frozen=True)
class ExportResult:
    """What the bundle needs to know about one exported graph."""

    name: str
    file: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    simplified: bool
    external_data: bool
    parity: dict

    def entry(self, bundle: Path) -> GraphEntry:
        """The export stage's record of this graph: an FP32 entry of the manifest."""
        return GraphEntry(self.name, self.file.relative_to(bundle).as_posix(), tuple(self.inputs),
                          tuple(self.outputs), "fp32", external_data=self.external_data, simplified=self.simplified,
                          parity_fp32_vs_torch=self.parity)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def export_graph(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    output_names: list[str],
    path: Path,
    opset: int = 17,
    simplify: bool = True,
) -> ExportResult:
    """Export ``module`` (called positionally in ``example_inputs`` order) to ``path`` and measure ORT parity."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(example_inputs.values())
    with torch.no_grad():
        reference = _as_tuple(module(*args))
    if len(reference) != len(output_names):
        raise ValueError(f"{path.stem}: {len(reference)} outputs but {len(output_names)} names")
    large = _param_bytes(module) > PROTOBUF_LIMIT * 0.9
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=list(example_inputs), output_names=output_names,
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    simplified = False
    if simplify and not large:
        simplified = _simplify_in_place(path)
    if large:
        gather_external_data(path)
    onnx.checker.check_model(str(path))
    # The exporter drops inputs the graph never reads (e.g. encoder_hidden_states of a part without
    # cross-attention); the manifest and the wiring list only what the graph really takes.
    used = {value.name for value in onnx.load(str(path), load_external_data=False).graph.input}
    example_inputs = {n: t for n, t in example_inputs.items() if n in used}
    inputs = [tensor_spec(n, t) for n, t in example_inputs.items()]
    outputs = [tensor_spec(n, t) for n, t in zip(output_names, reference)]
    parity = measure_parity(path, example_inputs, dict(zip(output_names, reference)), prepack=not large)
    return ExportResult(path.stem, path, inputs, outputs, simplified, large, parity)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Redirect file descriptor 2 (C++ libraries write there directly) to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _simplify_in_place(path: Path) -> bool:
    """Run onnxsim; keep the result only if it still checks. Returns whether the file was replaced."""
    import onnx
    import onnxsim

    model = onnx.load(str(path))
    try:
        with _native_stderr_silenced():  # onnxsim prints per-op constant-folding notes from C++
            simplified, ok = onnxsim.simplify(model)
    except Exception as exc:  # onnxsim is an optimisation: a failure keeps the plain export
        warnings.warn(f"onnxsim failed on {path.name}, keeping unsimplified graph: {exc}")
        return False
    if not ok:
        return False
    onnx.save_model(simplified, str(path))
    return True


def ort_session(path: Path, providers: list[str] | None = None, prepack: bool = True):
    """A CPU onnxruntime session with default optimisation (FP32 graphs are stable under it).

    ``prepack=False`` for graphs whose weights live in page-aligned external data: onnxruntime then reads them from
    the mapped file (page cache, reclaimable) instead of packing an anonymous copy of every MatMul weight (measured
    on a 128 MB MatMul weight: +132 MB RssAnon with packing, +3.5 MB without; the file mapping holds the rest). For
    SDXL's 10 GB low_res that copy beside the torch model is the difference between fitting in 24 GB and not."""
    import onnxruntime as ort

    from ..runtime.sessions import session_options

    options = session_options()
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def tensor_stats(reference: np.ndarray, actual: np.ndarray) -> dict:
    """Max abs diff, its ratio to max|reference|, and SQNR in dB: the numbers every parity table shows."""
    reference = reference.astype(np.float64)
    actual = actual.astype(np.float64)
    err = actual - reference
    max_abs = float(np.max(np.abs(err))) if err.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    noise = float(np.mean(err**2))
    signal = float(np.mean(reference**2))
    sqnr = float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)
    return {"max_abs_diff": max_abs, "max_rel_diff": max_abs / scale if scale else max_abs,
            "sqnr_db": round(sqnr, 3) if np.isfinite(sqnr) else 999.0}


def measure_parity(path: Path, inputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                   prepack: bool = True) -> dict:
    """Run the ONNX file in onnxruntime on ``inputs`` and compare every output with the torch ``reference``."""
    session = ort_session(path, prepack=prepack)
    feeds = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    actual = dict(zip(names, session.run(names, feeds)))
    per_output = {name: tensor_stats(ref.detach().cpu().numpy(), actual[name]) for name, ref in reference.items()}
    worst = max(per_output.values(), key=lambda s: s["max_rel_diff"])
    return {"outputs": per_output, "max_rel_diff": worst["max_rel_diff"],
            "min_sqnr_db": min(s["sqnr_db"] for s in per_output.values())}


def file_size(path: Path) -> int:
    return os.path.getsize(path)


__all__ = ["TensorSpec", "tensor_spec", "ExportResult", "export_graph", "measure_parity", "tensor_stats", "ort_session", "asdict"]
