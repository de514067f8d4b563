"""Torch wrappers that give the non-UNet graphs of a bundle plain tensor I/O (for ONNX export and quantization).

diffusers' pipeline does the same work in Python around the models; here it is inside the graph so a mobile
runtime only feeds tensors: token ids in, embeddings out; latents in, an RGB image in [0, 1] out.
"""

from __future__ import annotations

import torch


class TextEncoderGraph(torch.nn.Module):
    """input_ids -> (encoder_hidden_states, pooled_text): the two text tensors the UNet and the adaptor need."""

    def __init__(self, text_encoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor):
        out = self.text_encoder(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class VaeDecoderGraph(torch.nn.Module):
    """latents (before VAE scaling) -> image [1, 3, H, W] in [0, 1], as StableDiffusionPipeline post-processes it."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)
