"""onnxruntime.quantization backend: static QDQ with onnxruntime's QNN configuration helper.

Steps:
  0. with ``split_concat_convs``: a Conv reading a channel Concat split per input (``split_concat``)
  1. ``qnn_preprocess_model``: the graph rewrites QNN expects (Erf sequence -> Gelu, ...); over 2 GB with its
     optimizer step mapping the weights (``mapped_preprocess``)
  2. the ``time_features`` input (the sinusoidal timestep embedding, computed by the runtime) is quantized at 16 bits
     even in an 8-bit graph (TIME_FEATURES_BITS)
  3. ``get_qnn_qdq_config``: INT8 symmetric weights, per-channel for Conv and (through per-tensor overrides) for
     MatMul/Gemm weights, 8- or 16-bit asymmetric activations; MinMax calibration over ``CalibrationData``
  4. onnxruntime's calibrator on the graph with its weights mapped (``mapped_calibration``), then
     ``quantize_static`` on those ranges -> QDQ ONNX (the graph to deploy)
  5. ``htp_forms``: rewrites that keep every value but avoid forms the QNN HTP rejects or miscomputes
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from ..external_data import gather_external_data
from ..onnx_index import default_opset
from . import A8_PERCENTILE, TIME_FEATURES_BITS, TIME_FEATURES_INPUT, GraphJob, QuantizedGraph
from .mapped_calibration import calibrate_mapped, quantize_with_ranges
from .mapped_preprocess import optimizer_maps_weights
from .qnn.htp_forms import apply_htp_forms_file
from .split_concat import split_concat_convs

LARGE_MODEL_BYTES = 1_800_000_000  # above this the quantizer must write external data (protobuf 2 GB limit)
PER_CHANNEL_LINEAR_OPS = {"MatMul": 1, "Gemm": None}  # weight input axis of output channels (Gemm: from transB)


def _constant_arrays(model, base_dir: str = "", max_external_bytes: int = 1 << 20) -> dict:
    """name -> array of every initializer and Constant node output; of the initializers stored in external data
    (``base_dir``) only those up to ``max_external_bytes``: a large graph's weights are never read into memory
    (SD 1.5's low_res: 3.3 GB) for a check that only masks need."""
    import onnx
    from onnx import numpy_helper

    def small(tensor) -> bool:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return True
        length = {e.key: e.value for e in tensor.external_data}.get("length")
        return length is not None and int(length) <= max_external_bytes

    arrays = {i.name: numpy_helper.to_array(i, base_dir) for i in model.graph.initializer if small(i)}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def masked_softmax_path(model, base_dir: str = "") -> list[str]:
    """Constants holding non-finite values (CLIP's causal attention mask, -inf above the diagonal), the nodes that
    read them and the Softmax each one feeds: they stay float.

    Min-max calibration of a tensor that contains -inf gives an infinite range (measured on the tiny text encoder:
    -2.6 dB SQNR at 16 bits); replacing -inf by a finite value would either leak attention to masked tokens or
    stretch the 8/16-bit range of the scores until they round to one step. The Softmax's output ([0, 1]) is
    quantized again where the next op reads it."""
    import numpy as np

    arrays = _constant_arrays(model, base_dir)
    nonfinite = {name for name, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all()}
    if not nonfinite:
        return []
    from ..onnx_index import consumers

    readers = consumers(model.graph)
    found = [n.name for n in model.graph.node if n.op_type == "Constant" and n.output[0] in nonfinite]
    for node in model.graph.node:
        if node.op_type != "Constant" and any(i in nonfinite for i in node.input):
            found.append(node.name)
            found += [c.name for out in node.output for c in readers.get(out, []) if c.op_type == "Softmax"]
    return found


def float_only_tensors(model, float_nodes: list[str]) -> list[str]:
    """Tensors that ``float_nodes`` produce and only ``float_nodes`` read: no QuantizeLinear is ever placed on them.

    onnxruntime's quantizer still computes scale and zero point for every tensor calibration saw, read or not:
    CLIP's masked scores (``Add`` of the -inf causal mask) have min-max range [-inf, x], which gives scale inf, zero
    point NaN and two numpy RuntimeWarnings on the build's stderr (quant_utils.compute_scale_zp). These tensors get
    a fixed placeholder range (``FLOAT_ONLY_RANGE``) instead; it is never used, as no node quantizes them (the
    shipped graphs are checked for that, tests/quantize/test_qdq_params.py)."""
    from ..onnx_index import consumers

    excluded = set(float_nodes)
    readers = consumers(model.graph)
    outputs = {o for node in model.graph.node if node.name in excluded for o in node.output}
    return sorted(name for name in outputs
                  if readers.get(name) and all(r.name in excluded for r in readers[name]))


FLOAT_ONLY_RANGE = (0.0, 1.0)  # placeholder calibration range of a tensor that stays float (float_only_tensors)


def constants_to_initializers(model) -> int:
    """Turn Constant nodes into initializers in place (returns how many), as ``qnn_preprocess_model`` leaves a graph
    it rewrote; one it did not rewrite keeps its Constant nodes, whose outputs the quantizer then treats as
    activations: 16-bit InstanceNormalization scales where the validator expects 8-bit weights, and a 16-bit
    Resize ``scales`` that comes back a hair off 2, which with nearest/floor sampling moves rows (measured on the
    tiny VAE decoder: its upsampler's output fell to -2.8 dB SQNR, the image to 8.8 dB)."""
    from onnx import numpy_helper

    constants = [n for n in model.graph.node if n.op_type == "Constant" and n.attribute
                 and n.attribute[0].name == "value"]
    for node in constants:
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t),
                                                               node.output[0]))
        model.graph.node.remove(node)
    return len(constants)


def _linear_weight_overrides(model, quant_type) -> dict:
    """Per-channel symmetric INT8 overrides for MatMul/Gemm initializer weights (onnxruntime's ``per_channel`` flag
    only covers Conv/ConvTranspose)."""
    inits = {i.name: i for i in model.graph.initializer}
    overrides = {}
    for node in model.graph.node:
        if node.op_type not in PER_CHANNEL_LINEAR_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if len(weight.dims) != 2:
            continue
        axis = PER_CHANNEL_LINEAR_OPS[node.op_type]
        if axis is None:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        overrides[node.input[1]] = [{"axis": axis, "quant_type": quant_type, "symmetric": True}]
    return overrides


def _layernorm_gamma_overrides(model) -> dict:
    """UINT8 asymmetric overrides for LayerNormalization scale (gamma) initializers: the QNN HTP refuses a
    LayerNorm whose gamma is signed INT8 symmetric (what ``weight_symmetric=True`` gives), and accepts UINT8
    asymmetric (measured on a one-LayerNorm QDQ graph, 16-bit activations: 89.7 dB vs the CPU EP; docs/qnn_htp.md)."""
    from onnxruntime.quantization import QuantType

    inits = {i.name for i in model.graph.initializer}
    return {node.input[1]: [{"quant_type": QuantType.QUInt8, "symmetric": False}]
            for node in model.graph.node
            if node.op_type == "LayerNormalization" and len(node.input) > 1 and node.input[1] in inits}


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizer logs advice (opset upgrade, pre-processing) as root WARNINGs; keep builds readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def graph_bytes(path: Path) -> int:
    """Size of an ONNX graph with its external data files (``<name>.onnx.data`` beside it): the .onnx file of a
    large graph is small, so its own size says nothing about the 2 GB protobuf limit."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


MIXES = True  # builds mixed 8/16-bit graphs itself (GraphJob.a8_tensors), with the conversions the QNN HTP needs
QDQ_OPSET = 21  # 16-bit QuantizeLinear/DequantizeLinear (time_features are 16-bit even in an 8-bit graph)


def raise_opset(path: Path, opset: int = QDQ_OPSET) -> bool:
    """Convert the graph at ``path`` to ``opset`` in place, leaving its external data where it is.

    onnxruntime's quantizer would do this itself, but on the whole proto with its weights in memory, which cannot
    be serialised above 2 GB (measured: SD 1.5's low_res, "Failed to serialize proto"). Loaded without its external
    data the proto is small; the converter keeps the initializers' external references, so the ``.data`` file beside
    ``path`` stays valid. Returns whether anything changed.
    """
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path), load_external_data=False)
    current = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= opset:
        return False
    onnx.save_model(version_converter.convert_version(model, opset), str(path))
    return True


def drop_preprocess_mark(path: Path) -> bool:
    """Remove the ``onnx.infer`` mark ``qnn_preprocess_model`` leaves on its output (``onnxruntime.tools.qnn.
    preprocess``); returns whether there was one.

    onnxruntime's quantizer reloads a model whose mark is not its own (``onnxruntime.quant``, which
    ``quantize_static``'s shape-inferring load adds only where the key is absent) through a deep copy, a save with
    all its weights and a load: two more copies of the weights (measured on SD 1.5's low_res: the quantizer's peak
    9.6 GiB of anonymous memory for a 3.1 GB graph; bench/quantize_memory.py). Without the mark it adds its own
    and quantizes the model it loaded. The shipped graph's metadata then reads ``onnxruntime.quant``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    kept = [p for p in model.metadata_props if p.key != "onnx.infer"]
    if len(kept) == len(model.metadata_props):
        return False
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save_model(model, str(path))
    return True


def quantize_graph(job: GraphJob, settings, out_dir: Path) -> QuantizedGraph:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{job.name}.onnx"
    activation = {8: QuantType.QUInt8, 16: QuantType.QUInt16}[job.activation_bits]
    large = graph_bytes(job.fp32_onnx) > LARGE_MODEL_BYTES
    with _quiet_root_logger(), tempfile.TemporaryDirectory(prefix=f"cw-ort-{job.name}-") as tmp:
        # 1. QNN graph rewrites (onnxruntime 1.32's preprocess fails on onnxsim's metadata_props: drop them first)
        split: list[str] = []

        def load_source():
            source = onnx.load(str(job.fp32_onnx))
            del source.metadata_props[:]
            if settings.split_concat_convs:  # before everything, so the 8- and 16-bit graphs name the same tensors
                split[:] = split_concat_convs(source)
            return source

        pre = Path(tmp) / "pre.onnx"
        with optimizer_maps_weights(Path(tmp)) if large else contextlib.nullcontext():  # over 2 GB: mapped
            modified = qnn_preprocess_model(load_source(), str(pre), save_as_external_data=large,
                                            all_tensors_to_one_file=True)
        if not modified:
            # nothing rewritten: save a fresh copy (the proto given to qnn_preprocess_model can come back pointing
            # at external data files in a temp folder it already deleted; measured on the shapes model)
            source = load_source()
            constants_to_initializers(source)
            onnx.save_model(source, str(pre), save_as_external_data=large, all_tensors_to_one_file=True)
        raise_opset(pre)
        drop_preprocess_mark(pre)
        model = onnx.load(str(pre), load_external_data=False)
        # 2. time features 16-bit even in an 8-bit graph; CLIP's masked softmax stays float
        sixteen_bit = [name for name in job.input_names if name == TIME_FEATURES_INPUT]
        masked = masked_softmax_path(model, str(pre.parent))
        # sin/cos lie in [-1, 1] whichever timesteps calibration saw: a fixed range, not min-max of the samples
        overrides = {name: [{"quant_type": QuantType.QUInt16, "rmin": np.array(-1.0, np.float32),
                             "rmax": np.array(1.0, np.float32)}] for name in sixteen_bit}
        linear_weights = _linear_weight_overrides(model, QuantType.QInt8)
        layernorm_gammas = _layernorm_gamma_overrides(model)
        overrides.update(linear_weights)
        overrides.update(layernorm_gammas)
        float_only = float_only_tensors(model, masked)
        for name, (scale, zero_point) in job.a8_tensors.items():  # mixed: onnxruntime adds the conversions
            overrides[name] = [{"quant_type": QuantType.QUInt8, "scale": np.asarray(scale, np.float32),
                                "zero_point": np.asarray(zero_point, np.uint8)}]
        overrides.update({name: [{"rmin": np.array(FLOAT_ONLY_RANGE[0], np.float32),
                                  "rmax": np.array(FLOAT_ONLY_RANGE[1], np.float32)}] for name in float_only})
        # 3. QNN configuration
        job.calibration.rewind()
        percentile = job.activation_bits == 8 and settings.a8_range == "percentile"
        config = get_qnn_qdq_config(
            str(pre), job.calibration, activation_type=activation, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile if percentile else CalibrationMethod.MinMax,
            per_channel=True, weight_symmetric=True, init_overrides=overrides, nodes_to_exclude=masked,
            calibration_providers=["CPUExecutionProvider"])
        config.use_external_data_format = large
        if percentile:
            config.extra_options["CalibPercentile"] = A8_PERCENTILE
        # standard opset-21 QuantizeLinear/DequantizeLinear (16-bit capable), not com.microsoft contrib ops: other
        # tools (onnx shape inference, converters) understand them
        config.extra_options["UseQDQContribOps"] = False
        # 4. calibrate with the weights mapped from page-aligned external data (not three copies), then quantize
        if large:
            gather_external_data(pre)
        ranges = calibrate_mapped(pre, job.calibration, config, Path(tmp) / "ranges.json")
        quantize_with_ranges(pre, out, config, ranges)
    forms = apply_htp_forms_file(out)  # 5. numerics-preserving rewrites into forms the QNN HTP runs correctly
    qdq = onnx.load(str(out), load_external_data=False)
    return QuantizedGraph(out, None, {
        "float_masked_softmax_nodes": masked, "float_only_tensors": float_only,
        "time_features_bits": TIME_FEATURES_BITS if sixteen_bit else None,
        "per_channel_linear_weights": len(linear_weights), "uint8_layernorm_gammas": len(layernorm_gammas),
        "htp_forms": forms, **({"split_concat_convs": split} if split else {}),
        "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in qdq.graph.node),
        "opset": default_opset(qdq),
    })
