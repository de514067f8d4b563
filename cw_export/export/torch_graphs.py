"""The FP32 torch side of every exported graph, called like an onnxruntime session (calibration, parity and the
quantizers run it on the same feeds as the ONNX graph); built from the manifest and the graph registry."""

from __future__ import annotations

import numpy as np

from ..contract.graphs import ADAPTOR, GRAPHS, TEXT_ENCODER, VAE_DECODER, graph_names


class TorchGraph:
    """A torch module with an onnxruntime-session-like ``run(output_names, feeds)``: the FP32 reference graph."""

    def __init__(self, module, input_names: list[str], output_names: list[str]) -> None:
        self.module = module
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            # torch wants writable memory: the runtime's per-image inputs may be read-only views (no copy then)
            out = self.module(*[torch.from_numpy(np.require(feeds[n], requirements=("C", "W")))
                                for n in self.input_names])
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        values = dict(zip(self.output_names, (t.detach().cpu().numpy() for t in out)))
        return [values[n] for n in (output_names or self.output_names)]


def _keep_inputs(module, call_names: list[str], kept: list[str]):
    """``module`` taking only the inputs its ONNX graph kept (the exporter drops unused ones, e.g. the text input of
    a high_res_in without cross-attention); a dropped one gets a placeholder tensor the forward never reads (not
    None: aimet's tracer cannot follow a submodule called with None)."""
    import torch

    if call_names == kept:
        return module

    class KeptInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wrapped = module  # cw_export.quantize.mixed.group_of skips this wrapper level
            self.register_buffer("unused", torch.zeros(1), persistent=False)

        def forward(self, *args):
            given = dict(zip(kept, args))
            return self.wrapped(*[given.get(name, self.unused) for name in call_names])

    return KeptInputs()


def graph_modules(model, split, adaptor_kind: str, adaptor_state: dict | None = None) -> dict:
    """The torch module behind each graph of the registry a bundle with ``adaptor_kind`` holds, by graph name: the
    split's three UNet parts, the text encoder and VAE decoder wrappers, and the learned adaptor."""
    from ..adaptor import build_adaptor, default_adaptor_config
    from .wrappers import VaeDecoderGraph, text_graph

    modules = {**split.graph_modules(), TEXT_ENCODER: text_graph(model), VAE_DECODER: VaeDecoderGraph(model.vae)}
    if adaptor_kind == "learned":
        config = default_adaptor_config(model.unet, model.pooled_dim)
        modules[ADAPTOR] = build_adaptor(config, adaptor_state)
    return {name: modules[name] for name in graph_names(adaptor_kind)}


def torch_graphs(model, manifest: dict, adaptor_state: dict | None = None) -> dict[str, TorchGraph]:
    """The FP32 torch graph behind every graph of ``manifest`` (UNet side, text encoder, VAE decoder), as
    session-like objects, each called with the registry's inputs (cw_export.contract.graphs)."""
    from ..split import split_unet

    split = split_unet(model.unet)
    kind = "learned" if ADAPTOR in manifest["graphs"] else "identity"
    graphs = {}
    for name, module in graph_modules(model, split, kind, adaptor_state).items():
        spec = manifest["graphs"][name]
        kept = [s["name"] for s in spec["inputs"]]
        call_names = GRAPHS[name].input_names(split.num_skips)
        graphs[name] = TorchGraph(_keep_inputs(module, call_names, kept), kept, [s["name"] for s in spec["outputs"]])
    return graphs
