"""Clockwork adaptors: what replaces ``low_res`` on clocked steps (PAPER.md "Adaptor").

* ``identity``: r_out(t) := r_out(t+1), the cached output of the last full step (paper baseline, official code).
  It needs no graph: the runtime reuses the cached tensor.
* ``learned``: the paper's ResNet adaptor
  r̂_out(t) = r_out(t+1) + φ(r_in(t), r_out(t+1), t_emb, text):
  strided conv halving the resolution -> + linear projection of the pooled text embedding -> two ResBlocks with
  additive time-embedding conditioning (LDM style) -> ConvTranspose2d back -> residual from r_out(t+1).
  The last layer is zero-initialised, so an untrained adaptor is exactly the identity adaptor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

ADAPTOR_KINDS = ("identity", "learned")


@dataclass(frozen=True)
class AdaptorConfig:
    """Shapes of the tensors around the cut plus the adaptor's own width (not given by the paper)."""

    r_in_channels: int
    r_out_channels: int
    temb_channels: int
    text_channels: int
    channels: int

    def to_dict(self) -> dict:
        return asdict(self)


def default_adaptor_config(unet, text_channels: int) -> AdaptorConfig:
    """Width = half of r_out's channels (SD 1.5: 320 -> ~10M params, about the paper's ~14M ResNet adaptor), at
    least 64: at 32 the tiny model's adaptor could not halve the identity adaptor's r_out error on held-out prompts
    however long it trained (docs/distillation.md)."""
    r_in_channels = unet.config.block_out_channels[0]
    r_out_channels = unet.up_blocks[-2].resnets[-1].out_channels
    channels = max(64, (r_out_channels // 2 + 31) // 32 * 32)
    temb_channels = unet.time_embedding.linear_2.out_features
    return AdaptorConfig(r_in_channels, r_out_channels, temb_channels, text_channels, channels)


def _groups(channels: int) -> int:
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


class TimeResBlock(nn.Module):
    """LDM ResBlock: GN-SiLU-conv, + projected time embedding, GN-SiLU-conv, residual."""

    def __init__(self, channels: int, temb_channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, channels)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.temb_proj(self.act(temb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return x + h


class LearnedAdaptor(nn.Module):
    """Inputs (r_in, r_out_prev, temb, pooled_text) -> r_out estimate at the current step."""

    def __init__(self, config: AdaptorConfig) -> None:
        super().__init__()
        self.config = config
        self.down = nn.Conv2d(config.r_in_channels + config.r_out_channels, config.channels, 3, stride=2, padding=1)
        self.text_proj = nn.Linear(config.text_channels, config.channels)
        self.blocks = nn.ModuleList([TimeResBlock(config.channels, config.temb_channels) for _ in range(2)])
        self.norm_out = nn.GroupNorm(_groups(config.channels), config.channels)
        self.act = nn.SiLU()
        self.up = nn.ConvTranspose2d(config.channels, config.r_out_channels, 4, stride=2, padding=1)
        nn.init.zeros_(self.up.weight)  # untrained == identity adaptor
        nn.init.zeros_(self.up.bias)

    def forward(self, r_in: torch.Tensor, r_out_prev: torch.Tensor, temb: torch.Tensor,
                pooled_text: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.cat([r_in, r_out_prev], dim=1))
        h = h + self.text_proj(pooled_text)[:, :, None, None]
        for block in self.blocks:
            h = block(h, temb)
        return r_out_prev + self.up(self.act(self.norm_out(h)))


def build_adaptor(config: AdaptorConfig, state_dict: dict | None = None) -> LearnedAdaptor:
    """A learned adaptor in eval mode; zero-initialised output unless trained weights are given."""
    adaptor = LearnedAdaptor(config)
    if state_dict is not None:
        adaptor.load_state_dict(state_dict)
    return adaptor.eval()
