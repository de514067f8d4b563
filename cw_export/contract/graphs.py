"""The graph registry: every graph a bundle can hold, its inputs and outputs, and when it runs.

Everything else derives from this table: the manifest's wiring (``make_wiring``), the build's export jobs and torch
graph factories, the quantizer's graph lists (``LOOP_GRAPHS`` / ``IMAGE_GRAPHS``), FLOP counting and the runtime.
The UNet split (PAPER.md "Architecture"): high_res_in (conv_in + the high-res down blocks) -> low_res (the low-res
down blocks, mid block, low-res up blocks) -> high_res_out (the high-res up blocks + conv_out); on clocked steps the
adaptor stands in for low_res.
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT_ENCODER = "text_encoder"
HIGH_RES_IN = "high_res_in"
LOW_RES = "low_res"
ADAPTOR = "adaptor"
HIGH_RES_OUT = "high_res_out"
VAE_DECODER = "vae_decoder"

PER_STEP = "per_step"  # runs inside the denoising loop
PER_IMAGE = "per_image"  # runs once per image (before or after the loop)
SKIPS = "skip_*"  # stands for the split's skip tensors skip_0 .. skip_{n-1} (their count depends on the UNet)

BATCH = 2  # every UNet-side graph runs classifier-free guidance as one batch: [uncond, cond]

FULL = "full"  # step kinds (cw_export.contract.schedule)
CLOCKED = "clocked"


@dataclass(frozen=True)
class GraphSpec:
    """One graph of the bundle: the slots it reads and writes (its ONNX input/output names), when it runs, and on
    which step kinds (loop graphs). ``learned_only``: present only with the learned adaptor."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    runs: str
    step_kinds: tuple[str, ...] = ()
    learned_only: bool = False

    def input_names(self, num_skips: int) -> list[str]:
        return expand(self.inputs, num_skips)

    def output_names(self, num_skips: int) -> list[str]:
        return expand(self.outputs, num_skips)


GRAPHS: dict[str, GraphSpec] = {spec.name: spec for spec in (
    # input_ids_2: the second tokenizer's ids (SDXL); pooled_text and add_time_features into high_res_in: SDXL's
    # text_time conditioning. A model without them exports graphs without these inputs (the exporter drops unread
    # inputs; bundle.writer.prune_wiring drops their wiring).
    GraphSpec(TEXT_ENCODER, ("input_ids", "input_ids_2"), ("encoder_hidden_states", "pooled_text"), PER_IMAGE),
    GraphSpec(HIGH_RES_IN, ("sample", "time_features", "encoder_hidden_states", "pooled_text", "add_time_features"),
              ("temb", "r_in", SKIPS), PER_STEP, (FULL, CLOCKED)),
    GraphSpec(LOW_RES, ("r_in", "temb", "encoder_hidden_states"), ("r_out",), PER_STEP, (FULL,)),
    GraphSpec(ADAPTOR, ("r_in", "r_out_prev", "temb", "pooled_text"), ("r_out",), PER_STEP, (CLOCKED,),
              learned_only=True),
    GraphSpec(HIGH_RES_OUT, ("r_out", "temb", "encoder_hidden_states", SKIPS), ("noise_pred",), PER_STEP,
              (FULL, CLOCKED)),
    GraphSpec(VAE_DECODER, ("latents",), ("image",), PER_IMAGE),
)}
LOOP_GRAPHS = tuple(n for n, s in GRAPHS.items() if s.runs == PER_STEP)  # high_res_in, low_res, adaptor, high_res_out
IMAGE_GRAPHS = tuple(n for n, s in GRAPHS.items() if s.runs == PER_IMAGE)  # text_encoder, vae_decoder
TEXT_OUTPUTS = GRAPHS[TEXT_ENCODER].outputs  # (encoder_hidden_states, pooled_text), in this order
STEP_INPUTS = ("sample", "time_features", "encoder_hidden_states", "pooled_text")  # slots the host fills each step
ADDED_STEP_INPUTS = ("add_time_features",)  # and, for SDXL's text_time conditioning, this one (fixed per bundle)
TEXT_TIME_INPUTS = {HIGH_RES_IN: ("pooled_text", "add_time_features")}  # graph inputs of text_time models only
STEP_OUTPUT = "noise_pred"
CACHE = {"r_out_prev": "r_out"}  # slot kept from one step to the next


def expand(names: tuple[str, ...], num_skips: int) -> list[str]:
    """Names with ``skip_*`` replaced by the split's skip tensors."""
    out: list[str] = []
    for name in names:
        out.extend(f"skip_{i}" for i in range(num_skips)) if name == SKIPS else out.append(name)
    return out


def graph_names(adaptor: str) -> list[str]:
    """The graphs of a bundle with this adaptor kind, in the registry's (data-flow) order."""
    return [n for n, s in GRAPHS.items() if adaptor == "learned" or not s.learned_only]


def make_wiring(num_skips: int, adaptor: str, dual_text: bool = False, text_time: bool = False,
                empty_negative_zeros: bool = False) -> dict:
    """Which slot each graph input reads and each output writes, per step kind (the manifest's contract).
    ``dual_text``: the text encoder takes a second tokenizer's ids too; ``text_time``: the host fills
    ``add_time_features`` every step; ``empty_negative_zeros``: an empty negative prompt's embeddings are zeros
    (SDXL's force_zeros_for_empty_prompt)."""
    loop = [n for n in graph_names(adaptor) if GRAPHS[n].runs == PER_STEP]
    absent = {} if text_time else TEXT_TIME_INPUTS
    graphs = {n: {"inputs": {k: k for k in GRAPHS[n].input_names(num_skips) if k not in absent.get(n, ())},
                  "outputs": {k: k for k in GRAPHS[n].output_names(num_skips)}} for n in loop}
    text, decoder = GRAPHS[TEXT_ENCODER], GRAPHS[VAE_DECODER]
    text_wiring = {"graph": TEXT_ENCODER, "input": text.inputs[0], "batch": ["negative_prompt", "prompt"]}
    if dual_text:
        text_wiring["input_2"] = text.inputs[1]
    if empty_negative_zeros:
        text_wiring["empty_negative"] = "zeros"
    return {
        "step_inputs": list(STEP_INPUTS + (ADDED_STEP_INPUTS if text_time else ())),
        "graphs": graphs,
        "steps": {kind: [n for n in loop if kind in GRAPHS[n].step_kinds] for kind in (FULL, CLOCKED)},
        # the identity adaptor: a clocked step reads the cached r_out of the last step as its r_out
        "clocked_aliases": {} if adaptor == "learned" else {"r_out": "r_out_prev"},
        "cache": dict(CACHE),
        "step_output": STEP_OUTPUT,
        "guidance": "noise = noise_pred[0] + guidance_scale * (noise_pred[1] - noise_pred[0]); batch = [uncond, cond]",
        "text": text_wiring,
        "decode": {"graph": VAE_DECODER, "input": decoder.inputs[0], "output": decoder.outputs[0],
                   "note": "latents are the sampler's final x (before 1/scaling_factor, which is inside the graph); "
                           "image is RGB in [0, 1]"},
    }
