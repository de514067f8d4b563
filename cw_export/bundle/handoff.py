"""``README.md`` in every bundle: the hand-off document for the mobile team that implements the denoising loop.

It is generated from the manifest (and the graph/encodings files it names), so it cannot drift from what the bundle
contains: a mobile engineer should be able to write the per-step loop from it without reading cw-export's Python.

Sections:
  1. files          — what each file of the bundle is
  2. loop           — text encoding, the per-step loop in pseudo-code (from ``wiring`` and ``schedule``), decoding
  3. step table     — per step: kind, graphs run, timestep and the sampler's coefficients (``sampler.step_table``)
  4. graphs         — every graph's inputs/outputs (shape, dtype) and, for quantized graphs, their quantization:
                      the QDQ graph's scale/zero point at each graph input/output and the AIMET encodings' scale/offset
  5. npu            — how to load the QNN context binaries (``context_binaries``), or how to produce them
  6. parity         — the measured numbers (``parity`` of quantized bundles; FP32 export parity otherwise)
Like report.html the document is a pure function of the bundle (no timestamps), so a rebuilt bundle is
byte-identical and ``cw-export report BUNDLE`` regenerates exactly the file the build wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..contract.confine import read_inside
from ..errors import BundleError
from ..runtime.graph_file import external_array, read_graph

HANDOFF_NAME = "README.md"
SECTIONS = ("Files", "The denoising loop", "Step table", "Graphs", "Running on the Snapdragon NPU", "Measured parity")


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _shape(spec: dict) -> str:
    return f"{spec['dtype']} [{', '.join(str(d) for d in spec['shape'])}]"


def _number(value: float) -> str:
    """Shortest repr that round-trips (the manifest's exact value)."""
    return repr(float(value))


# -- 1. files ------------------------------------------------------------------------------------------------------
def _describe(rel: str, manifest: dict) -> str:
    graphs = {g["file"]: name for name, g in manifest["graphs"].items()}
    encodings = {(g.get("quantization") or {}).get("encodings"): name for name, g in manifest["graphs"].items()}
    encodings_graphs = {((g.get("quantization") or {}).get("details") or {}).get("encodings_graph"): name
                        for name, g in manifest["graphs"].items()}
    contexts = {}
    for soc, per_graph in (manifest.get("context_binaries") or {}).items():
        for graph, entry in per_graph.items():
            contexts[entry["model"]] = f"QNN EPContext model of `{graph}` for {soc} (load this on the device; " \
                                       f"its binary `{Path(entry['binary']).name}` must stay beside it)"
            contexts[entry["binary"]] = f"QNN context binary of `{graph}` for {soc} (HTP v{entry['htp_arch']}, " \
                                        f"soc_model {entry['soc_model']}), referenced by `{Path(entry['model']).name}`"
    if rel in graphs:
        name = graphs[rel]
        return f"ONNX graph `{name}` ({manifest['graphs'][name].get('precision', 'fp32')})"
    if rel.endswith(".onnx.data") and rel[: -len(".data")] in graphs:
        return f"external weights of `{rel[: -len('.data')]}` (keep beside it, same name)"
    if rel in encodings:
        return f"AIMET encodings (JSON) of `{encodings[rel]}`: per-tensor scale/offset for QNN converters"
    if rel in encodings_graphs:
        return (f"the FP32 ONNX graph the encodings of `{encodings_graphs[rel]}` refer to (input of "
                "qnn-onnx-converter with --quantization_overrides; not needed by onnxruntime)")
    if rel in contexts:
        return contexts[rel]
    if rel.startswith(manifest.get("tokenizer", {}).get("folder", "tokenizer") + "/"):
        return "CLIP BPE tokenizer files (vocab.json + merges.txt are what a tokenizer needs)"
    if "tokenizer_2" in manifest and rel.startswith(manifest["tokenizer_2"]["folder"] + "/"):
        return "the second text encoder's CLIP BPE tokenizer files (SDXL; `input_ids_2`)"
    if rel == "manifest.json":
        return "the machine-readable contract: every file's sha256, graph I/O, wiring, schedule, step table, parity"
    if rel == "report.html":
        return "human-readable report: FLOPs per graph/step, parity curves, recipe, versions"
    if rel.startswith("samples/"):
        return "sample image"
    return "bundle file"


def _files_section(bundle: Path, manifest: dict) -> str:
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    names = sorted(set(on_disk) - {HANDOFF_NAME, "manifest.json"}) + ["manifest.json", HANDOFF_NAME]
    rows = [[f"`{rel}`", _describe(rel, manifest) if rel != HANDOFF_NAME else "this document"] for rel in names]
    return ("Every file's sha256 and size are in `manifest.json` (`files`); `cw-export validate BUNDLE` checks "
            "them.\n\n" + _table(["file", "what it is"], rows))


# -- 2. the loop ---------------------------------------------------------------------------------------------------
def _call(graph: str, spec: dict, io: dict) -> str:
    """``slot, ... = graph(input=slot, ...)`` in the graph's own I/O order (manifest ``graphs``), by name."""
    outputs = ", ".join(spec["outputs"][o["name"]] for o in io["outputs"] if o["name"] in spec["outputs"])
    inputs = ", ".join(f"{i['name']}={spec['inputs'][i['name']]}" for i in io["inputs"] if i["name"] in spec["inputs"])
    return f"{outputs} = {graph}({inputs})"


def _graph_order(manifest: dict) -> list[str]:
    """Graphs in the order an image runs them: text encoder, step graphs (full, then clocked-only), decoder."""
    wiring = manifest["wiring"]
    order = [wiring["text"]["graph"]]
    for kind in ("full", "clocked"):
        order += [g for g in wiring["steps"].get(kind, []) if g not in order]
    order += [wiring["decode"]["graph"]]
    return [g for g in order if g in manifest["graphs"]] + sorted(set(manifest["graphs"]) - set(order))


def _step_indices(kinds: list[str], kind: str) -> str:
    return ", ".join(str(i) for i, k in enumerate(kinds) if k == kind)


def _time_features_lines(spec: dict, batch: int, shape: str) -> list[str]:
    """manifest.time_features as two lines of loop code (diffusers' get_timestep_embedding, float64 arithmetic)."""
    half = spec["dim"] // 2
    order = "cos(a), sin(a)" if spec["flip_sin_to_cos"] else "sin(a), cos(a)"
    pad = ", [0.0]" if spec["dim"] % 2 else ""
    return [
        "    # time features (manifest.time_features; computed on the host, not in a graph; float64, then float32)",
        f"    a = {_number(spec['scale'])} * T.timesteps[i] * exp(-log({spec['max_period']}) * arange({half}) / "
        f"({half} - {_number(spec['downscale_freq_shift'])}))   # [{half}]",
        f"    time_features = [concat([{order}{pad}])] * {batch}   # {shape}",
    ]


def _add_time_features_lines(spec: dict, batch: int) -> list[str]:
    """manifest.add_time_features (SDXL's size/crop ids) as loop code: the time-feature sinusoid of each id."""
    half = spec["dim"] // 2
    order = "cos(b), sin(b)" if spec["flip_sin_to_cos"] else "sin(b), cos(b)"
    pad = ", [0.0]" if spec["dim"] % 2 else ""
    ids = ", ".join(_number(v) for v in spec["time_ids"])
    return [
        "# added time features, once per image (manifest.add_time_features: SDXL's original size, crop top-left, "
        "target size; the time-feature sinusoid of each id, float64, then float32)",
        f"a = [{_number(spec['scale'])} * t * exp(-log({spec['max_period']}) * arange({half}) / "
        f"({half} - {_number(spec['downscale_freq_shift'])})) for t in [{ids}]]",
        f"add_time_features = [concat([concat([{order}{pad}]) for b in a])] * {batch}   "
        f"# [{batch}, {len(spec['time_ids']) * spec['dim']}]",
    ]


def _loop_section(manifest: dict) -> str:
    wiring, schedule, sampler = manifest["wiring"], manifest["schedule"], manifest["sampler"]
    table = sampler["step_table"]
    kinds = schedule["step_kinds"]
    graphs = manifest["graphs"]
    latent = manifest["latent"]["shape"]
    text = wiring["text"]
    decode = wiring["decode"]
    ids_spec = next(s for s in graphs[text["graph"]]["inputs"] if s["name"] == text["input"])
    text_outputs = ", ".join(s["name"] for s in graphs[text["graph"]]["outputs"])
    sample_spec = {s["name"]: s for name in wiring["steps"]["full"] for s in graphs[name]["inputs"]}
    pooled = "pooled_text" in {i for g in wiring["graphs"].values() for i in g["inputs"].values()}
    lines = [
        "# constants: manifest.json",
        f"steps = {schedule['steps']}; clock = {schedule['clock']}; guidance_scale = {manifest['guidance_scale']}",
        f"kind = {json.dumps(kinds)}   # schedule.step_kinds: {schedule['rule']}",
        "T = sampler.step_table   # timesteps, input_scale, x0_c_sample, x0_c_model_output, c_sample, "
        "c_model_output, c_x0_prev (section 'Step table')",
        "",
        "# 1. text, once per image; batch order is [" + ", ".join(text["batch"]) + "]",
        f"{text['input']} = tokenize([negative_prompt, prompt])   # {_shape(ids_spec)}: CLIP BPE from tokenizer/, "
        f"ids cut to {manifest['tokenizer']['model_max_length']} - 2, then [BOS] + ids + [EOS] (EOS kept), "
        "right-padded with the pad token ('Text' below)",
    ]
    text_args = f"{text['input']}={text['input']}"
    if "input_2" in text:
        lines.append(f"{text['input_2']} = tokenize_2([negative_prompt, prompt])   # the same with tokenizer_2/ "
                     "(SDXL's second tokenizer: its own pad token)")
        text_args += f", {text['input_2']}={text['input_2']}"
    lines.append(f"{text_outputs} = {text['graph']}({text_args})")
    if text.get("empty_negative") == "zeros":
        lines += ["if negative_prompt == \"\":   # wiring.text.empty_negative = \"zeros\" (SDXL's "
                  "force_zeros_for_empty_prompt)",
                  "    encoder_hidden_states[0] = 0; pooled_text[0] = 0"]
    if "add_time_features" in manifest:
        lines += _add_time_features_lines(manifest["add_time_features"], manifest["batch"])
    lines += [
        "",
        f"# 2. denoising; x is float32 {latent}",
        f"x = T.init_noise_sigma * noise   # noise ~ N(0, 1), float32 {latent} ('Noise' below); "
        f"T.init_noise_sigma = {_number(table['init_noise_sigma'])}; float32 product",
        "x0_prev = 0       # read only where T.c_x0_prev[i] != 0 (never at i = 0)",
        "cache = {}        # " + ", ".join(f"{k} <- {v}" for k, v in wiring["cache"].items())
        + ": kept from one step to the next",
        "for i in range(steps):",
        f"    sample = concat([x, x], axis=0) * T.input_scale[i]   # {_shape(sample_spec['sample'])}"
        if "sample" in sample_spec else "    sample = concat([x, x], axis=0) * T.input_scale[i]",
    ]
    if "time_features" in sample_spec:
        lines += _time_features_lines(manifest["time_features"], manifest["batch"], _shape(sample_spec["time_features"]))
    present = [k for k in ("full", "clocked") if k in kinds]
    for n, kind in enumerate(present):
        indent = "        " if len(present) > 1 else "    "
        if len(present) > 1:
            steps_of_kind = f"i = {_step_indices(kinds, kind)}"
            lines.append(f"    if kind[i] == {json.dumps(kind)}:   # {steps_of_kind}" if n == 0 else
                         f"    else:   # kind[i] == {json.dumps(kind)}: {steps_of_kind}")
        if kind == "clocked":
            for target in wiring["cache"]:
                lines.append(f"{indent}{target} = cache[{json.dumps(target)}]   # from the previous step, full or "
                             "clocked")
            for target, source in wiring["clocked_aliases"].items():
                lines.append(f"{indent}{target} = {source}   # wiring.clocked_aliases: the low-res part is skipped "
                             "and its cached output reused")
        for graph in wiring["steps"][kind]:
            lines.append(indent + _call(graph, wiring["graphs"][graph], graphs[graph]))
    for target, source in wiring["cache"].items():
        lines.append(f"    cache[{json.dumps(target)}] = {source}   # wiring.cache")
    output = wiring["step_output"]
    lines += [
        f"    # classifier-free guidance: {output} is [uncond, cond]; float32 arithmetic",
        f"    eps = {output}[0] + guidance_scale * ({output}[1] - {output}[0])   # {latent}",
        f"    # sampler update ({sampler['name']}, {table.get('diffusers_class', '')}): x and eps widened to "
        "float64, float64 arithmetic, x0_prev kept float64, x rounded to float32",
        "    x0 = T.x0_c_sample[i] * x + T.x0_c_model_output[i] * eps",
        "    x = T.c_sample[i] * x + T.c_model_output[i] * eps + T.c_x0_prev[i] * x0_prev",
        "    x0_prev = x0",
        "",
        "# 3. decode, once per image",
        f"{decode['output']} = {decode['graph']}({decode['input']}=x)   # {decode.get('note', '')}",
    ]
    graph_of_step = "; ".join(f"**{k}** steps (i = {_step_indices(kinds, k)}) run "
                              + " -> ".join(f"`{g}`" for g in wiring["steps"][k]) for k in present)
    notes = [
        graph_of_step[:2] + graph_of_step[2].upper() + graph_of_step[3:] + ".",
        "Slots are named tensors: a graph input `name=slot` reads the slot, a graph's outputs (listed in the "
        "graph's output order, matched by name) are written to the slots on the left (manifest `wiring.graphs`). "
        "Everything a clocked step reads that no graph of it writes comes from `cache` or `wiring.clocked_aliases`.",
    ]
    if pooled:
        notes.append("`pooled_text` is the text encoder's second output; the learned adaptor reads it.")
    notes.append(f"Guidance as in the manifest: `{wiring['guidance']}`.")
    return ("\n".join(notes) + "\n\n```python\n" + "\n".join(lines) + "\n```\n\n"
            + "\n\n".join(_loop_details(manifest, pooled)))


def _loop_details(manifest: dict, pooled: bool) -> list[str]:
    """What the pseudo-code leaves implicit, as ``cw-export run`` (cw_export/runtime) does it, bit for bit."""
    max_len = manifest["tokenizer"]["model_max_length"]
    learned = "adaptor" in manifest["graphs"]
    latent = manifest["latent"]["shape"]
    text_outputs = {s["name"]: s["shape"] for s in manifest["graphs"][manifest["wiring"]["text"]["graph"]]["outputs"]}
    hidden, pooled_width = text_outputs["encoder_hidden_states"], text_outputs["pooled_text"][-1]
    return [
        "**Clocked steps and the cache.** `cache` is refreshed after *every* step, clocked ones included, so a "
        "clocked step reads `r_out` of the step just before it: "
        + ("with this bundle's learned adaptor that is the adaptor's own prediction after a clocked step (for clock "
           ">= 3 not the last full step's `r_out`)." if learned else
           "with this bundle's identity adaptor a clocked step re-writes the value it read, so it is the last full "
           "step's `r_out` for any clock."),
        "**Text.** `negative_prompt` is the empty string unless given (`cw-export run --negative-prompt TEXT`; "
        "Python: `BundleRunner.encode_prompt(prompt, negative_prompt)`). `tokenize` is `transformers.CLIPTokenizer` "
        "(transformers 5, `tokenizers` backend, no ftfy) called as diffusers calls it, `tokenizer(texts, "
        f"padding=\"max_length\", max_length={max_len}, truncation=True)`; cw_export/runtime/tokenizer.py "
        "reimplements it: (1) the special tokens `<|startoftext|>` / `<|endoftext|>` are cut out of the raw text "
        "first, case-sensitively; (2) each remaining segment: Unicode NFC, every whitespace run -> one space, "
        "per-character lower-case (Rust `char::to_lowercase`: no final-sigma rule); (3) split by CLIP's pattern "
        "`<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`, "
        "each match re-split by GPT-2's ByteLevel pattern; (4) each piece's UTF-8 bytes -> GPT-2's "
        "`bytes_to_unicode` symbols, `</w>` appended to the last symbol, a symbol missing from vocab.json -> the "
        "unk token (`<|endoftext|>`), then merges.txt's BPE merges, lowest rank first, leftmost on ties; "
        f"(5) the ids are cut to {max_len} - 2 = {max_len - 2}, then `[BOS] + ids + [EOS]` and right-padded to "
        f"{max_len} with the pad token. Truncation keeps EOS: cutting the whole `[BOS] + ids + [EOS]` to {max_len} "
        "would drop it. BOS/EOS/pad/unk are `<|startoftext|>` / `<|endoftext|>` / `<|endoftext|>` / "
        "`<|endoftext|>` unless tokenizer/tokenizer_config.json or special_tokens_map.json name others.",
        "**Precomputed text embeddings** (`cw-export run --text-embeds FILE.npz`, instead of a prompt): an .npz "
        f"with float arrays `uncond` and `cond`, each [1, {hidden[1]}, {hidden[2]}] (`encoder_hidden_states` "
        "[0] and [1]), and `uncond_pooled` and `cond_pooled`, each "
        f"[1, {pooled_width}] (`pooled_text` [0] and [1]), "
        + ("**required** by this bundle's learned adaptor" if learned else
           "**required** by this bundle's added (SDXL) conditioning" if "add_time_features" in manifest else
           "required by bundles with a learned adaptor, ignored by this identity-adaptor bundle")
        + "; arrays are cast to float32. `--negative-prompt` cannot be combined with it (the `uncond` array is the "
        "negative prompt).",
        f"**Noise.** `cw-export run --seed N` draws `noise = numpy.random.default_rng(N).standard_normal({latent}, "
        "dtype=numpy.float32)` (PCG64, drawn directly in float32: drawing float64 and casting gives other "
        "latents); `--init-latents FILE.npy` gives the noise itself.",
        "**Precision, exactly as the runtime computes.** `x` is float32 between steps. `sample`: x (float32) times "
        "`T.input_scale[i]` in float64, rounded to float32. `time_features`: float64, rounded to float32. Guidance: "
        "float32 (`delta = noise_pred[1] - noise_pred[0]`, `eps = noise_pred[0] + float32(guidance_scale) * delta`). "
        "Sampler update: x and eps widened to float64; `x0` and the new `x` computed in float64 with the "
        "table's float64 coefficients (manifest JSON numbers); `x0_prev` (the previous step's `x0`) is kept in "
        "float64 (never rounded); only the new `x` is rounded to float32. The initial "
        "`x = float32(T.init_noise_sigma) * noise` is a float32 product.",
        "**Image.** `image` is float32 [1, 3, H, W], RGB in [0, 1]. `cw-export run --image-out` writes the PNG "
        "pixels `uint8(clip(floor(image * 255 + 0.5), 0, 255))` computed in float32 (round half up, not numpy's "
        "round-half-to-even), transposed to [H, W, 3]; NaN or infinite pixels are an error.",
    ]


# -- 3. the step table ---------------------------------------------------------------------------------------------
def _step_table_section(manifest: dict) -> str:
    table = manifest["sampler"]["step_table"]
    kinds = manifest["schedule"]["step_kinds"]
    keys = ("timesteps", "input_scale", "x0_c_sample", "x0_c_model_output", "c_sample", "c_model_output", "c_x0_prev")
    rows = [[i, kind, " -> ".join(manifest["wiring"]["steps"][kind])] + [_number(table[k][i]) if k != "timesteps"
                                                                          else table[k][i] for k in keys]
            for i, kind in enumerate(kinds)]
    return (f"Sampler `{manifest['sampler']['name']}` (`{table.get('diffusers_class', '?')}`, prediction type "
            f"`{table.get('prediction_type', '?')}`), {len(kinds)} steps; exact values in manifest.json "
            "`sampler.step_table`. Formula: `" + table.get("formula", "") + "`\n\n"
            + _table(["i", "kind", "graphs", *keys], rows))


# -- 4. graphs -----------------------------------------------------------------------------------------------------
def _qdq_io(bundle: Path, rel: str) -> dict[str, str]:
    """Graph input/output name -> 'uint16 scale=... zero_point=...' of the QuantizeLinear it feeds (inputs) or the
    DequantizeLinear that produces it (outputs); tensors without one are absent."""
    import onnx
    from onnx import numpy_helper

    try:
        _, model, external = read_graph(bundle, rel)  # through the bundle's confinement, without external data
    except Exception:  # boundary: an unreadable graph is reported by validate; here it only has no Q/DQ details
        return {}
    inits = {i.name: i for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    found: dict[str, str] = {}

    def value(tensor):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return external_array(bundle, external, tensor)
        return numpy_helper.to_array(tensor)

    for node in model.graph.node:
        name = (node.input[0] if node.op_type == "QuantizeLinear" and node.input[0] in inputs else
                node.output[0] if node.op_type == "DequantizeLinear" and node.output[0] in outputs else None)
        if name is None or name in found or len(node.input) < 3 or not {node.input[1], node.input[2]} <= set(inits):
            continue
        try:
            scale = value(inits[node.input[1]]).reshape(-1)
            zero = value(inits[node.input[2]]).reshape(-1)
        except Exception:  # boundary: external data missing
            continue
        if scale.size == 1:
            found[name] = f"{zero.dtype.name} scale={_number(scale[0])} zero_point={int(zero[0])}"
        else:
            found[name] = f"{zero.dtype.name} per-channel ({scale.size} scales)"
    return found


def _encodings_io(bundle: Path, quant: dict) -> dict[str, str]:
    """Tensor name -> 'bw 16 scale=... offset=...' from the graph's AIMET encodings (activation encodings)."""
    if not quant.get("encodings"):
        return {}
    try:
        data = json.loads(read_inside(bundle, quant["encodings"]).decode("utf-8"))
        entries = data["activation_encodings"]
        if isinstance(entries, dict):  # pre-1.0.0 format: name -> [encoding]
            entries = [{"name": k, **(v[0] if isinstance(v, list) and v else {})} for k, v in entries.items()]
    except (BundleError, OSError, ValueError, KeyError, TypeError):
        return {}
    found = {}
    for e in entries:
        scale, offset = e.get("scale"), e.get("offset")
        scale = scale[0] if isinstance(scale, list) and len(scale) == 1 else scale
        offset = offset[0] if isinstance(offset, list) and len(offset) == 1 else offset
        found[e.get("name")] = f"bw {e.get('bw')} scale={scale} offset={offset}"
    return found


def _graphs_section(bundle: Path, manifest: dict) -> str:
    wiring = manifest["wiring"]
    parts = [
        "**Feed and read float32: every graph input and output is float32 (except `input_ids`, int64), quantized "
        "graphs included. Do not quantize inputs or dequantize outputs by hand from the scale/zero-point columns "
        "below: the boundary QuantizeLinear/DequantizeLinear are inside the graphs.** Quantized graphs are QDQ ONNX: "
        "they quantize their inputs and dequantize their outputs themselves (QuantizeLinear / DequantizeLinear "
        "inside the graph; with onnxruntime's QNN EP option `offload_graph_io_quantization=0` that runs on the HTP "
        "too), so the app feeds and reads float32. The quantization columns say what happens at each boundary "
        "(QDQ: the graph's own QuantizeLinear/DequantizeLinear; encodings: AIMET's values for the same tensor, "
        "real = (q + offset) * scale)."]
    for name in _graph_order(manifest):
        graph = manifest["graphs"][name]
        quant = graph.get("quantization") or {}
        precision = graph.get("precision", "fp32")
        runs = ("once per image, first" if name == wiring["text"]["graph"] else
                "once per image, last" if name == wiring["decode"]["graph"] else
                "on " + " and ".join(f"{k} steps" for k in ("full", "clocked")
                                     if name in wiring["steps"].get(k, [])))
        lines = [f"### `{name}` — `{graph['file']}`", "",
                 f"Runs {runs}. Precision **{precision}**"
                 + (f" (external weights: `{graph['file']}.data`)" if graph.get("external_data") else "")
                 + (f"; ONNX opset {graph['opset']}" if graph.get("opset") is not None else "") + "."]
        if quant.get("backend"):
            lines.append(f"Quantized by `{quant['backend']}`: weights {quant.get('weight_bits')}-bit "
                         f"{quant.get('weights', '')}, activations {quant.get('activation_bits')}-bit "
                         f"{quant.get('activations', '')}. Why: {quant.get('reason', '')}.")
            details = quant.get("details") or {}
            extra = [f"{k} {details[k]}" for k in ("opset", "time_features_bits", "float_functional_ops")
                     if details.get(k) is not None]
            if extra:
                lines.append("Details: " + "; ".join(str(e) for e in extra) + ".")
        elif quant.get("reason"):
            lines.append(f"Not quantized: {quant['reason']}.")
        qdq = _qdq_io(bundle, graph["file"]) if quant.get("backend") else {}
        enc = _encodings_io(bundle, quant)
        header = ["", "tensor", "shape"] + (["quantization (QDQ graph)"] if quant.get("backend") else []) \
            + (["encodings"] if enc else [])
        rows = []
        for kind in ("inputs", "outputs"):
            for spec in graph[kind]:
                row = [kind[:-1], f"`{spec['name']}`", _shape(spec)]
                if quant.get("backend"):
                    unquantized = "float" if spec.get("dtype", "float32").startswith("float") else spec["dtype"]
                    row.append(qdq.get(spec["name"], f"{unquantized} (not quantized at the boundary)"))
                if enc:
                    row.append(enc.get(spec["name"], "—"))
                rows.append(row)
        lines += ["", _table(header, rows)]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# -- 5. NPU --------------------------------------------------------------------------------------------------------
_LOAD_SNIPPET = """```python
import onnxruntime as ort, onnxruntime_qnn   # desktop (x86_64 emulated HTP) or Windows on Snapdragon
ort.register_execution_provider_library("QNNExecutionProvider", onnxruntime_qnn.get_library_path())
devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
options = ort.SessionOptions()
options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")   # all or nothing on the NPU
options.add_provider_for_devices(devices, {"backend_path": onnxruntime_qnn.get_qnn_htp_path()})
session = ort.InferenceSession("context/SOC/GRAPH_ctx.onnx", options)     # the .bin is read from beside it
outputs = session.run(None, {name: float32_array, ...})                    # same I/O as graphs/GRAPH.onnx
```"""


def _a8_share(bundle: Path, manifest: dict) -> str:
    """What share of the UNet's MACs runs with 8-bit activations (the HTP's faster rate), counted from the graphs."""
    from .flops import a8_share_text, count_bundle, inspect_report

    schedule = manifest["schedule"]
    report = inspect_report(count_bundle(bundle, manifest), manifest["wiring"]["steps"], schedule["steps"],
                            schedule["clock"], {"counter": "onnx"})
    return f"8-bit activations: {a8_share_text(report)} (`cw-export inspect BUNDLE` prints the same count). "


# Measured on onnxruntime 1.32 + onnxruntime-qnn 2.7.0 (emulated HTP): tests/quantize/test_shipped_graphs.py places
# every quantized graph of a W8A16 bundle under basic, extended and all
OPTIMISATION_LEVELS_PARAGRAPH = (
    "**Optimisation level and the NPU.** With CPU fallback disabled, whether a quantized graph places on the QNN "
    "HTP does not depend on onnxruntime's graph optimisation level: your runtime's default (`ORT_ENABLE_ALL`) "
    "places exactly what `ORT_ENABLE_BASIC` places. onnxruntime applies only its basic rewrites before the QNN "
    "execution provider claims the nodes; its extended and layout fusions (QLinearConv, QDQ propagation, NCHWc) "
    "then rewrite only nodes the CPU execution provider holds, and with fallback disabled it holds none. On the CPU "
    "execution provider the level does matter: those fusions change QDQ numerics, so create CPU sessions with "
    "the manifest's `session_options` (section 'Parity', which was measured under them).")


def _npu_section(bundle: Path, manifest: dict) -> str:
    contexts = manifest.get("context_binaries") or {}
    quantized = sorted(n for n, g in manifest["graphs"].items() if g.get("precision", "fp32") != "fp32")
    fp32 = sorted(n for n, g in manifest["graphs"].items() if g.get("precision", "fp32") == "fp32")
    intro = (f"FP32 graphs ({', '.join(f'`{n}`' for n in fp32)}) run on the CPU/GPU with any onnxruntime build. "
             if fp32 else "")
    if quantized:
        intro = OPTIMISATION_LEVELS_PARAGRAPH + "\n\n" + intro + _a8_share(bundle, manifest)
    if not contexts:
        how = ("This bundle has no QNN context binaries. " if quantized else
               "This bundle is FP32: it has no graph for the NPU. ")
        if quantized:
            how += (f"The quantized graphs ({', '.join(f'`{n}`' for n in quantized)}) can be loaded as QDQ ONNX "
                    "with onnxruntime's QNN execution provider (HTP backend), which compiles them at session "
                    f"creation; `cw-export --target {manifest.get('target', 'snapdragon-int8')} --soc SM8650` "
                    "(known SoCs: recipes/socs.toml) "
                    "compiles them offline into `context/<SOC>/<graph>_ctx.onnx` + `.bin` instead. A graph must "
                    "place fully on the HTP for either (docs/qnn_htp.md lists what does not yet).")
        return intro + how
    rows = [[soc, f"`{graph}`", f"`{e['model']}`", f"`{e['binary']}`", e["soc_model"], f"v{e['htp_arch']}",
             e.get("qnn_sdk", "")]
            for soc, per_graph in sorted(contexts.items()) for graph, e in sorted(per_graph.items())]
    return (intro + "Each quantized graph is compiled offline for the SoCs below (onnxruntime-qnn QNN EP, HTP backend, "
            "`ep.context_embed_mode=0`): the `_ctx.onnx` file is a one-node `com.microsoft.EPContext` model whose "
            "`ep_cache_context` attribute names the `.bin` beside it. Copy both, keep the names, and create the "
            "session on the `_ctx.onnx` file with the QNN execution provider; its inputs and outputs are exactly "
            "those of the graph (section 'Graphs', float32). Use the files of the device's SoC: a context binary "
            "is compiled for one HTP architecture.\n\n"
            + _table(["SoC", "graph", "EPContext model", "context binary", "soc_model", "HTP", "QNN SDK"], rows)
            + "\n\n" + _LOAD_SNIPPET + "\n\nOn Android use onnxruntime's QNN build the same way (session option "
            "`session.disable_cpu_ep_fallback=1`, provider option `backend_path=libQnnHtp.so`).")


# -- 6. parity -----------------------------------------------------------------------------------------------------
def _parity_section(manifest: dict) -> str:
    parity = manifest.get("parity")
    if not parity:
        rows = [[f"`{n}`", f"{g['parity_fp32_vs_torch']['max_rel_diff']:.2e}",
                 f"{g['parity_fp32_vs_torch'].get('min_sqnr_db', float('nan')):.1f}"]
                for n, g in sorted(manifest["graphs"].items()) if g.get("parity_fp32_vs_torch")]
        return ("FP32 bundle: each graph was checked against torch at export (onnxruntime CPU vs torch, same "
                "inputs).\n\n" + _table(["graph", "max relative diff", "min SQNR (dB)"], rows))
    thresholds = parity.get("thresholds", {})
    gate = parity.get("gate", {})
    verdict = ("passed" if gate.get("passed") else
               "FAILED, written with --allow-low-parity" if gate.get("allowed_by_flag") else "failed")
    graph_rows = [[f"`{n}`", f"{r['sqnr_db']:.2f}", r.get("samples", ""),
                   ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.get("outputs", {}).items()))]
                  for n, r in sorted(parity.get("graphs", {}).items())]
    step_rows = [[s["step"], s["kind"], f"{s['latent_psnr_db']:.2f}", f"{s['guidance_ratio']:.4f}"]
                 for s in parity.get("steps", [])]
    session = parity.get("session_options", manifest.get("session_options", {}))
    return (f"Quantized graphs vs the FP32 torch model on held-out prompts ({len(parity.get('prompts', []))} of "
            f"set `{parity.get('prompt_set')}`, seeds {parity.get('seeds')}), measured in onnxruntime (CPU EP) with "
            f"session options {json.dumps(session, sort_keys=True)} — use the same optimisation settings: they "
            f"change QDQ numerics. Gate: **{verdict}**"
            + (f" ({'; '.join(gate.get('failures', []))})" if gate.get("failures") else "")
            + f"; thresholds {json.dumps(thresholds, sort_keys=True)}.\n\n"
            f"Final latent PSNR: **{parity.get('final_latent_psnr_db', float('nan')):.2f} dB** "
            f"({parity.get('psnr_definition', '')}).\n\n"
            + _table(["graph", "SQNR (dB, worst output)", "samples", "per output (dB)"], graph_rows) + "\n\n"
            + _table(["step i", "kind", "latent PSNR (dB)", "guidance ratio std(cond-uncond) vs FP32"], step_rows)
            + _provider_parity(manifest))


def _provider_parity(manifest: dict) -> str:
    """The same numbers measured on other execution providers (``cw-export validate --provider P --record``)."""
    by_provider = manifest.get("parity_by_provider") or {}
    if not by_provider:
        return ""
    parity = manifest["parity"]
    providers = sorted(by_provider)
    rows = [[f"`{n}`", f"{r['sqnr_db']:.2f}"] + [f"{by_provider[p]['graphs'][n]['sqnr_db']:.2f}"
                                                 if n in by_provider[p]["graphs"] else "-" for p in providers]
            for n, r in sorted(parity.get("graphs", {}).items())]
    rows.append(["final latent PSNR", f"{parity.get('final_latent_psnr_db', float('nan')):.2f}"]
                + [f"{by_provider[p]['final_latent_psnr_db']:.2f}" for p in providers])
    rows.append(["gate", "passed" if parity.get("gate", {}).get("passed") else "failed"]
                + ["passed" if by_provider[p]["gate"]["passed"] else "failed: " + "; ".join(by_provider[p]["gate"]["failures"])
                   for p in providers])
    return ("\n\nThe same held-out prompts and seeds on other execution providers (`cw-export validate BUNDLE "
            "--provider P --record`; qnn-htp is onnxruntime-qnn's HTP backend, emulated on x86_64 when measured on a "
            "desktop), SQNR (dB) vs FP32 torch:\n\n"
            + _table(["graph", "cpu (onnxruntime CPU EP)", *providers], rows))


# -- the document --------------------------------------------------------------------------------------------------
def render_handoff(bundle: str | Path, manifest: dict) -> str:
    """The README's text for ``bundle`` with ``manifest`` (its ``files`` entry is not used)."""
    bundle = Path(bundle)
    source = manifest.get("source_model", {})
    tool = manifest.get("tool", {})
    versions = ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items()))
    head = (f"# Clockwork Stable Diffusion bundle: `{manifest.get('target', '?')}`\n\n"
            f"Written by {tool.get('name', 'cw-export')} {tool.get('version', '?')} from "
            f"`{source.get('name') or source.get('path') or '?'}` (source sha256 `{source.get('sha256', '?')}`); "
            f"image (H, W) = {tuple(manifest['latent']['image_size'])}, latent {manifest['latent']['shape']}, "
            f"{manifest['schedule']['steps']} steps, clock {manifest['schedule']['clock']}, "
            f"adaptor `{manifest.get('adaptor', {}).get('kind', '?')}`. Generated from manifest.json; "
            f"`cw-export report BUNDLE` regenerates it. Versions: {versions}.\n\n"
            "Clockwork (Habibian et al., CVPR 2024) splits the UNet at its low-resolution layers: on *full* steps "
            "the whole UNet runs; on *clocked* steps the low-resolution part is skipped and its output taken from "
            "the previous step (identity adaptor: that is the last full step's output) or predicted by a small "
            "adaptor (section 2, 'Clocked steps and the cache').")
    sections = [
        _files_section(bundle, manifest),
        _loop_section(manifest),
        _step_table_section(manifest),
        _graphs_section(bundle, manifest),
        _npu_section(bundle, manifest),
        _parity_section(manifest),
    ]
    body = "\n\n".join(f"## {n}. {title}\n\n{text}" for n, (title, text) in enumerate(zip(SECTIONS, sections), 1))
    return head + "\n\n" + body + "\n"


def write_handoff(bundle: Path, manifest: dict) -> None:
    """Write ``bundle/README.md`` (call before the manifest's file list is computed, so it is listed with sha256)."""
    (Path(bundle) / HANDOFF_NAME).write_text(render_handoff(bundle, manifest), encoding="utf-8", newline="\n")


def refresh_handoff(bundle: str | Path, manifest: dict | None = None) -> bool:
    """Regenerate a bundle's README.md in place and its manifest entry; returns whether the README changed.

    ``manifest``: an updated manifest (e.g. new parity records) to render from and write, so manifest.json is
    written once, with the README's new hash in it."""
    from ..contract.manifest import read_manifest
    from .rewrite import replace_generated, write_manifest_in_place

    bundle = Path(bundle)
    updated = manifest is not None
    manifest = manifest if updated else read_manifest(bundle)
    changed = replace_generated(bundle, manifest, HANDOFF_NAME, render_handoff(bundle, manifest).encode("utf-8"))
    if changed or updated:
        write_manifest_in_place(bundle, manifest)
    print(f"hand-off {'written' if changed else 'unchanged'}: {bundle / HANDOFF_NAME}")
    return changed


__all__ = ["HANDOFF_NAME", "SECTIONS", "render_handoff", "write_handoff", "refresh_handoff"]
