"""``cw-export validate``: integrity (sha256, ONNX checker, I/O, wiring), a cross-format lint and, when the source is
reachable, parity.

The cross-format lint checks that the bundle's formats describe the same thing (each check is one named line):
  <graph> onnx + I/O          the ONNX graph's inputs/outputs (names, dtypes, shapes) equal the manifest's
  <graph> encodings           every AIMET encoding names a tensor of the graph it was computed on; bit widths
  <graph> encodings vs QDQ    the QDQ graph quantizes exactly the tensors the encodings name, with the same
                              scale/offset/bit width (AIMET: real = (q + offset) * scale; ONNX: zero_point = -offset)
  <graph> QDQ pairs           each QuantizeLinear feeds only DequantizeLinear nodes with the same scale/zero point;
                              zero-point dtypes have the manifest's bit widths (weights, activations; int32 biases)
  opset + versions            each graph's opset is the one the manifest records; library/tool versions recorded
  context binaries            each QNN EPContext model points to the .bin beside it (embed_mode 0), same I/O
Every check is run and reported in one table before the verdict, so a user sees all problems at once.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError, CwExportError, InputError
from .runtime.manifest import read_manifest, verify_bundle


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _onnx_io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> dict:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        return {"name": value.name, "shape": [d.dim_value for d in tensor.shape.dim], "dtype": dtype}

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def integrity_checks(bundle: Path, manifest: dict) -> list[Check]:
    import onnx

    problems = verify_bundle(bundle, manifest)
    checks = [Check("files sha256", not problems, "; ".join(problems) if problems else f"{len(manifest['files'])} files")]
    if problems:
        return checks
    for name, graph in sorted(manifest["graphs"].items()):
        path = bundle / graph["file"]
        try:
            onnx.checker.check_model(str(path))
            inputs, outputs = _onnx_io(path)
        except Exception as exc:  # boundary: a corrupt graph file is a finding, not a crash
            checks.append(Check(f"{name} onnx", False, " ".join(str(exc).split())[:200]))
            continue
        difference = io_difference({"inputs": inputs, "outputs": outputs}, graph)
        checks.append(Check(f"{name} onnx + I/O", difference is None, "checker ok, I/O equals manifest"
                            if difference is None else difference))
    checks += encodings_checks(bundle, manifest)
    unreadable = {name for name in manifest["graphs"] if any(c.name == f"{name} onnx" for c in checks)}
    checks += lint_checks(bundle, manifest, skip=unreadable)
    checks.append(wiring_check(manifest))
    return checks


def io_difference(onnx_io: dict, graph: dict) -> str | None:
    """The first difference between a graph's ONNX I/O and the manifest's (names, order, dtypes, shapes), or None."""
    for kind in ("inputs", "outputs"):
        ours, recorded = onnx_io[kind], graph.get(kind, [])
        if [s["name"] for s in ours] != [s.get("name") for s in recorded]:
            return (f"{kind}: ONNX graph has {[s['name'] for s in ours]}, manifest "
                    f"{[s.get('name') for s in recorded]}")
        for a, b in zip(ours, recorded):
            for key in ("dtype", "shape"):
                if a[key] != b.get(key):
                    return f"{kind[:-1]} {a['name']}: {key} {a[key]} in the ONNX graph, {b.get(key)} in the manifest"
    return None


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

    import onnx

    checks = []
    for name, graph in sorted(manifest["graphs"].items()):
        quant = graph.get("quantization") or {}
        if not quant.get("encodings"):
            continue
        details = quant.get("details") or {}
        try:
            data = json.loads((bundle / quant["encodings"]).read_text(encoding="utf-8"))
            activations = _encoding_entries(data["activation_encodings"])
            params = _encoding_entries(data["param_encodings"])
            model = onnx.load(str(bundle / details["encodings_graph"]), load_external_data=False)
        except Exception as exc:  # boundary: an unreadable encodings file or graph is a finding, not a crash
            checks.append(Check(f"{name} encodings", False, " ".join(f"{type(exc).__name__}: {exc}".split())[:200]))
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
        act_bits = {quant.get("activation_bits"), details.get("time_features_bits")} - {None}
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


def _one_line(exc: Exception) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def _bits(values: object) -> set[int]:
    """Bit widths from a manifest value: 16, "8+16" (mixed per layer) or None."""
    return {int(part) for part in str(values).split("+") if part.strip().isdigit()} if values is not None else set()


class _Graph:
    """One ONNX graph read for the lint (without external data; initializer values are loaded on demand)."""

    def __init__(self, path: Path) -> None:
        import onnx

        from .onnx_index import consumers, producers

        self.path = path
        self.model = onnx.load(str(path), load_external_data=False)
        graph = self.model.graph
        self.inits = {i.name: i for i in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.inits]
        self.outputs = [o.name for o in graph.output]
        self.producer = producers(graph)
        self.consumers = consumers(graph)

    def value(self, name: str):
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name], base_dir=str(self.path.parent))

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
    features); other constants either; biases int32."""
    import numpy as np

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
        data = json.loads((bundle / quant["encodings"]).read_text(encoding="utf-8"))
        encodings = {e.get("name"): e for key in ("activation_encodings", "param_encodings")
                     for e in _encoding_entries(data[key])}
        plain = _Graph(bundle / details["encodings_graph"])
        quantized = {**graph.stored_quantized(), **graph.quantized()}
    except Exception as exc:  # boundary: reported by the encodings check as well
        return Check(f"{name} encodings vs QDQ", False, _one_line(exc))
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
    """Each graph's default-domain opset equals the manifest's record (quantized: the backend's ``details.opset``;
    FP32: the recipe's export opset), and the versions the bundle was made with are recorded. Graphs in ``skip``
    (unreadable: their ONNX check already failed) are left out."""
    problems, opsets = [], {}
    for name, graph in sorted(manifest["graphs"].items()):
        if name in skip:
            continue
        quant = graph.get("quantization") or {}
        recorded = ((quant.get("details") or {}).get("opset") if quant.get("backend")
                    else (manifest.get("recipe", {}).get("export") or {}).get("opset"))
        try:
            model = _Graph(bundle / graph["file"]).model
            actual = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
        except Exception as exc:  # boundary
            problems.append(f"{name}: {_one_line(exc)}")
            continue
        opsets[name] = actual
        if recorded is None:
            problems.append(f"{name}: the manifest records no opset")
        elif actual != recorded:
            problems.append(f"{name}: opset {actual} in the ONNX graph, {recorded} in the manifest")
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
    import onnx

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
                model = onnx.load(str(bundle / model_rel), load_external_data=False)
            except Exception as exc:  # boundary
                problems.append(f"{where}: {_one_line(exc)}")
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
                inputs, outputs = _onnx_io(bundle / model_rel)
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
            deployed = _Graph(bundle / graph["file"])
        except Exception as exc:  # boundary: the ONNX check reports it too
            checks.append(Check(f"{name} QDQ pairs", False, _one_line(exc)))
            continue
        if quant.get("encodings"):
            checks.append(encodings_qdq_check(bundle, name, deployed, quant))
        checks.append(qdq_pair_check(name, deployed, quant))
    checks.append(opset_versions_check(bundle, manifest, skip))
    if manifest.get("context_binaries"):
        checks.append(context_binaries_check(bundle, manifest))
    return checks


def wiring_check(manifest: dict) -> Check:
    """Every slot a graph reads is a step input, the cache, or written by an earlier graph of that step kind."""
    wiring = manifest["wiring"]
    errors = []
    for kind, order in wiring["steps"].items():
        available = set(wiring["step_inputs"])
        if kind == "clocked":
            available |= set(wiring["cache"]) | set(wiring["clocked_aliases"])
        for graph in order:
            if graph not in manifest["graphs"]:
                errors.append(f"{kind} step runs unknown graph {graph}")
                continue
            spec = wiring["graphs"][graph]
            names = {s["name"] for s in manifest["graphs"][graph]["inputs"]}
            if set(spec["inputs"]) != names:
                errors.append(f"{graph} wiring inputs {sorted(spec['inputs'])} != graph inputs {sorted(names)}")
            missing = [slot for slot in spec["inputs"].values() if slot not in available]
            if missing:
                errors.append(f"{kind}: {graph} reads {missing} before anything writes them")
            available |= set(spec["outputs"].values())
        if wiring["step_output"] not in available:
            errors.append(f"{kind} step never produces {wiring['step_output']}")
    return Check("wiring", not errors, "; ".join(errors) if errors else "all slots produced before use")


def parity_checks(bundle: Path, manifest: dict, provider: str = "cpu", record: bool = False) -> list[Check]:
    """Re-measure FP32 trajectory parity against the source model (runtime vs torch reference, same noise); on
    ``provider`` other than cpu, a quantized bundle's parity is measured on that provider (recorded in the manifest
    with ``record``)."""
    import torch

    from .models.pipeline import load_model
    from .reference import text_embeddings, torch_trajectory
    from .runtime.pipeline import BundleRunner

    source = manifest["source_model"]
    spec = source.get("name") if source.get("kind") == "builtin" else source.get("path")
    if spec is None or (source.get("kind") == "folder" and not Path(spec).is_dir()):
        return [Check("parity", True, f"skipped: source model not reachable ({spec})")]
    model = load_model(spec)
    if model.source.get("sha256") != source.get("sha256"):
        return [Check("source model hash", False, "source model changed since the bundle was built")]
    if "parity" in manifest:  # quantized bundle: re-measure its recorded numbers, re-check its gate
        return quantized_parity_checks(bundle, manifest, model, provider, record)
    runner = BundleRunner(bundle, provider=provider, verify=False)
    hidden, pooled = text_embeddings(model, "a red triangle on the left")
    noise = np.random.default_rng(0).standard_normal(runner.latent_shape(), dtype=np.float32)
    schedule = manifest["schedule"]
    checks = []
    if manifest["adaptor"]["kind"] == "identity":
        ours = runner.generate(hidden.numpy(), pooled.numpy(), noise)
        ref = torch_trajectory(model, hidden, torch.from_numpy(noise), schedule["steps"], schedule["clock"],
                               manifest["guidance_scale"], manifest["sampler"]["name"])
        rel = float(np.max(np.abs(ours.latents - ref.latents)) / max(np.max(np.abs(ref.latents)), 1e-12))
        limit = manifest["recipe"]["parity"]["graph_max_rel_diff"] * 10
        checks.append(Check("trajectory vs torch", rel <= limit, f"final latents max rel diff {rel:.2e} (limit {limit:.0e})"))
    return checks


def shipped_adaptor_state(model, manifest: dict) -> dict | None:
    """The learned adaptor's FP32 weights, when the bundle was built with the model's shipped checkpoint (same
    sha256): the reference the quantized adaptor graph is measured against."""
    from .distill.checkpoint import read_checkpoint
    from .models.pipeline import shipped_adaptor

    path = shipped_adaptor(model)
    if path is None:
        return None
    checkpoint = read_checkpoint(path)
    return checkpoint.state_dict if checkpoint.sha256 == manifest["adaptor"].get("checkpoint_sha256") else None


def record_provider_parity(bundle: Path, provider: str, numbers: dict, found: list[str]) -> None:
    """Store parity measured on ``provider`` in the manifest (``parity_by_provider``, beside the CPU EP's
    ``parity``) and regenerate the hand-off README that shows both; the manifest's file hashes stay consistent."""
    from importlib.metadata import PackageNotFoundError, version

    from .handoff import refresh_handoff

    try:
        qnn_version = version("onnxruntime-qnn")
    except PackageNotFoundError:
        qnn_version = None
    manifest = read_manifest(bundle)
    manifest.setdefault("parity_by_provider", {})[provider] = {
        "graphs": {name: {"sqnr_db": r["sqnr_db"], "outputs": r.get("outputs", {})}
                   for name, r in numbers["graphs"].items()},
        "final_latent_psnr_db": numbers["final_latent_psnr_db"],
        "steps": [{"step": s["step"], "kind": s["kind"], "latent_psnr_db": s["latent_psnr_db"],
                   "guidance_ratio": s["guidance_ratio"]} for s in numbers["steps"]],
        "gate": {"passed": not found, "failures": found}, "onnxruntime_qnn": qnn_version,
    }
    refresh_handoff(bundle, manifest)


def measure_on_provider(bundle: Path, manifest: dict, model, provider: str = "cpu") -> dict | str:
    """The bundle's parity numbers (``parity.measure``: same held-out prompts, seeds and session options as
    recorded) with its quantized graphs on ``provider``; a string says why they cannot be measured."""
    from .parity import measure
    from .quantize.stages import image_references, tokenizer_fn, torch_graphs
    from .runtime.sessions import create_session, manifest_session_config

    recorded = manifest["parity"]
    adaptor_state = None
    if manifest["adaptor"]["kind"] == "learned":
        adaptor_state = shipped_adaptor_state(model, manifest)
        if adaptor_state is None:
            return ("skipped: the learned adaptor's FP32 weights are not in the bundle, and it is not the model's "
                    "shipped adaptor")
    config = manifest_session_config(manifest)
    if config != recorded["session_options"]:
        return f"manifest session_options {config} != parity's {recorded['session_options']}"
    graphs = torch_graphs(model, manifest, adaptor_state)
    sessions = {name: create_session(bundle / manifest["graphs"][name]["file"], provider, config=config,
                                     precision=manifest["graphs"][name].get("precision"))
                for name in recorded["graphs"]}
    images = image_references(model, manifest, bundle, provider) if "image" in recorded else None
    return measure(manifest, graphs, sessions, tokenizer_fn(model), recorded["prompts"], recorded["seeds"][0],
                   images=images, aggregate=recorded.get("prompt_aggregate", "pooled"))


def quantized_parity_checks(bundle: Path, manifest: dict, model, provider: str = "cpu",
                            record: bool = False) -> list[Check]:
    """Re-measure a quantized bundle's parity and check that the numbers equal the manifest's and still meet the
    recorded thresholds.

    On another ``provider`` (qnn-htp) the same numbers are measured there: they are not expected to equal the
    manifest's (measured on the CPU EP), so only the recorded thresholds gate; each graph's SQNR is printed."""
    from types import SimpleNamespace

    from .parity import compare, failures

    recorded = manifest["parity"]
    numbers = measure_on_provider(bundle, manifest, model, provider)
    if isinstance(numbers, str):
        skipped = numbers.startswith("skipped")
        return [Check("quantized parity" if skipped else "session options", skipped, numbers)]
    if provider != "cpu":
        minimum = recorded["thresholds"].get("graph_min_sqnr_db", 0)
        checks = [Check(f"{name} SQNR on {provider}", result["sqnr_db"] >= minimum, f"{result['sqnr_db']:.2f} dB "
                        f"vs FP32 torch (cpu: {recorded['graphs'][name]['sqnr_db']:.2f} dB recorded; "
                        f"min {minimum:g} dB)")
                  for name, result in numbers["graphs"].items()]
        final_min = recorded["thresholds"].get("final_latent_min_psnr_db", 0)
        checks.append(Check(f"trajectory on {provider}", numbers["final_latent_psnr_db"] >= final_min,
                            f"final latent PSNR {numbers['final_latent_psnr_db']:.2f} dB (cpu: "
                            f"{recorded['final_latent_psnr_db']:.2f} dB recorded; min {final_min:g} dB)"))
        found = failures(numbers, SimpleNamespace(**recorded["thresholds"]))
        checks.append(Check(f"quantized parity gate on {provider}", not found,
                            "; ".join(found) if found else "all recorded thresholds met"))
        if record:
            record_provider_parity(bundle, provider, numbers, found)
        return checks
    diffs = compare(recorded, numbers)
    checks = [Check("quantized parity re-measured", not diffs, "; ".join(diffs) if diffs else
                    f"{len(numbers['graphs'])} graphs and {len(numbers['steps'])} steps equal the manifest "
                    f"(final latent PSNR {numbers['final_latent_psnr_db']:.2f} dB)")]
    found = failures(numbers, SimpleNamespace(**recorded["thresholds"]))
    allowed = recorded["gate"].get("allowed_by_flag", False)
    detail = "; ".join(found) if found else "all recorded thresholds met"
    if found and allowed:
        detail = f"below thresholds, written with --allow-low-parity: {detail}"
    checks.append(Check("quantized parity gate", not found or allowed, detail))
    return checks


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")


def validate_command(args: argparse.Namespace) -> int:
    from .runtime.sessions import check_provider

    provider = getattr(args, "provider", "cpu")
    check_provider(provider)
    record = getattr(args, "record", False)
    if record and provider == "cpu":
        raise InputError("--record stores numbers measured on another provider (--provider qnn-htp); the CPU EP's "
                         "are the manifest's own")
    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    checks = integrity_checks(bundle, manifest)
    if all(c.ok for c in checks) and not args.no_parity:
        try:
            checks += parity_checks(bundle, manifest, provider, record)
        except CwExportError as exc:
            checks.append(Check("parity", False, str(exc)))
    print_table(checks)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        raise BundleError(f"bundle {bundle} failed {len(failed)} check(s): {', '.join(failed)}")
    print(f"bundle {bundle}: all {len(checks)} checks passed")
    return 0
