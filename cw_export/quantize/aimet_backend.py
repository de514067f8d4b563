"""aimet-torch backend: QuantizationSimModel per graph, on the torch module the FP32 graph was exported from.

Steps (PLATFORM.md lists the pitfalls each one avoids):
  1. inside a scope that is undone on exit: diffusers' ``Timesteps`` is excluded from quantization (the sim cannot be
     built otherwise), and every attention layer gets a processor made of aimet MatMul modules + nn.Softmax, so the
     attention matmuls are quantized (``scaled_dot_product_attention`` would stay float); aimet's model preparer is
     not used (it cannot trace diffusers)
  2. build the sim: per-channel symmetric INT8 weights, 8- or 16-bit asymmetric activations (min-max); the
     ``time_features`` input (the sinusoidal timestep embedding) is quantized at 16 bits, never 8
  3. ``compute_encodings`` over the graph's ``CalibrationData`` (an adapter feeds the arrays as torch tensors)
  4. export: ONNX + AIMET encodings JSON (``sim.onnx.export``, for QNN converters) and a QDQ ONNX
     (``aimet_torch.onnx.export``, opset 21: 16-bit QDQ needs it) that onnxruntime runs, its weights then stored as
     integers (``fold.fold_weight_quantizers_file``: aimet writes float weights + QuantizeLinear)

Known limit: functional ops inside diffusers blocks (residual adds, concats, the attention scale, gelu, interpolate)
are not modules, so aimet leaves them unquantized: in the QDQ graph they compute in float between DequantizeLinear and
QuantizeLinear nodes. The ``ort`` backend quantizes those too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

from ..onnx_index import default_opset
from . import TIME_FEATURES_BITS, TIME_FEATURES_INPUT, GraphJob, QuantizedGraph
from .fold import fold_weight_quantizers_file
from .qnn.htp_forms import apply_htp_forms_file

# aimet quantsim config: per-channel symmetric weights, float biases, quantized model inputs; LayerNorm gammas per
# tensor (the QNN HTP rejects a per-channel LayerNorm gamma: graphAddNode error 1000, docs/qnn_htp.md)
SIM_CONFIG = {
    "defaults": {
        "ops": {"is_output_quantized": "True"},
        "params": {"is_quantized": "True", "is_symmetric": "True"},
        "per_channel_quantization": "True",
        "strict_symmetric": "False",
        "unsigned_symmetric": "False",
    },
    "params": {"bias": {"is_quantized": "False"}},
    "op_type": {"LayerNormalization": {"per_channel_quantization": "False"}},
    "supergroups": [],
    "model_input": {"is_input_quantized": "True"},
    "model_output": {},
}


def _quantizable_processor_class():
    import torch
    from aimet_torch.nn.modules.custom import MatMul

    class QuantizableAttnProcessor(torch.nn.Module):
        """diffusers' AttnProcessor with its two matmuls and softmax as modules, so aimet quantizes them."""

        def __init__(self) -> None:
            super().__init__()
            self.scores = MatMul()
            self.softmax = torch.nn.Softmax(dim=-1)
            self.context = MatMul()

        def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                    *args, **kwargs):
            residual = hidden_states
            if attn.spatial_norm is not None:
                hidden_states = attn.spatial_norm(hidden_states, temb)
            input_ndim = hidden_states.ndim
            if input_ndim == 4:
                batch_size, channel, height, width = hidden_states.shape
                hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            query = attn.to_q(hidden_states)
            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
            query = attn.head_to_batch_dim(query) * attn.scale
            key = attn.head_to_batch_dim(key)
            value = attn.head_to_batch_dim(value)
            scores = self.scores(query, key.transpose(-1, -2))
            if attention_mask is not None:
                scores = scores + attn.prepare_attention_mask(attention_mask, key.shape[1], batch_size)
            hidden_states = self.context(self.softmax(scores), value)
            hidden_states = attn.batch_to_head_dim(hidden_states)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            if input_ndim == 4:
                hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
            if attn.residual_connection:
                hidden_states = hidden_states + residual
            return hidden_states / attn.rescale_output_factor

    return QuantizableAttnProcessor


def _register_quick_gelu() -> None:
    """A quantized QuickGELU (CLIP's MLP activation, x * sigmoid(1.702 x)): aimet has no class for it and refuses to
    build the sim without one; with it the activation's output is quantized like any module's (aimet's template)."""
    import torch
    from aimet_torch.nn import QuantizationMixin
    from transformers.activations import QuickGELUActivation

    @QuantizationMixin.implements(QuickGELUActivation)
    class QuantizedQuickGELUActivation(QuantizationMixin, QuickGELUActivation):
        def __quant_init__(self) -> None:
            super().__quant_init__()
            self.input_quantizers = torch.nn.ModuleList([None])
            self.output_quantizers = torch.nn.ModuleList([None])

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - aimet's signature
            if self.input_quantizers[0]:
                input = self.input_quantizers[0](input)
            with self._patch_quantized_parameters():
                ret = super().forward(input)
            if self.output_quantizers[0]:
                ret = self.output_quantizers[0](ret)
            return ret


@contextlib.contextmanager
def quantizable_scope(module):
    """Timesteps excluded from aimet, quantizable attention processors, a quantized QuickGELU (CLIP text encoder);
    all undone on exit."""
    from aimet_torch.nn import QuantizationMixin
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import Timesteps

    processor_cls = _quantizable_processor_class()
    saved_ignored = set(QuantizationMixin._ignored_module_types)
    saved_maps = (dict(QuantizationMixin.cls_to_qcls), dict(QuantizationMixin.qcls_to_cls))
    attentions = [m for m in module.modules() if isinstance(m, Attention)]
    saved_processors = [m.processor for m in attentions]
    try:
        QuantizationMixin.ignore(Timesteps)
        _register_quick_gelu()
        for attention in attentions:
            attention.set_processor(processor_cls())
        yield
    finally:
        for attention, processor in zip(attentions, saved_processors):
            attention.set_processor(processor)
        QuantizationMixin._ignored_module_types.clear()
        QuantizationMixin._ignored_module_types.update(saved_ignored)
        QuantizationMixin.cls_to_qcls.clear()
        QuantizationMixin.cls_to_qcls.update(saved_maps[0])
        QuantizationMixin.qcls_to_cls.clear()
        QuantizationMixin.qcls_to_cls.update(saved_maps[1])


@contextlib.contextmanager
def _quiet():
    """aimet logs and warns a lot at INFO/WARNING; keep the build's output readable (errors still raise)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    # aimet logs through many area loggers ("Quant", "Utils", "ConnectedGraph", ...) with their own handlers
    names = {"AimetLogger", "aimet_torch", "aimet_common", *logging.root.manager.loggerDict}
    loggers = [logging.getLogger(name) for name in sorted(names)]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def _time_features_quantizer(sim_model) -> str | None:
    """Give time_embedding.linear_1 a 16-bit input quantizer of range [-1, 1] (its input is the graph's
    time_features)."""
    from aimet_torch.quantization.affine import QuantizeDequantize

    for name, module in sim_model.named_modules():
        if name.endswith("time_embedding.linear_1") and hasattr(module, "input_quantizers"):
            quantizer = QuantizeDequantize((), bitwidth=TIME_FEATURES_BITS, symmetric=False)
            # sin/cos lie in [-1, 1] whichever timesteps calibration saw: a fixed range, not min-max of the samples
            quantizer.set_range(-1.0, 1.0)
            quantizer.allow_overwrite(False)
            module.input_quantizers[0] = quantizer
            return name
    return None


def quantize_graph(job: GraphJob, settings, out_dir: Path) -> QuantizedGraph:
    import aimet_torch
    import aimet_torch.onnx as aimet_onnx
    import onnx
    import torch
    from aimet_torch.quantsim import QuantizationSimModel

    out_dir.mkdir(parents=True, exist_ok=True)
    encodings_dir = out_dir.parent / "encodings"
    encodings_dir.mkdir(parents=True, exist_ok=True)

    def tensors(feeds: dict) -> tuple:
        return tuple(torch.from_numpy(feeds[name]) for name in job.input_names)

    first = next(iter(job.calibration))
    example = tensors(first)
    with _quiet(), tempfile.TemporaryDirectory(prefix=f"cw-aimet-{job.name}-") as tmp:
        config = Path(tmp) / "quantsim_config.json"
        config.write_text(json.dumps(SIM_CONFIG), encoding="utf-8")
        # 1-2. scoped patches, then the sim (a deep copy: the model itself is left untouched)
        with quantizable_scope(job.module):
            sim = QuantizationSimModel(job.module, example, default_output_bw=job.activation_bits,
                                       default_param_bw=settings.weight_bits if settings else 8,
                                       config_file=str(config))
        time_layer = _time_features_quantizer(sim.model) if TIME_FEATURES_INPUT in job.input_names else None

        # 3. calibration: the adapter from CalibrationData (dicts of arrays) to positional torch tensors
        def forward_pass(model) -> None:
            for feeds in job.calibration:
                model(*tensors(feeds))

        sim.compute_encodings(forward_pass)
        # 4. exports
        opset = 21  # 16-bit QDQ needs opset 21, and even an 8-bit graph has the 16-bit time features quantizer
        names = {"input_names": job.input_names, "output_names": job.output_names, "dynamo": False}
        plain = encodings_dir / f"{job.name}.onnx"
        sim.onnx.export(example, str(plain), encoding_version="1.0.0", opset_version=17, **names)
        qdq = out_dir / f"{job.name}.onnx"
        aimet_onnx.export(sim.model, example, str(qdq), opset_version=opset, **names)
    quantized_modules = sum(1 for m in sim.model.modules() if hasattr(m, "output_quantizers"))
    del sim  # its float weights are not needed for the fold below
    folded = fold_weight_quantizers_file(qdq)  # weights stored as integers, not float + QuantizeLinear
    forms = apply_htp_forms_file(qdq)  # numerics-preserving rewrites into forms the QNN HTP runs correctly
    encodings = encodings_dir / f"{job.name}.encodings"
    data = json.loads(encodings.read_text(encoding="utf-8"))
    return QuantizedGraph(qdq, encodings, {
        "aimet_torch": aimet_torch.__version__, "encodings_version": data.get("version"),
        "activation_encodings": len(data.get("activation_encodings", [])),
        "param_encodings": len(data.get("param_encodings", [])),
        "quantized_modules": quantized_modules, "time_features_quantizer": time_layer,
        "weights_stored_quantized": folded, "htp_forms": forms,
        "time_features_bits": TIME_FEATURES_BITS if time_layer else None, "encodings_graph": f"encodings/{job.name}.onnx",
        "opset": default_opset(onnx.load(str(qdq), load_external_data=False)),  # as written, not as asked
        "float_functional_ops": "residual adds, concats, attention scale, gelu, interpolate (not modules in diffusers)",
    })
