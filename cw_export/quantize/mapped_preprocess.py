"""onnxruntime's ``qnn_preprocess_model`` on a large graph (the backend's 1.8 GB external-data size), with the
weights mapped in its optimizer step.

``qnn_preprocess_model`` first runs onnxruntime's basic graph optimizer (``save_and_reload_optimize_model``): it
saves the graph to a temporary folder, opens a session on it that reads every weight into memory, has the session
write the optimized graph, and loads that back whole. Measured on SD 1.5's low_res (3.07 GiB): 6.6 GiB of anonymous
memory, the peak of the whole quantize step (bench/quantize_memory.py); SDXL's 10 GB low_res would need about 20 GB.

``optimizer_maps_weights(folder)`` replaces that one step, for the duration of the ``with``, by the same optimizer
(the same options, the same disabled ``ConstantSharing``) working in ``folder``: the graph's weights are written once
to page-aligned external data (``external_data.gather_external_data``) that the session maps; the optimized graph
onnxruntime writes keeps pointing at that file for every weight it did not change, and only its proto is loaded
back. The fusions that follow read small constants only (inline, under 1 KiB), and the graph ``qnn_preprocess_model``
saves still points at the same file, so ``folder`` must be where that graph is saved and outlive its use (the
backend's ``gather_external_data`` then moves the weights into the graph's own ``.data``). On a small graph the
output is ``qnn_preprocess_model``'s own byte for byte (tests/quantize/test_mapped_calibration.py); on SD 1.5's
low_res the backend's QDQ graph is the same node for node with every input the same value, but 177 small int64
Reshape shapes that the replaced step shared between nodes are one per node (bench/quantize_memory.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

INPUT_NAME = "qnn-preprocess-input.onnx"
OPTIMIZED_NAME = "qnn-preprocess-optimized.onnx"  # its proto only; the weights stay in the input's .data
PREPROCESS_MARK = {"onnx.infer": "onnxruntime.tools.qnn.preprocess"}  # what the replaced step marks, as it does


def _optimized_with_mapped_weights(folder: Path, model, shape_infer: bool):
    """``preprocess.save_and_reload_optimize_model`` with the weights mapped (module doc)."""
    import onnx
    import onnxruntime

    from ..external_data import gather_external_data

    source, inferred = folder / INPUT_NAME, folder / f"inferred-{INPUT_NAME}"
    onnx.save_model(model, str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{INPUT_NAME}.data")  # what the replaced step saves: initializers of 1 KiB and more
    gather_external_data(source)  # the same tensors, page-aligned
    if shape_infer:
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
        source = inferred
    optimized = folder / OPTIMIZED_NAME
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=["ConstantSharing"])
    inferred.unlink(missing_ok=True)  # the shape-inferred copy's structure (its weights stay in the .data)
    result = onnx.load(str(optimized), load_external_data=False)
    marks = dict(PREPROCESS_MARK)
    marks.update({p.key: p.value for p in result.metadata_props})
    onnx.helper.set_model_props(result, marks)
    return result


@contextlib.contextmanager
def optimizer_maps_weights(folder: Path):
    """Within: ``qnn_preprocess_model``'s optimizer step maps the weights and works in ``folder`` (module doc)."""
    from onnxruntime.quantization.execution_providers.qnn import preprocess

    def step(model, shape_infer):
        return _optimized_with_mapped_weights(Path(folder), model, shape_infer)

    with mock.patch.object(preprocess, "save_and_reload_optimize_model", step):
        yield
