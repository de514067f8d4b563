"""The cross-format lint: the bundle's formats describe the same thing (each check is one named line):
  <graph> encodings           every AIMET encoding names a tensor of the graph it was computed on; bit widths
  <graph> encodings vs QDQ    the QDQ graph quantizes exactly the tensors the encodings name, with the same
                              scale/offset/bit width (AIMET: real = (q + offset) * scale; ONNX: zero_point = -offset)
  <graph> QDQ pairs           each QuantizeLinear feeds only DequantizeLinear nodes with the same scale/zero point;
                              zero-point dtypes have the manifest's bit widths (weights, activations; int32 biases);
                              every Q/DQ scale is finite and positive; every MAC's int32 bias scale is
                              its input scale x weight scale (the HTP computes the bias that way, the CPU EP not)
  opset + versions            each graph's opset is the one the manifest records; library/tool versions recorded
  context binaries            each QNN EPContext model points to the .bin beside it (embed_mode 0), same I/O
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..contract.confine import read_inside
from ..errors import BundleError
from ..runtime.graph_file import external_array, read_graph
from .check import Check
from .integrity import _onnx_io, io_difference



def _encoding_entries(encodings: object) -> list[dict]:
    """AIMET encodings as a list of {name, bw, ...}: format 1.0.0 is a list, older formats map name -> [encoding]."""
    if isinstance(encodings, list):
        return encodings
    return [{"name": name, **(entries[0] if isinstance(entries, list) and entries else {})}
            for name, entries in dict(encodings).items()]


def encodings_checks(bundle: Path, manifest: dict) -> list[Check]:
    """Each quantized graph's encodings file (AIMET JSON, for QNN converters) matches its graphs: every encoding
    names a tensor of the graph it was computed on, that graph has the deployed graph's I/O, and the bit widths are
    the ones the manifest records (weights; activations, or the 16-bit time features)."""
    import json

    checks = []
    for name, graph in sorted(manifest["graphs"].items()):
        quant = graph.get("quantization") or {}
        if not quant.get("encodings"):
            continue
        details = quant.get("details") or {}
        try:
            data = json.loads(read_inside(bundle, quant["encodings"]).decode("utf-8"))
            activations = _encoding_entries(data["activation_encodings"])
            params = _encoding_entries(data["param_encodings"])
            model = read_graph(bundle, details["encodings_graph"])[1]
        except Exception as exc:  # boundary: an unreadable encodings file or graph is a finding, not a crash
            checks.append(Check(f"{name} encodings", False, _one_line(exc, bundle)))
            continue
        tensors = ({t.name for t in model.graph.initializer} | {t.name for t in model.graph.input}
                   | {out for node in model.graph.node for out in node.output})
        problems = []
        unknown = sorted({e.get("name") for e in activations + params} - tensors, key=str)
        if unknown:
            problems.append(f"{len(unknown)} encoding(s) name tensors the graph lacks, e.g. {unknown[0]!r}")
        io_names = ([t.name for t in model.graph.input if t.name not in {i.name for i in model.graph.initializer}],
                    [t.name for t in model.graph.output])
        expected_io = ([s["name"] for s in graph["inputs"]], [s["name"] for s in graph["outputs"]])
        if io_names != expected_io:
            problems.append(f"encodings graph I/O {io_names} != graph I/O {expected_io}")
        act_bits = _bits(quant.get("activation_bits")) | _bits(details.get("time_features_bits"))  # "8+16": both
        weights = {t.name for t in model.graph.initializer}  # aimet also lists some weights as "activations"
        wrong_acts = sorted({e.get("bw") for e in activations if e.get("name") not in weights} - act_bits, key=str)
        wrong_params = sorted({e.get("bw") for e in params + [e for e in activations if e.get("name") in weights]}
                              - {quant.get("weight_bits")}, key=str)
        if wrong_acts:
            problems.append(f"activation bit width(s) {wrong_acts} not in the manifest's {sorted(act_bits)}")
        if wrong_params:
            problems.append(f"weight bit width(s) {wrong_params} != the manifest's {quant.get('weight_bits')}")
        checks.append(Check(f"{name} encodings", not problems, "; ".join(problems) if problems else
                            f"{len(activations)} activation + {len(params)} param encodings match the graph"))
    return checks


# -- cross-format lint ---------------------------------------------------------------------------------------------
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
BIAS_BITS = 32  # QNN biases: int32 DequantizeLinear initializers (scale = input scale x weight scale)


def _one_line(exc: Exception, bundle: Path | None = None) -> str:
    if isinstance(exc, BundleError):  # the confinement's own message, which names the path
        return " ".join(str(exc).removeprefix(f"{bundle}: ").split())[:200]
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def _bits(values: object) -> set[int]:
    """Bit widths from a manifest value: 16, "8+16" (mixed per layer) or None."""
    return {int(part) for part in str(values).split("+") if part.strip().isdigit()} if values is not None else set()


class _Graph:
    """One ONNX graph read for the lint (without external data; initializer values are loaded on demand), through
    the bundle's confinement: ``_Graph(bundle, rel)``, or ``_Graph(path)`` with the graph's folder as the bundle."""

    def __init__(self, bundle: Path, rel: str | None = None) -> None:
        from ..onnx_index import consumers, producers

        if rel is None:
            bundle, rel = Path(bundle).parent, Path(bundle).name
        self.bundle = bundle
        _, self.model, self.external = read_graph(bundle, rel)
        graph = self.model.graph
        self.inits = {i.name: i for i in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.inits]
        self.outputs = [o.name for o in graph.output]
        self.producer = producers(graph)
        self.consumers = consumers(graph)

    def value(self, name: str):
        import onnx
        from onnx import numpy_helper

        tensor = self.inits[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return external_array(self.bundle, self.external, tensor)
        return numpy_helper.to_array(tensor)

    def is_param(self, name: str) -> bool:
        """An initializer, or a Constant / Identity chain of one (aimet duplicates shared weights that way)."""
        seen = set()
        while name not in self.inits and name not in seen:
            seen.add(name)
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Identity", "Constant"):
                return False
            if node.op_type == "Constant":
                return True
            name = node.input[0]
        return name in self.inits

    def scope(self, name: str) -> str | None:
        """Name scope of the node producing ``name`` ('/a/b' for node '/a/b/Mul'); None for inputs/initializers."""
        node = self.producer.get(name)
        return None if node is None else node.name.rsplit("/", 1)[0] if "/" in node.name else ""

    def scope_ops(self) -> dict[str, Counter]:
        ops: dict[str, Counter] = {}
        for node in self.model.graph.node:
            if node.op_type not in (*QDQ_OPS, "Identity", "Constant"):
                ops.setdefault(node.name.rsplit("/", 1)[0] if "/" in node.name else "", Counter())[node.op_type] += 1
        return ops

    def quantized(self) -> dict[str, dict]:
        """Tensor -> its QDQ quantization, from every QuantizeLinear: {param, scale, zero_point (arrays), dq}.
        A pair that produces a graph output is keyed by that output's name (QDQ exporters rename the tensor
        before it)."""
        found = {}
        for node in self.model.graph.node:
            if node.op_type != "QuantizeLinear":
                continue
            dqs = self.consumers.get(node.output[0], [])
            name = node.input[0]
            if len(dqs) == 1 and dqs[0].op_type == "DequantizeLinear" and dqs[0].output[0] in self.outputs:
                name = dqs[0].output[0]
            found[name] = {"node": node, "dqs": dqs, "param": self.is_param(node.input[0])}
        return found

    def stored_quantized(self) -> dict[str, dict]:
        """Initializer -> its quantization, for weights stored already quantized (a DequantizeLinear alone reads
        them; quantize.fold): {param, scale, zero_point via ``node`` (the DequantizeLinear), dq}. INT32 biases,
        which exporters quantize from the weight and input scales and AIMET encodings do not list, are left out."""
        import onnx

        return {node.input[0]: {"node": node, "dqs": [node], "param": True} for node in self.model.graph.node
                if node.op_type == "DequantizeLinear" and node.input[0] in self.inits
                and self.inits[node.input[0]].data_type != onnx.TensorProto.INT32}


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


WEIGHT_CONSUMERS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "LayerNormalization": 1,
                    "GroupNormalization": 1, "InstanceNormalization": 1, "BatchNormalization": 1}  # op -> weight input


def _static_role(graph: _Graph, dq) -> str:
    """'weight' when a static tensor's DequantizeLinear feeds a weight input (Conv/Gemm/MatMul B, norm scale), else
    'constant' (e.g. the attention scale): quantizers give constants the activation type, weights the weight type."""
    for consumer in graph.consumers.get(dq.output[0], []):
        index = WEIGHT_CONSUMERS.get(consumer.op_type)
        if index is not None and list(consumer.input).index(dq.output[0]) >= index:
            return "weight"
    return "constant"


def qdq_pair_check(name: str, graph: _Graph, quant: dict) -> Check:
    """Each QuantizeLinear feeds only DequantizeLinear nodes with its scale, zero point and axis; zero-point dtypes
    carry the manifest's bit widths: weights weight_bits; activations activation_bits (plus the 16-bit time
    features); other constants either; biases int32; every Q/DQ scale is finite and positive; each quantized
    bias's scale is its MAC's input scale x weight scale (``quantize.mixed.bias_scale_mismatches``: a graph that
    breaks it runs right on the CPU EP and wrong on the QNN HTP, measured on SD 1.5's mix: -12 dB at one conv)."""
    import numpy as np

    from ..quantize.mixed import bias_scale_mismatches

    details = quant.get("details") or {}
    weight_bits = _bits(quant.get("weight_bits"))
    act_bits = _bits(quant.get("activation_bits")) | _bits(details.get("time_features_bits"))
    allowed = {"weight": weight_bits, "activation": act_bits, "constant": weight_bits | act_bits,
               "bias": {BIAS_BITS}}
    problems, pairs, dtypes = [], 0, Counter()

    def zero_point_bits(node, role: str) -> None:
        zero = graph.value(node.input[2]) if len(node.input) > 2 and node.input[2] in graph.inits else None
        if zero is None:
            problems.append(f"{node.op_type} {node.name or node.output[0]} has no zero-point initializer")
            return
        dtypes[f"{role} {zero.dtype.name}"] += 1
        if zero.dtype.itemsize * 8 not in allowed[role]:
            problems.append(f"{role} {node.input[0]}: zero point {zero.dtype.name} is not "
                            f"{'/'.join(map(str, sorted(allowed[role])))}-bit as the manifest declares")

    try:
        for tensor, q in graph.quantized().items():
            node, dqs = q["node"], q["dqs"]
            if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or node.output[0] in graph.outputs:
                problems.append(f"QuantizeLinear of {tensor} feeds {[d.op_type for d in dqs] or 'nothing'}, "
                                "not only DequantizeLinear")
                continue
            for dq in dqs:
                pairs += 1
                for slot, role in ((1, "scale"), (2, "zero point")):
                    a = node.input[slot] if len(node.input) > slot else ""
                    b = dq.input[slot] if len(dq.input) > slot else ""
                    if a != b and not (a in graph.inits and b in graph.inits
                                       and np.array_equal(graph.value(a), graph.value(b))):
                        values = [graph.value(x).reshape(-1)[:2].tolist() if x in graph.inits else x for x in (a, b)]
                        problems.append(f"{tensor}: QuantizeLinear and DequantizeLinear {dq.name or dq.output[0]} "
                                        f"use different {role} ({values[0]} vs {values[1]})")
                if _axis(node) != _axis(dq):
                    problems.append(f"{tensor}: QuantizeLinear axis {_axis(node)} != DequantizeLinear axis {_axis(dq)}")
            zero_point_bits(node, _static_role(graph, dqs[0]) if q["param"] else "activation")
        for node in graph.model.graph.node:  # weights/biases stored already quantized: a DequantizeLinear alone
            if node.op_type == "DequantizeLinear" and node.input[0] in graph.inits:
                stored = graph.value(node.input[0]).dtype.itemsize * 8
                zero_point_bits(node, "bias" if stored == BIAS_BITS else _static_role(graph, node))
        for node in graph.model.graph.node:  # a tensor calibrated to [-inf, x] gets scale inf (zero point NaN)
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1 \
                    and node.input[1] in graph.inits:
                scale = graph.value(node.input[1])
                if not (np.isfinite(scale).all() and (scale > 0).all()):
                    problems.append(f"{node.op_type} {node.name or node.output[0]}: scale "
                                    f"{scale.reshape(-1)[:2].tolist()} is not finite and positive")
        wrong_bias = bias_scale_mismatches(graph.model, value=graph.value)
        if wrong_bias:
            problems.append(f"{len(wrong_bias)} MAC(s) whose int32 bias scale is not input scale x weight scale "
                            f"(the QNN HTP computes them wrong), e.g. {wrong_bias[0]}")
    except Exception as exc:  # boundary: an unreadable initializer is a finding, not a crash
        problems.append(_one_line(exc))
    zero_points = ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items()))
    detail = (f"{len(problems)} problem(s): {'; '.join(problems[:3])}" if problems else
              f"{pairs} Q->DQ pairs consistent; zero points {zero_points}")
    return Check(f"{name} QDQ pairs", not problems, detail)


def _reexpressed_scopes(deployed: _Graph, plain: _Graph) -> set[str]:
    """Name scopes whose (non-Q/DQ) ops differ between the two exports: e.g. GELU, one ``Gelu`` op at opset 21 and
    Div/Erf/Add/Mul at opset 17. Tensor names inside them need not correspond, so they are not compared by name."""
    a, b = deployed.scope_ops(), plain.scope_ops()
    return {scope for scope in set(a) | set(b) if a.get(scope) != b.get(scope)}


def _identity_aliased(plain: _Graph) -> set[str]:
    """Initializers the encodings graph copies through Identity nodes, and the copies (torch's exporter deduplicates
    equal parameters, e.g. all-ones LayerNorm gammas): aimet encodes the original and each copy alike, while the
    deployed graph stores one of the names (quantize.fold), so the others have no QDQ tensor of their name."""
    names = set()
    for node in plain.model.graph.node:
        if node.op_type == "Identity" and node.input[0] in plain.inits:
            names.update((node.input[0], node.output[0]))
    return names


def encodings_qdq_check(bundle: Path, name: str, graph: _Graph, quant: dict) -> Check:
    """The deployed QDQ graph and the AIMET encodings quantize the same tensors with the same parameters: every
    QDQ-quantized tensor has an encoding and every encoding a QDQ-quantized tensor (activations and weights), and
    matched pairs agree on bit width, scale and offset (zero_point = -offset, shifted by 2^(bw-1) for signed types)."""
    import json

    import numpy as np

    details = quant.get("details") or {}
    try:
        data = json.loads(read_inside(bundle, quant["encodings"]).decode("utf-8"))
        encodings = {e.get("name"): e for key in ("activation_encodings", "param_encodings")
                     for e in _encoding_entries(data[key])}
        plain = _Graph(bundle, details["encodings_graph"])
        quantized = {**graph.stored_quantized(), **graph.quantized()}
    except Exception as exc:  # boundary: reported by the encodings check as well
        return Check(f"{name} encodings vs QDQ", False, _one_line(exc, bundle))
    skipped_scopes = _reexpressed_scopes(graph, plain)

    def exempt(tensor: str, where: _Graph) -> bool:
        return where.scope(tensor) in skipped_scopes

    aliased = _identity_aliased(plain)
    missing = sorted(t for t in quantized if t not in encodings and not exempt(t, graph) and t not in aliased)
    unquantized = sorted(t for t in encodings if t not in quantized and not exempt(t, plain) and t not in aliased)
    problems = []
    if missing:
        problems.append(f"{len(missing)} QDQ-quantized tensor(s) have no encoding, e.g. {missing[0]!r}")
    if unquantized:
        problems.append(f"{len(unquantized)} encoding(s) name tensors the QDQ graph does not quantize, e.g. "
                        f"{unquantized[0]!r}")
    compared = 0
    for tensor in sorted(set(quantized) & set(encodings)):
        node, encoding = quantized[tensor]["node"], encodings[tensor]
        try:
            scale = graph.value(node.input[1]).reshape(-1).astype(np.float64)
            zero = graph.value(node.input[2])
        except Exception as exc:  # boundary
            problems.append(f"{tensor}: {_one_line(exc)}")
            continue
        compared += 1
        bits = zero.dtype.itemsize * 8
        signed = np.issubdtype(zero.dtype, np.signedinteger)
        expected_zero = -np.asarray(encoding.get("offset", []), dtype=np.int64) - (1 << (bits - 1) if signed else 0)
        if encoding.get("bw") != bits:
            problems.append(f"{tensor}: encodings bw {encoding.get('bw')}, QDQ zero point {zero.dtype.name}")
        elif not np.allclose(scale, np.asarray(encoding.get("scale", []), dtype=np.float64), rtol=1e-6, atol=0):
            problems.append(f"{tensor}: scale {scale[:2].tolist()} in the QDQ graph, {encoding.get('scale')[:2]} in "
                            "the encodings")
        elif not np.array_equal(zero.reshape(-1).astype(np.int64), expected_zero.reshape(-1)):
            problems.append(f"{tensor}: zero point {zero.reshape(-1)[:2].tolist()} in the QDQ graph, offset "
                            f"{encoding.get('offset')[:2]} in the encodings")
    skipped = sum(1 for t in set(quantized) | set(encodings)
                  if (t not in encodings and exempt(t, graph)) or (t not in quantized and exempt(t, plain)))
    note = (f"; {skipped} tensor(s) in {len(skipped_scopes)} scope(s) the two exports express with different ops "
            f"not compared by name, e.g. {sorted(skipped_scopes)[0]!r}" if skipped else "")
    detail = (f"{'; '.join(problems[:3])}{note}" if problems else
              f"{compared} tensors quantized alike (bit width, scale, offset){note}")
    return Check(f"{name} encodings vs QDQ", not problems, detail)


def opset_versions_check(bundle: Path, manifest: dict, skip: set[str] = frozenset()) -> Check:
    """Each graph's default-domain opset equals every record of it in the manifest: the graph's own ``opset``
    (``bundle.writer.with_file_opsets``) and, quantized, the backend's ``details.opset``; a bundle from before graphs recorded
    their opset is checked against ``details.opset`` (quantized) or the recipe's export opset (FP32). The versions
    the bundle was made with are recorded. Graphs in ``skip`` (unreadable: their ONNX check already failed) are
    left out."""
    from ..onnx_index import default_opset

    problems, opsets = [], {}
    for name, graph in sorted(manifest["graphs"].items()):
        if name in skip:
            continue
        quant = graph.get("quantization") or {}
        records = {"graphs.opset": graph.get("opset")}
        if quant.get("backend"):
            records["details.opset"] = (quant.get("details") or {}).get("opset")
        elif "opset" not in graph:  # older bundles: FP32 graphs recorded no opset of their own
            records["recipe.export.opset"] = (manifest.get("recipe", {}).get("export") or {}).get("opset")
        if "opset" not in graph and len(records) > 1:
            del records["graphs.opset"]
        try:
            actual = default_opset(_Graph(bundle, graph["file"]).model)
        except Exception as exc:  # boundary
            problems.append(f"{name}: {_one_line(exc, bundle)}")
            continue
        opsets[name] = actual
        if any(value is None for value in records.values()):
            problems.append(f"{name}: the manifest records no opset "
                            f"({', '.join(k for k, v in records.items() if v is None)})")
        for where, recorded in records.items():
            if recorded is not None and actual != recorded:
                problems.append(f"{name}: opset {actual} in the ONNX graph, {recorded} in the manifest ({where})")
        if quant.get("backend") == "aimet" and not (quant.get("details") or {}).get("aimet_torch"):
            problems.append(f"{name}: aimet_torch version not recorded")
    versions = manifest.get("versions") or {}
    lacking = [k for k in ("python", "torch", "onnx", "onnxruntime") if not versions.get(k)]
    if lacking:
        problems.append(f"versions lack {lacking}")
    if not (manifest.get("tool") or {}).get("version"):
        problems.append("tool version not recorded")
    for soc, per_graph in sorted((manifest.get("context_binaries") or {}).items()):
        for graph_name, entry in sorted(per_graph.items()):
            if not entry.get("onnxruntime_qnn") or not entry.get("qnn_sdk"):
                problems.append(f"context {soc}/{graph_name}: onnxruntime_qnn / QNN SDK version not recorded")
    summary = ", ".join(f"{n} {v}" for n, v in opsets.items())
    return Check("opset + versions", not problems, "; ".join(problems[:3]) if problems else
                 f"opsets match the manifest ({summary}); versions recorded")


def context_binaries_check(bundle: Path, manifest: dict) -> Check:
    """Each QNN EPContext model is one EPContext node (embed_mode 0) naming the context binary beside it, both
    listed in the manifest, with the I/O of the graph it was compiled from."""
    problems, count = [], 0
    files = manifest.get("files", {})
    for soc, per_graph in sorted(manifest["context_binaries"].items()):
        for name, entry in sorted(per_graph.items()):
            count += 1
            where = f"{soc}/{name}"
            model_rel, binary_rel = entry.get("model"), entry.get("binary")
            if model_rel not in files or binary_rel not in files:
                problems.append(f"{where}: {model_rel} / {binary_rel} not both listed in the manifest's files")
                continue
            try:
                model = read_graph(bundle, model_rel)[1]
            except Exception as exc:  # boundary
                problems.append(f"{where}: {_one_line(exc, bundle)}")
                continue
            nodes = list(model.graph.node)
            attrs = {a.name: a for a in nodes[0].attribute} if len(nodes) == 1 else {}
            if len(nodes) != 1 or nodes[0].op_type != "EPContext":
                problems.append(f"{where}: not a single EPContext node ({[n.op_type for n in nodes][:3]})")
            elif attrs.get("embed_mode") is None or attrs["embed_mode"].i != 0:
                problems.append(f"{where}: embed_mode is not 0")
            elif (Path(model_rel).parent / attrs["ep_cache_context"].s.decode("utf-8")).as_posix() != binary_rel:
                problems.append(f"{where}: EPContext points to {attrs['ep_cache_context'].s.decode('utf-8')!r}, "
                                f"manifest lists {binary_rel}")
            else:
                spec = manifest["graphs"].get(name, {})
                inputs, outputs = _onnx_io(model)
                difference = io_difference({"inputs": inputs, "outputs": outputs}, spec)
                if difference:
                    problems.append(f"{where}: {difference}")
    return Check("context binaries", not problems, "; ".join(problems[:3]) if problems else
                 f"{count} EPContext model(s), each with its .bin (embed_mode 0) and its graph's I/O")


def lint_checks(bundle: Path, manifest: dict, skip: set[str] = frozenset()) -> list[Check]:
    """The cross-format lint (module docstring): per quantized graph QDQ pairs and, with AIMET encodings,
    encodings vs QDQ; opsets and versions; context binaries when the bundle has them. Graphs in ``skip`` failed
    their ONNX check, which already reports them."""
    checks = []
    for name, graph in sorted(manifest["graphs"].items()):
        quant = graph.get("quantization") or {}
        if not quant.get("backend") or name in skip:
            continue
        try:
            deployed = _Graph(bundle, graph["file"])
        except Exception as exc:  # boundary: the ONNX check reports it too
            checks.append(Check(f"{name} QDQ pairs", False, _one_line(exc, bundle)))
            continue
        if quant.get("encodings"):
            checks.append(encodings_qdq_check(bundle, name, deployed, quant))
        checks.append(qdq_pair_check(name, deployed, quant))
    checks.append(opset_versions_check(bundle, manifest, skip))
    if manifest.get("context_binaries"):
        checks.append(context_binaries_check(bundle, manifest))
    return checks


