"""Parameters and FLOPs per graph and per clock schedule (``cw-export inspect``; the report's FLOPs figures).

Two independent counters give the same numbers (tested):
  * torch: ``torch.utils.flop_counter.FlopCounterMode`` over the split modules (cw_export.split) — on the meta device
    for published architectures (shapes only, no weights, ~2 s for SD 1.5);
  * ONNX: multiply-accumulates of every Conv / ConvTranspose / MatMul / Gemm node from the shapes that
    ``onnx.shape_inference`` gives the bundle's graphs (external weights are never loaded).

Conventions (PAPER.md "Split"):
  * FLOPs = 2 x MACs of convolutions and matrix products; norms, activations, softmax, adds and resizes are not counted.
  * ``flops`` counts attention matmuls (QK^T and AV); ``conv_linear_flops`` leaves them out, which is what the paper's
    DeepSpeed count did (SD 1.5 at 512²: 677.8 GFLOPs full UNet, 228.4 GFLOPs high-res + identity adaptor).
  * Batch 1 = one latent. Classifier-free guidance runs the UNet on batch 2 ([uncond, cond]) and doubles every UNet
    number; ``schedule`` gives both. The paper's headline TFLOPs (10.8 for SD 1.5, 8 steps) are conv+linear x CFG 2.
  * Schedule totals are UNet FLOPs (the part clocking changes); the text encoder and VAE decoder run once per image
    and are listed per graph only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import BundleError

CONV_OPS = ("aten.convolution", "aten._convolution", "aten.cudnn_convolution", "aten.convolution_overrideable",
            "aten._slow_conv2d_forward")
LINEAR_OPS = ("aten.mm", "aten.addmm")
# bmm/baddbmm: attention products (on the meta device SDPA decomposes into two bmm); the fused SDPA kernels likewise.
ATTENTION_OPS = ("aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_flash_attention_for_cpu",
                 "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention",
                 "aten._scaled_dot_product_cudnn_attention")
CFG_BATCH = 2  # classifier-free guidance: [uncond, cond]


@dataclass(frozen=True)
class GraphCost:
    """Parameters and FLOPs of one graph for batch 1, split by kind of operation."""

    params: int
    conv_flops: int
    linear_flops: int
    attention_flops: int
    # FLOPs of the counted nodes whose activation inputs are all 8-bit (each comes from a DequantizeLinear with an
    # 8-bit zero point): what runs at the NPU's 8-bit rate. Counted from ONNX graphs only (None from torch).
    a8_flops: int | None = None

    @property
    def flops(self) -> int:
        return self.conv_flops + self.linear_flops + self.attention_flops

    @property
    def conv_linear_flops(self) -> int:
        return self.conv_flops + self.linear_flops

    @property
    def a8_mac_share(self) -> float | None:
        """Share of the graph's MACs with 8-bit activation inputs (None when not counted)."""
        if self.a8_flops is None:
            return None
        return round(self.a8_flops / self.flops, 4) if self.flops else 0.0

    def to_dict(self) -> dict:
        data = {**asdict(self), "flops": self.flops, "conv_linear_flops": self.conv_linear_flops}
        if self.a8_flops is None:
            del data["a8_flops"]
        else:
            data["a8_mac_share"] = self.a8_mac_share
        return data


# --- torch side ---------------------------------------------------------------------------------------------------
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the CPU flash-attention kernel; same as its other SDPA formulas."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    import torch

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_sdpa_flop} if op is not None else {}  # FlopCounterMode wraps it to receive shapes


def count_module(module, inputs: tuple) -> tuple[GraphCost, object]:
    """Run ``module(*inputs)`` under FlopCounterMode; returns (cost, outputs).

    Parameters are those of the submodules that actually ran (a module may hold parts it does not run).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ran: dict[int, torch.nn.Module] = {}

    def record(mod, _args):
        ran[id(mod)] = mod

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
            outputs = module(*inputs)
    finally:
        handle.remove()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    unknown = set(per_op) - set(CONV_OPS) - set(LINEAR_OPS) - set(ATTENTION_OPS)
    assert not unknown, f"FLOP counter saw unclassified ops {unknown}"
    params = {id(p): p.numel() for mod in ran.values() for p in mod.parameters(recurse=False)}
    cost = GraphCost(params=sum(params.values()),
                     conv_flops=sum(per_op.get(op, 0) for op in CONV_OPS),
                     linear_flops=sum(per_op.get(op, 0) for op in LINEAR_OPS),
                     attention_flops=sum(per_op.get(op, 0) for op in ATTENTION_OPS))
    return cost, outputs


def count_model(model, latent_hw: tuple[int, int], adaptor: str = "identity") -> dict[str, GraphCost]:
    """Batch-1 cost of every graph a bundle of ``model`` has, on whatever device the model lives (meta is cheapest).

    The UNet parts and the text encoder are counted at batch 1 (a bundle runs them at batch 2 for guidance); the VAE
    decoder runs once per image at batch 1 anyway.
    """
    import torch

    from ..adaptor import build_adaptor, default_adaptor_config
    from ..export.wrappers import VaeDecoderGraph, text_graph
    from ..split import sdxl_time_ids, split_unet

    device = next(model.unet.parameters()).device
    text = model.text_encoder.config
    ids = torch.zeros((1, text.max_position_embeddings), dtype=torch.long, device=device)
    costs = {}
    costs["text_encoder"], (ehs, pooled) = count_module(text_graph(model), (ids, ids))
    split = split_unet(model.unet)
    sample = torch.zeros((1, model.unet.config.in_channels, *latent_hw), device=device)
    timestep = torch.full((1,), 999.0, device=device)
    time_ids = torch.tensor([sdxl_time_ids(*(d * model.vae_scale_factor for d in latent_hw))], device=device)
    costs["high_res_in"], (temb, r_in, *skips) = count_module(split.high_res_in,
                                                              (sample, timestep, ehs, pooled, time_ids))
    costs["low_res"], r_out = count_module(split.low_res, (r_in, temb, ehs))
    costs["high_res_out"], _ = count_module(split.high_res_out, (r_out, temb, ehs, *skips))
    if adaptor == "learned":
        with torch.device(device):
            module = build_adaptor(default_adaptor_config(model.unet, model.pooled_dim))
        costs["adaptor"], _ = count_module(module, (r_in, r_out, temb, pooled))
    latents = torch.zeros((1, model.vae.config.latent_channels, *latent_hw), device=device)
    costs["vae_decoder"], _ = count_module(VaeDecoderGraph(model.vae), (latents,))
    return costs


def per_block_costs(unet, latent_hw: tuple[int, int]) -> dict[str, GraphCost]:
    """Batch-1 cost of each UNet resolution block (DOWN-i, MID, UP-i), the breakdown PAPER.md quotes for SD 1.5.

    Params are left at 0 (blocks share nothing; the UNet total is in ``count_model``).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = next(unet.parameters()).device
    sample = torch.zeros((1, unet.config.in_channels, *latent_hw), device=device)
    context = torch.zeros((1, 77, unet.config.cross_attention_dim), device=device)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + 6 time ids (their values cost nothing)
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros((1, pooled), device=device), "time_ids": torch.zeros((1, 6), device=device)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        unet(sample, torch.zeros((1,), device=device), encoder_hidden_states=context, added_cond_kwargs=added)
    counts = counter.get_flop_counts()
    blocks = {f"DOWN-{i}": f"down_blocks.{i}" for i in range(len(unet.down_blocks))}
    blocks["MID"] = "mid_block"
    blocks.update({f"UP-{i}": f"up_blocks.{i}" for i in range(len(unet.up_blocks))})
    costs = {}
    for label, suffix in blocks.items():
        key = next((k for k in counts if k.endswith("." + suffix) and k.count(".") == suffix.count(".") + 1), None)
        ops = {str(op): int(n) for op, n in counts.get(key, {}).items()}
        costs[label] = GraphCost(0, sum(ops.get(o, 0) for o in CONV_OPS), sum(ops.get(o, 0) for o in LINEAR_OPS),
                                 sum(ops.get(o, 0) for o in ATTENTION_OPS))
    return costs


# --- ONNX side ----------------------------------------------------------------------------------------------------
def _constants(graph) -> set[str]:
    """Tensors computable from initializers alone (weights, also through folded-away Transpose/Reshape/Cast)."""
    constant = {init.name for init in graph.initializer}
    for node in graph.node:  # nodes are topologically sorted (ONNX requirement)
        if node.op_type == "Constant" or (node.input and all(not n or n in constant for n in node.input)):
            constant.update(node.output)
    return constant


def _prod(dims) -> int:
    return math.prod(int(d) for d in dims)


def _attr(node, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i
    return default


SMALL_EXTERNAL_BYTES = 1 << 16  # shape/index constants the shape inference must read; weights stay on disk


def _load_structure(bundle: Path, rel: str):
    """The graph without its weights, except small external tensors (shape arithmetic constants), read through the
    bundle's confinement (``runtime.graph_file``)."""
    import onnx

    from ..runtime.graph_file import external_bytes, read_graph

    _, model, external = read_graph(bundle, rel)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            if int(info.get("length", SMALL_EXTERNAL_BYTES + 1)) <= SMALL_EXTERNAL_BYTES:
                tensor.raw_data = external_bytes(bundle, external, tensor)
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]
    return model


def _counted_nodes_known(graph, shapes) -> bool:
    return all(all(d >= 0 for d in shapes.get(name, [-1])) for node in graph.node
               if node.op_type in COUNTED_ONNX_OPS for name in list(node.input[:2]) + [node.output[0]])


COUNTED_ONNX_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
EIGHT_BIT_TYPES = (2, 3)  # onnx TensorProto UINT8, INT8


def _zero_point_types(graph) -> dict[str, int]:
    """Element type of every tensor a DequantizeLinear can take as its zero point (initializers, Constant nodes)."""
    types = {init.name: init.data_type for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    types[node.output[0]] = attribute.t.data_type
    return types


def eight_bit_activations(graph, constant: set[str]) -> set[str]:
    """Activation tensors (not computable from weights alone) produced by a DequantizeLinear of an 8-bit value:
    its zero point is UINT8/INT8, or absent (ONNX's default zero point is uint8)."""
    zero_points = _zero_point_types(graph)
    found = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] in constant:
            continue
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zero_point is None or zero_points.get(zero_point) in EIGHT_BIT_TYPES:
            found.add(node.output[0])
    return found


def _inferred(model):
    """The graph with inferred shapes and its shape table: onnx.shape_inference (with data propagation); graphs
    that were not simplified keep Shape->Slice arithmetic it cannot follow, and then onnxruntime's symbolic shape
    inference fills them in."""
    import onnx

    from ..onnx_index import tensor_shapes

    graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = tensor_shapes(graph)
    if not _counted_nodes_known(graph, shapes):
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        graph = SymbolicShapeInference.infer_shapes(model, auto_merge=True).graph
        shapes = tensor_shapes(graph)
    return graph, shapes


def count_onnx(path: Path, rel: str | None = None) -> GraphCost:
    """MAC-based cost of one ONNX graph (``path``, or ``rel`` in the bundle ``path``), divided by its batch (the
    first dim of its first input); shapes from ``_inferred``."""
    import onnx

    if rel is None:
        path, rel = Path(path).parent, Path(path).name
    model = _load_structure(path, rel)
    graph, shapes = _inferred(model)
    constant = _constants(graph)
    eight_bit = eight_bit_activations(graph, constant)
    conv = linear = attention = a8 = 0
    for node in graph.node:
        if node.op_type not in COUNTED_ONNX_OPS:
            continue
        kind, macs = node_macs(node, shapes, constant, rel)
        if kind == "conv":
            conv += macs
        elif kind == "linear":
            linear += macs
        else:
            attention += macs
        activations = [name for name in node.input[:2] if name and name not in constant]
        if activations and all(name in eight_bit for name in activations):
            a8 += macs
    params = sum(_prod(init.dims) for init in graph.initializer
                 if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(init.dims) >= 1)
    batch = shapes[graph.input[0].name][0] or 1
    return GraphCost(params=params, conv_flops=2 * conv // batch, linear_flops=2 * linear // batch,
                     attention_flops=2 * attention // batch, a8_flops=2 * a8 // batch)


def node_macs(node, shapes: dict[str, list[int]], constant: set[str], rel: str = "graph") -> tuple[str, int]:
    """(kind, MACs) of one Conv / ConvTranspose / MatMul / Gemm node: kind is conv, linear (one operand is a weight)
    or attention (both operands are activations)."""
    op = node.op_type
    dims = [shapes.get(name) for name in list(node.input[:2]) + [node.output[0]]]
    if any(d is None or any(v < 0 for v in d) for d in dims):
        raise BundleError(f"{Path(rel).name}: node {node.name or op} has unknown shapes; cannot count its FLOPs")
    a, b, y = dims
    if op == "Conv":  # W [Cout, Cin/g, k...]: every output element reads Cin/g * k... inputs
        return "conv", _prod(y) * _prod(b[1:])
    if op == "ConvTranspose":  # W [Cin, Cout/g, k...]: every input element scatters to Cout/g * k... outputs
        return "conv", _prod(a) * _prod(b[1:])
    k = (a[0] if _attr(node, "transA", 0) else a[-1]) if op == "Gemm" else a[-1]
    kind = "linear" if node.input[0] in constant or node.input[1] in constant else "attention"
    return kind, _prod(y) * k


def mac_counts(model) -> dict[str, int]:
    """MACs of every named Conv / ConvTranspose / MatMul / Gemm node of an in-memory ONNX model (weights need not
    be loaded: shapes come from the initializers' dims), for choosing which MACs to run at 8 bits; unnamed nodes
    are named as ``quantize.mixed.mac_inputs`` names them."""
    graph, shapes = _inferred(model)
    constant = _constants(graph)
    return {node.name or f"{node.op_type}_{index}": node_macs(node, shapes, constant)[1]
            for index, node in enumerate(graph.node) if node.op_type in COUNTED_ONNX_OPS}


def count_bundle(bundle: Path, manifest: dict) -> dict[str, GraphCost]:
    return {name: count_onnx(Path(bundle), graph["file"]) for name, graph in sorted(manifest["graphs"].items())}


# --- schedule -----------------------------------------------------------------------------------------------------
def _sum(costs: dict[str, GraphCost], names: list[str], attr: str) -> int:
    return sum(getattr(costs[n], attr) for n in names if n in costs)


def schedule_costs(costs: dict[str, GraphCost], step_graphs: dict[str, list[str]], steps: int, clock: int) -> dict:
    """Per-step and per-image UNet FLOPs for an unclocked (every step full) and a clocked schedule."""
    from ..contract.schedule import FULL, step_kinds

    kinds = step_kinds(steps, clock)
    per_step = {kind: {"flops": _sum(costs, names, "flops"), "conv_linear_flops": _sum(costs, names, "conv_linear_flops"),
                       "graphs": list(names)}
                for kind, names in step_graphs.items()}

    def totals(attr: str) -> dict:
        full = steps * per_step[FULL][attr]
        clocked = sum(per_step[kind][attr] for kind in kinds)
        saving = 100.0 * (full - clocked) / full if full else 0.0
        return {"full_flops": full, "clocked_flops": clocked, "saving_pct": round(saving, 2),
                "full_flops_cfg": CFG_BATCH * full, "clocked_flops_cfg": CFG_BATCH * clocked}

    result = {"steps": steps, "clock": clock, "step_kinds": kinds, **totals("flops"),
              "conv_linear": totals("conv_linear_flops"), "per_step": per_step}
    loop = {n for names in step_graphs.values() for n in names if n in costs}
    if loop and all(costs[n].a8_flops is not None for n in loop):  # counted from ONNX graphs
        a8 = sum(_sum(costs, step_graphs[kind], "a8_flops") for kind in kinds)
        result["a8_mac_share"] = round(a8 / result["clocked_flops"], 4) if result["clocked_flops"] else 0.0
        result["a8_flops"] = a8
    return result


def inspect_report(costs: dict[str, GraphCost], step_graphs: dict[str, list[str]], steps: int, clock: int,
                   source: dict) -> dict:
    """The JSON ``cw-export inspect`` writes: per-graph params/FLOPs and the schedule totals."""
    return {
        "source": source,
        "convention": {"batch": 1, "flops": "2 x MACs of Conv/ConvTranspose/MatMul/Gemm (attention matmuls included)",
                       "conv_linear_flops": "same without attention matmuls (the paper's DeepSpeed convention)",
                       "cfg": f"classifier-free guidance runs batch {CFG_BATCH}: *_cfg totals are x{CFG_BATCH}",
                       "schedule": "UNet graphs only; text encoder and VAE decoder run once per image"},
        "graphs": {name: cost.to_dict() for name, cost in sorted(costs.items())},
        "schedule": schedule_costs(costs, step_graphs, steps, clock),
    }


def _human(flops: float) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if abs(flops) >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOPs"


def format_report(report: dict) -> str:
    """Plain-text table of an inspect report (what the CLI prints)."""
    g = 1e9
    lines = [f"{'graph':<14}{'params (M)':>12}{'GFLOPs':>11}{'conv+linear':>13}{'attention':>11}   (batch 1)"]
    for name, c in report["graphs"].items():
        lines.append(f"{name:<14}{c['params'] / 1e6:>12.2f}{c['flops'] / g:>11.3f}"
                     f"{c['conv_linear_flops'] / g:>13.3f}{c['attention_flops'] / g:>11.3f}")
    s = report["schedule"]
    lines.append("")
    for kind in sorted(s["per_step"], key=lambda k: k != "full"):
        step = s["per_step"][kind]
        lines.append(f"{kind} step ({' + '.join(step['graphs'])}): {_human(step['flops'])} "
                     f"({_human(step['conv_linear_flops'])} conv+linear)")
    cl = s["conv_linear"]
    lines.append(f"{s['steps']} steps, clock {s['clock']}, per image, batch 1: {_human(s['full_flops'])} -> "
                 f"{_human(s['clocked_flops'])} (saving {s['saving_pct']:.1f}%); conv+linear only "
                 f"{_human(cl['full_flops'])} -> {_human(cl['clocked_flops'])} (saving {cl['saving_pct']:.1f}%)")
    lines.append(f"with classifier-free guidance (batch {CFG_BATCH}): {_human(s['full_flops_cfg'])} -> "
                 f"{_human(s['clocked_flops_cfg'])}; conv+linear {_human(cl['full_flops_cfg'])} -> "
                 f"{_human(cl['clocked_flops_cfg'])}")
    if a8_share_text(report):
        lines.append(a8_share_text(report) + ".")
    return "\n".join(lines)


# --- entry points -------------------------------------------------------------------------------------------------
def a8_share_text(report: dict) -> str:
    """One sentence on the 8-bit activation share of an inspect report counted from ONNX graphs ('' otherwise)."""
    share = report["schedule"].get("a8_mac_share")
    if share is None:
        return ""
    loop = [n for kind in ("full", "clocked") for n in report["schedule"]["per_step"][kind]["graphs"]]
    per_graph = ", ".join(f"{n} {100 * report['graphs'][n]['a8_mac_share']:.1f}%" for n in dict.fromkeys(loop))
    return (f"{100 * share:.1f}% of the UNet's MACs per image (Conv/ConvTranspose/MatMul/Gemm of the denoising-loop "
            f"graphs, weighted by the clock schedule) take 8-bit activation inputs (per graph: {per_graph}); the "
            "rest take 16-bit or float inputs")


def inspect_bundle(bundle: Path, steps: int | None = None, clock: int | None = None) -> dict:
    from ..contract.manifest import read_manifest

    manifest = read_manifest(bundle)
    costs = count_bundle(bundle, manifest)
    steps = manifest["schedule"]["steps"] if steps is None else steps
    clock = manifest["schedule"]["clock"] if clock is None else clock
    source = {"bundle": str(bundle), "counter": "onnx shape inference (Conv/ConvTranspose/MatMul/Gemm MACs)",
              "latent": manifest["latent"]["shape"][2:], "target": manifest.get("target")}
    return inspect_report(costs, manifest["wiring"]["steps"], steps, clock, source)


def load_for_counting(spec: str):
    """A model to count: published architectures on the meta device (no weights), others loaded then moved to meta."""
    from ..models.pipeline import ARCHITECTURE_NAMES, build_architecture_model, load_model

    if spec in ARCHITECTURE_NAMES:
        return build_architecture_model(spec, device="meta")
    model = load_model(spec)
    for _, module in model.components():
        module.to("meta")
    return model


def inspect_model(spec: str, steps: int, clock: int, height: int = 0, width: int = 0,
                  adaptor: str = "identity") -> dict:
    from ..contract.graphs import make_wiring
    from ..errors import InputError

    model = load_for_counting(spec)
    factor = model.vae_scale_factor
    unet_factor = 2 ** (len(model.unet.down_blocks) - 1)
    latent = []
    for name, value in (("height", height), ("width", width)):
        value = value or model.default_latent_size * factor
        if value % (factor * unet_factor):
            raise InputError(f"--{name} {value} must be divisible by {factor * unet_factor}")
        latent.append(value // factor)
    costs = count_model(model, (latent[0], latent[1]), adaptor=adaptor)
    wiring = make_wiring(len(model.unet.up_blocks[-1].resnets), adaptor)
    source = {"model": spec, "counter": "torch FlopCounterMode on the split modules (meta device)",
              "latent": latent, "adaptor": adaptor}
    return inspect_report(costs, wiring["steps"], steps, clock, source)
