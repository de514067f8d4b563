"""Torch wrappers that give the non-UNet graphs of a bundle plain tensor I/O (for ONNX export and quantization).

diffusers' pipeline does the same work in Python around the models; here it is inside the graph so a mobile
runtime only feeds tensors: token ids in, embeddings out; latents in, an RGB image in [0, 1] out.
"""

from __future__ import annotations

import torch


class TextEncoderGraph(torch.nn.Module):
    """input_ids[, input_ids_2] -> (encoder_hidden_states, pooled_text): the two text tensors the UNet and the
    adaptor need. One encoder (SD 1.x/2.x): its last hidden state and pooled output. Two (SDXL, as
    StableDiffusionXLPipeline.encode_prompt): both penultimate hidden states side by side, and the second
    encoder's projected pooled output (the UNet's ``text_embeds``); without a second encoder ``input_ids_2`` is
    unread and the exporter drops it."""

    def __init__(self, text_encoder, text_encoder_2=None) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None):
        if self.text_encoder_2 is None:
            out = self.text_encoder(input_ids=input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output
        first = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        second = self.text_encoder_2(input_ids=input_ids_2, output_hidden_states=True, return_dict=True)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def text_graph(model) -> TextEncoderGraph:
    """The text encoder graph's module of ``model`` (an SDModel): one encoder or SDXL's two."""
    return TextEncoderGraph(model.text_encoder, model.text_encoder_2)


class VaeDecoderGraph(torch.nn.Module):
    """latents (before VAE scaling) -> image [1, 3, H, W] in [0, 1], as StableDiffusionPipeline post-processes it."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)
