"""Per-layer mixed precision: 8-bit activations for the layers that tolerate them, 16-bit for the rest.

Used when a whole graph at 8-bit activations misses the recipe's SQNR floor. Both backends already produced two QDQ
graphs of the same FP32 graph (all-16 and all-8 activations) with the same tensor names, so a mixed graph needs no
new calibration: it is the 16-bit graph with the scale / zero-point initializers of chosen activation tensors taken
from the 8-bit graph (onnxruntime and QNN requantize between a 16-bit and an 8-bit tensor).

The sweep works on layer groups, not single tensors: a group is the module path of a tensor (``/down_blocks.0/
resnets.0/conv1/Conv_output_0`` -> ``down_blocks.0/resnets.0/conv1`` at layer depth, ``down_blocks.0/resnets.0`` at
block depth), or at MAC depth one Conv / MatMul / Gemm node run at 8 bits with conversions around it
(``convert_macs``: everything between the MACs stays at 16 bits, the form the QNN HTP runs), so its cost is one
session per group and the manifest can say which layers run at 8 bits.

  1. sensitivity: for each group, SQNR of the 16-bit graph with only that group at 8 bits
  2. order the groups from least to most harmful, or (``a8_mac_order = "macs"``) by MACs per share of the noise
     budget each one spends alone (a knapsack's greedy order: the noise of independent 8-bit MACs adds up)
  3. the largest prefix whose merged graph keeps the SQNR floor wins (binary search: SQNR falls, almost
     monotonically, as more groups go to 8 bits; the winner is re-measured)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SWEEP_DEPTHS = {"block": 2, "layer": 3}  # module-path components that name a group
WRAPPER = "wrapped"  # the attribute of quantize.stages' input-dropping wrapper: not a level of the model
EIGHT_BIT = {2, 3}  # onnx TensorProto UINT8, INT8
SIXTEEN_BIT = {4, 5}  # UINT16, INT16


def activation_quantizers(model) -> dict[str, tuple[str, str]]:
    """tensor name -> (scale, zero-point initializer names) of every QuantizeLinear on an activation (not a weight)."""
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        zero_point = inits.get(node.input[2])
        if zero_point is None or zero_point.data_type not in EIGHT_BIT | SIXTEEN_BIT:
            continue
        if zero_point.data_type in (3, 5):  # signed zero point: symmetric weights fed through a Constant node
            continue
        found[node.input[0]] = (node.input[1], node.input[2])
    return found


def sixteen_bit_tensors(model) -> list[str]:
    """Activation tensors quantized at 16 bits: the ones a sweep can move to 8."""
    inits = {i.name: i for i in model.graph.initializer}
    return [t for t, (_, zp) in activation_quantizers(model).items() if inits[zp].data_type in SIXTEEN_BIT]


def group_of(tensor: str, depth: int) -> str:
    """The module path of an exported tensor name, cut to ``depth`` components ('graph' for top-level tensors)."""
    parts = [p for p in tensor.split("/") if p]
    modules = parts[:-1] if tensor.startswith("/") else []
    if modules[:1] == [WRAPPER]:
        modules = modules[1:]
    return "/".join(modules[:depth]) if modules else "graph"


def _components(tensors: list[str], links) -> dict[str, str]:
    """Each tensor's component under ``links`` (pairs that must move together), named by its earliest member in
    ``tensors``' order."""
    order = {t: i for i, t in enumerate(tensors)}
    parent = {t: t for t in tensors}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for t, other in links:
        a, b = find(t), find(other)
        if a != b:  # union: the earlier tensor in graph order is the root
            parent[max(a, b, key=order.get)] = min(a, b, key=order.get)
    return {t: find(t) for t in tensors}


def _shared_parameters(model, tensors: list[str]):
    """Pairs of tensors that share a quantization parameter initializer (onnxruntime gives e.g. a Reshape's input
    and output the same scale): changing it moves both, so they must stay in one group."""
    quantizers = activation_quantizers(model)
    owner: dict[str, str] = {}  # initializer name -> first tensor using it
    for t in tensors:
        for init in quantizers[t]:
            yield t, owner.setdefault(init, t)


def group_tensors(model, tensors: list[str], depth: int) -> dict[str, list[str]]:
    """Sweep groups of ``tensors`` by module path; tensors that share quantization parameters always land in the
    same group, the one of the first of them in graph order."""
    root = _components(tensors, _shared_parameters(model, tensors))
    groups: dict[str, list[str]] = {}
    for t in tensors:
        groups.setdefault(group_of(root[t], depth), []).append(t)
    return groups


MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")  # the ops whose activation inputs a8_mac_share counts


def mac_inputs(model) -> dict[str, list[str]]:
    """MAC node name -> the activation tensors whose DequantizeLinear feeds it (tensor -> QuantizeLinear ->
    DequantizeLinear -> Conv/ConvTranspose/MatMul/Gemm); weights (initializer-fed quantizers) are not listed."""
    quantizers = activation_quantizers(model)
    produced_by = {out: node for node in model.graph.node for out in node.output}
    found: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in MAC_OPS:
            continue
        tensors = []
        for name in node.input[:2]:
            dq = produced_by.get(name)
            q = produced_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in quantizers:
                tensors.append(q.input[0])
        if tensors:
            found[node.name or f"{node.op_type}_{index}"] = tensors
    return found


def convertible_macs(base, donor) -> list[str]:
    """The MAC nodes (``mac_inputs``) of ``base`` that can run at 8 bits inside it (``convert_macs``): every
    activation input and the output pass through a 16-bit QuantizeLinear in ``base`` and have an 8-bit one in
    ``donor`` (the time features stay 16-bit even in the 8-bit graph, so a MAC reading them is not convertible)."""
    base_q, donor_q = activation_quantizers(base), activation_quantizers(donor)
    base_inits = {i.name: i for i in base.graph.initializer}
    donor_inits = {i.name: i for i in donor.graph.initializer}
    nodes = {node.name: node for node in base.graph.node}
    out = []
    for mac, inputs in mac_inputs(base).items():
        node = nodes.get(mac)
        tensors = [*inputs, node.output[0]] if node is not None else []
        if tensors and all(t in base_q and t in donor_q and base_inits[base_q[t][1]].data_type in SIXTEEN_BIT
                           and donor_inits[donor_q[t][1]].data_type in EIGHT_BIT for t in tensors):
            out.append(mac)
    return out


def convert_macs(base, donor, macs: list[str], output_bits: int = 8):
    """A copy of ``base`` (16-bit QDQ) in which the MAC nodes ``macs`` run at 8 bits, as the QNN HTP runs mixed
    precision: each activation input is converted 16 -> 8 bits in front of the node (DequantizeLinear16 ->
    QuantizeLinear8 -> DequantizeLinear8, onnxruntime's QDQ form of a QNN Convert), its output is quantized at 8 bits
    and converted back to 16 for its readers, and its bias is the 8-bit graph's (a quantized bias's scale is input
    scale x weight scale). 8-bit scales and zero points are ``donor``'s (the 8-bit QDQ graph of the same FP32 graph;
    weights are INT8 in both). Everything else stays at 16 bits, so the graph's numbers change only at these MACs."""
    import onnx
    from onnx import helper

    from ..onnx_index import copy_inline, refresh_value_info

    merged = onnx.ModelProto()
    merged.CopyFrom(base)
    chosen = set(macs)
    donor_q = activation_quantizers(donor)
    donor_inits = {i.name: i for i in donor.graph.initializer}
    inits = {i.name: i for i in merged.graph.initializer}
    produced_by = {out: node for node in merged.graph.node for out in node.output}
    feeds = mac_inputs(merged)
    params: dict[str, tuple[str, str]] = {}  # tensor -> its 8-bit (scale, zero point) initializers in ``merged``

    def eight_bit(tensor: str) -> tuple[str, str]:
        if tensor not in params:
            names = (f"{tensor}_a8_scale", f"{tensor}_a8_zero_point")
            for name, source in zip(names, donor_q[tensor]):
                copy = onnx.TensorProto()
                copy_inline(copy, donor_inits[source])
                copy.name = name
                merged.graph.initializer.append(copy)
            params[tensor] = names
        return params[tensor]

    def requantize(source: str, scale_zero_point: tuple[str, str], quantized: str, out: str, q_name: str) -> str:
        """QuantizeLinear8 -> DequantizeLinear8 of ``source`` appended to the new node list; returns its output."""
        new_nodes.append(helper.make_node("QuantizeLinear", [source, *scale_zero_point], [quantized], name=q_name))
        new_nodes.append(helper.make_node("DequantizeLinear", [quantized, *scale_zero_point], [out],
                                          name=f"{out}_DequantizeLinear"))
        return out

    converted: dict[str, str] = {}  # 16-bit DequantizeLinear output -> its 8-bit conversion
    new_nodes = []
    rewire: dict[str, str] = {}  # a MAC output's 16-bit QuantizeLinear reads its 8-bit DequantizeLinear instead
    for node in merged.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in rewire:
            node.input[0] = rewire[node.input[0]]
        if node.name not in chosen:
            new_nodes.append(node)
            continue
        # the node's own bias, found from the node: when the MAC writing its input is converted too, that
        # tensor's 16-bit QuantizeLinear already reads the 8-bit output (``rewire``), and a search by the
        # input's name missed the bias (SD 1.5: the upsampler conv -> conv_shortcut; the HTP then read the
        # 16-bit-scaled int32 bias at the 8-bit scale, 257x too large: low_res 28.7 dB on the HTP, 39 dB on CPU)
        for name in node_bias_quantizers(node, produced_by, inits):
            copy_inline(inits[name], donor_inits[name])
        tensors = iter(feeds[node.name])
        for index, name in enumerate(node.input[:2]):
            dq = produced_by.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
                continue  # a weight
            tensor = next(tensors)
            if name not in converted:
                q8 = f"{name}_to_a8"
                converted[name] = requantize(name, eight_bit(tensor), q8, f"{name}_a8", f"{q8}_QuantizeLinear")
            node.input[index] = converted[name]
        new_nodes.append(node)
        if output_bits == 16:  # the MAC reads 8 bits and writes its 16-bit output as before
            continue
        output = node.output[0]
        rewire[output] = requantize(output, eight_bit(output), f"{output}_a8_QuantizeLinear_Output", f"{output}_a8",
                                    f"{output}_a8_QuantizeLinear")
    del merged.graph.node[:]
    merged.graph.node.extend(new_nodes)
    return refresh_value_info(merged)


def merge_activations(base, donor, tensors: list[str]):
    """A copy of ``base`` (16-bit QDQ ModelProto) whose ``tensors`` use ``donor``'s (8-bit) quantization parameters."""
    import onnx

    from ..onnx_index import copy_inline, refresh_value_info

    merged = onnx.ModelProto()
    merged.CopyFrom(base)
    base_q = activation_quantizers(merged)
    donor_q = activation_quantizers(donor)
    donor_inits = {i.name: i for i in donor.graph.initializer}
    inits = {i.name: i for i in merged.graph.initializer}
    for tensor in tensors:
        for target, source in zip(base_q[tensor], donor_q[tensor]):
            copy_inline(inits[target], donor_inits[source])
            inits[target].name = target
    for name in bias_quantizers(merged, tensors):  # each bias follows its input's scale (in x weight scale)
        if name not in donor_inits:
            raise RuntimeError(f"mixed precision: the 8-bit graph has no bias initializer {name}")
        copy_inline(inits[name], donor_inits[name])
    # the 8-bit zero points change the types of the tensors they quantize (uint16 -> uint8): value_info anew
    return refresh_value_info(merged)


BIAS_TYPE = 6  # onnx TensorProto INT32: a quantized bias (scale = input scale x weight scale)


def bias_quantizers(model, tensors: list[str]) -> list[str]:
    """Initializers (int32 values, scale, zero point) of the quantized biases of every node that reads one of
    ``tensors`` through its QuantizeLinear -> DequantizeLinear. A quantized bias's scale is its node's input scale
    times its weight scale: when the input moves to the 8-bit graph's scale, the bias must move with it (the 8-bit
    graph's bias of the same node, same weights). Left at the 16-bit graph's, the CPU EP still computes the right
    float bias, but the QNN HTP refuses the node (error 3110: the bias DequantizeLinear, then its Conv /
    InstanceNormalization / Gemm, fall to the CPU; measured on the built-in model's mixed low_res and adaptor)."""
    inits = {i.name: i for i in model.graph.initializer}
    produced_by = {out: node for node in model.graph.node for out in node.output}
    moved_q = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in set(tensors)}
    moved_dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in moved_q}
    found: list[str] = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" or not moved_dq.intersection(node.input):
            continue
        found.extend(n for n in node_bias_quantizers(node, produced_by, inits) if n not in found)
    return found


def node_bias_quantizers(node, produced_by: dict, inits: dict) -> list[str]:
    """Initializers (int32 values, scale, zero point) of the quantized biases ``node`` reads through a
    DequantizeLinear."""
    found: list[str] = []
    for name in node.input:
        dq = produced_by.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits \
                or inits[dq.input[0]].data_type != BIAS_TYPE:
            continue
        found.extend(n for n in dq.input if n and n not in found)
    return found


def bias_scale_mismatches(model, rtol: float = 1e-4, value: Callable | None = None) -> list[str]:
    """MAC nodes whose quantized bias scale is not their activation input's scale x their weight scale: the
    relation the QNN HTP computes the bias with (the CPU EP dequantizes it with any scale, so only the HTP shows
    such a graph wrong). ``value(name)`` reads an initializer (default: its inline data; the lint passes one that
    reads a bundle's external data through the confinement)."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    produced_by = {out: node for node in model.graph.node for out in node.output}
    read = value or (lambda name: numpy_helper.to_array(inits[name]))

    def dq_scale(name: str):
        dq = produced_by.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            return None
        return np.asarray(read(dq.input[1]), dtype=np.float64)

    wrong = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in MAC_OPS or len(node.input) < 3 or not node.input[2]:
            continue
        bias = node_bias_quantizers(node, produced_by, inits)
        activation, weight = dq_scale(node.input[0]), dq_scale(node.input[1])
        if not bias or activation is None or weight is None:
            continue
        expected = activation * weight
        actual = np.asarray(read(bias[1]), dtype=np.float64)
        if not np.allclose(actual, expected, rtol=rtol, atol=0):
            wrong.append(node.name or f"{node.op_type}_{index}")
    return wrong


def a8_parameters(donor_file: Path, tensors: list[str]) -> dict:
    """tensor -> (scale, zero point) arrays of ``tensors`` in the 8-bit graph at ``donor_file``: the quantization a
    backend gives them when it builds the mixed graph itself (``GraphJob.a8_tensors``)."""
    from onnx import numpy_helper

    from ..onnx_index import load_with_small_tensors

    donor = load_with_small_tensors(donor_file)
    inits = {i.name: i for i in donor.graph.initializer}
    quantizers = activation_quantizers(donor)
    return {t: tuple(numpy_helper.to_array(inits[name]) for name in quantizers[t]) for t in tensors}


def merge_encodings(base: dict, donor: dict, tensors: list[str]) -> dict:
    """AIMET encodings of the mixed graph: ``base``'s entries with ``donor``'s for ``tensors`` (same names)."""
    chosen = set(tensors)
    donor_by_name = {e["name"]: e for e in donor.get("activation_encodings", [])}
    merged = json.loads(json.dumps(base))
    merged["activation_encodings"] = [donor_by_name.get(e["name"], e) if e["name"] in chosen else e
                                      for e in base.get("activation_encodings", [])]
    return merged


@dataclass
class LayerSweep:
    """What the sweep measured and chose (recorded in the manifest under the graph's quantization.sweep)."""

    depth: str
    margin_db: dict[str, float] = field(default_factory=dict)  # group -> dB above the floors with only it at 8 bits
    a8_groups: list[str] = field(default_factory=list)
    a8_tensors: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)  # the chosen mixed graph's SQNR numbers
    evaluations: int = 0
    refused: dict = field(default_factory=dict)  # why a merged choice did not ship (its converted graph's numbers)
    base_margin_db: float | None = None  # the all-16-bit graph's margin (MAC depth: the budget already spent)

    def as_dict(self) -> dict:
        ranked = sorted(self.margin_db.items(), key=lambda kv: kv[1])
        return {"granularity": self.depth, "groups": len(self.margin_db), "a8_groups": self.a8_groups,
                "a8_tensors": len(self.a8_tensors), "mixed": self.numbers, "evaluations": self.evaluations,
                "most_sensitive": [{"group": g, "a8_only_margin_db": round(m, 2)} for g, m in ranked[:8]],
                **({"a16_margin_db": round(self.base_margin_db, 2)} if self.base_margin_db is not None else {}),
                **({"refused": self.refused} if self.refused else {})}


def mac_priority(margin_db: dict[str, float], base_margin_db: float, macs: dict[str, int]) -> dict[str, float]:
    """MACs per share of the floors' noise budget of each group in ``macs``: a group whose graph keeps the floors
    by ``margin_db[g]`` dB alone spends ``10**(-m/10)`` of the budget (noise power relative to the floor's), less
    what the all-16-bit graph (``base_margin_db``) already spends. Ties and unknown MACs sort last."""
    spent = 10.0 ** (-base_margin_db / 10.0)
    out = {}
    for group, count in macs.items():
        cost = max(10.0 ** (-margin_db[group] / 10.0) - spent, 1e-9)
        out[group] = count / cost
    return out


def sweep(base_file: Path, donor_file: Path, score: Callable[[Path], tuple[float, dict]],
          depth: str = "block", order_by: str = "margin") -> tuple[LayerSweep, Path | None]:
    """Choose 8-bit groups for ``base_file`` (16-bit QDQ) from ``donor_file`` (8-bit QDQ of the same graph).

    ``score(path)`` gives a candidate graph file's margin in dB over the floors (>= 0 passes) and its numbers.
    ``order_by`` "macs" orders MAC groups by ``mac_priority`` (measured on the built-in model: the longer mix it
    proposes fails the bundle's gate, docs/quantization.md), "margin" least harmful first.
    Returns the sweep and the mixed graph file written beside ``base_file`` (None when no group can go to 8 bits).
    """
    import onnx

    from ..onnx_index import load_with_small_tensors

    base = load_with_small_tensors(base_file)  # external weights stay where they are
    donor = load_with_small_tensors(donor_file)  # scales and biases are copied from it: inline
    if depth == "mac":  # a group is one MAC node, run at 8 bits with conversions around it
        groups = {mac: [mac] for mac in convertible_macs(base, donor)}

        def build(members: list[str]):
            return convert_macs(base, donor, members)
    else:  # a group is a set of tensors whose quantization parameters move to the 8-bit graph's
        donor_tensors = set(activation_quantizers(donor))
        tensors = [t for t in sixteen_bit_tensors(base) if t in donor_tensors]
        groups = group_tensors(base, tensors, SWEEP_DEPTHS[depth])

        def build(members: list[str]):
            return merge_activations(base, donor, members)
    result = LayerSweep(depth=depth)
    trial_file = base_file.with_name(base_file.stem + ".trial.onnx")

    def evaluate(chosen: list[str]) -> tuple[float, dict]:
        onnx.save_model(build([t for g in chosen for t in groups[g]]), str(trial_file))
        result.evaluations += 1
        return score(trial_file)

    for name in groups:  # 1. one group at a time
        result.margin_db[name] = evaluate([name])[0]
    passing = [g for g in groups if result.margin_db[g] >= 0]
    if depth == "mac" and order_by == "macs":  # 2. most MACs per unit of the floors' noise budget first
        from ..bundle.flops import mac_counts

        macs = mac_counts(base)
        result.base_margin_db = evaluate([])[0]
        priority = mac_priority(result.margin_db, result.base_margin_db, {g: macs.get(g, 0) for g in passing})
        order = sorted(passing, key=lambda g: -priority[g])
    else:  # 2. least harmful first
        order = sorted(passing, key=lambda g: -result.margin_db[g])
    best = _longest_passing_prefix(order, evaluate, result)  # 3. the largest prefix that keeps the floors
    trial_file.unlink(missing_ok=True)
    return _finish(result, base_file, build, groups, order[:best])


def _longest_passing_prefix(order: list[str], evaluate, result: LayerSweep) -> int:
    """Binary search for the longest prefix of ``order`` whose graph keeps the floors (its numbers go into
    ``result.numbers``); 0 when none does."""
    low, high, best = 1, len(order), 0
    while low <= high:
        mid = (low + high) // 2
        margin, numbers = evaluate(order[:mid])
        if margin >= 0:
            best, result.numbers, low = mid, numbers, mid + 1
        else:
            high = mid - 1
    return best


def _finish(result: LayerSweep, base_file: Path, build, groups: dict, chosen: list[str]):
    """Record the chosen groups and write their mixed graph beside ``base_file`` (None when nothing was chosen)."""
    import onnx

    if not chosen:
        return result, None
    result.a8_groups = chosen
    result.a8_tensors = [t for g in chosen for t in groups[g]]  # mac: the MAC nodes
    mixed_file = base_file.with_name(base_file.stem + ".mixed.onnx")
    onnx.save_model(build(result.a8_tensors), str(mixed_file))
    return result, mixed_file


def replay(base_file: Path, donor_file: Path, score: Callable[[Path], tuple[float, dict]],
           macs: list[str]) -> tuple[LayerSweep, Path | None]:
    """The longest prefix of an a8 plan's MAC list (cw_export.quantize.plan) that keeps the floors on this
    graph, instead of a sweep: the full list is scored first (one run when it passes), then a binary search.
    A MAC the graph cannot convert is an InputError (the plan came from another export)."""
    import onnx

    from ..onnx_index import load_with_small_tensors
    from .plan import check_plan_names

    base = load_with_small_tensors(base_file)
    donor = load_with_small_tensors(donor_file)
    check_plan_names(macs, convertible_macs(base, donor), base_file.stem)
    result = LayerSweep(depth="mac")
    trial_file = base_file.with_name(base_file.stem + ".trial.onnx")

    def build(members: list[str]):
        return convert_macs(base, donor, members)

    def evaluate(chosen: list[str]) -> tuple[float, dict]:
        onnx.save_model(build(chosen), str(trial_file))
        result.evaluations += 1
        return score(trial_file)

    margin, numbers = evaluate(list(macs))
    if margin >= 0:
        best, result.numbers = len(macs), numbers
    else:
        best = _longest_passing_prefix(list(macs)[:-1], evaluate, result)
    trial_file.unlink(missing_ok=True)
    return _finish(result, base_file, build, {m: [m] for m in macs}, list(macs)[:best])
