"""Split a diffusers UNet at the Clockwork Stage-1 cut (Habibian et al., CVPR 2024, Sec. 3 / PAPER.md "Split").

    high_res_in  = time embedding + conv_in + down_blocks[0] (incl. its downsampler)
    low_res      = down_blocks[1:] + mid_block + up_blocks[:-1], without the upsampler of up_blocks[-2]
    high_res_out = that upsampler + up_blocks[-1] + conv_norm_out / conv_act / conv_out

r_in is down_blocks[0]'s output (after its downsampler) and r_out is up_blocks[-2]'s output before its upsampler,
both at the low resolution. On clocked steps low_res is skipped and an adaptor predicts r_out from the previous
step's r_out. The three parts share the UNet's parameters (no copies), so an SD 1.5 split costs no extra memory.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError


def _check_splittable(unet) -> None:
    cfg = unet.config
    if len(unet.down_blocks) < 3 or len(unet.up_blocks) < 3:
        raise ModelError(f"UNet has {len(unet.down_blocks)} resolution levels; the Clockwork split needs at least 3")
    if unet.down_blocks[0].downsamplers is None or unet.up_blocks[-2].upsamplers is None:
        raise ModelError("UNet's first down block must downsample and its second-to-last up block must upsample")
    unsupported = {
        "class_embed_type": cfg.class_embed_type, "encoder_hid_dim_type": cfg.encoder_hid_dim_type,
        "time_cond_proj_dim": cfg.time_cond_proj_dim,
        # SDXL's text_time conditioning is supported (high_res_in adds it to the time embedding); others are not
        "addition_embed_type": None if cfg.addition_embed_type == TEXT_TIME else cfg.addition_embed_type,
    }
    set_options = {k: v for k, v in unsupported.items() if v is not None}
    if set_options:
        raise ModelError(f"UNet options not supported by the split: {set_options}")
    n_high_skips = len(unet.up_blocks[-1].resnets)
    if n_high_skips != 1 + len(unet.down_blocks[0].resnets):
        raise ModelError("up_blocks[-1] does not consume exactly conv_in + down_blocks[0] skips; cannot split")


TEXT_TIME = "text_time"  # SDXL's added conditioning (diffusers UNet2DConditionModel addition_embed_type)


def has_text_time(unet) -> bool:
    """The UNet adds SDXL's conditioning to its time embedding: MLP(pooled text ++ sinusoid of 6 size/crop ids)."""
    return unet.config.addition_embed_type == TEXT_TIME


def _has_cross_attention(block) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def time_features_spec(unet) -> dict:
    """The UNet's sinusoidal timestep projection as data, so a runtime can compute ``time_features`` itself.

    The exported high_res_in takes these features instead of the timestep: sin/cos of arguments up to ~1000 lose
    every digit at the reduced float precision the Hexagon NPU runs float ops in (measured on the emulated HTP: temb
    at 18-25 dB vs the CPU; docs/qnn_htp.md), while the features themselves lie in [-1, 1] and quantize like any
    activation. Formula: diffusers.models.embeddings.get_timestep_embedding (runtime.time_features computes it).
    """
    proj = unet.time_proj
    if type(proj).__name__ != "Timesteps":
        raise ModelError(f"UNet time_proj is {type(proj).__name__}; the split supports diffusers Timesteps only")
    return {"function": "sinusoidal", "dim": int(proj.num_channels), "flip_sin_to_cos": bool(proj.flip_sin_to_cos),
            "downscale_freq_shift": float(proj.downscale_freq_shift), "scale": float(proj.scale),
            "max_period": 10000}


def add_time_features_spec(unet, time_ids: list[float]) -> dict | None:
    """SDXL's added-time sinusoid as data (like ``time_features_spec``), with the bundle's fixed ``time_ids``
    (original size, crop top-left, target size, in pixels; a bundle has one image size): the runtime computes the
    sinusoid of each id, [6, dim] flattened to high_res_in's ``add_time_features`` [batch, 6 * dim]. None for a
    UNet without text_time conditioning."""
    if not has_text_time(unet):
        return None
    proj = unet.add_time_proj
    return {"function": "sinusoidal", "dim": int(proj.num_channels), "flip_sin_to_cos": bool(proj.flip_sin_to_cos),
            "downscale_freq_shift": float(proj.downscale_freq_shift), "scale": float(proj.scale),
            "max_period": 10000, "time_ids": [float(v) for v in time_ids]}


def sdxl_time_ids(height: int, width: int) -> list[float]:
    """StableDiffusionXLPipeline's default add_time_ids for an image of ``height`` x ``width`` pixels:
    original_size = target_size = (height, width), crop top-left (0, 0)."""
    return [float(height), float(width), 0.0, 0.0, float(height), float(width)]


def _high_res_in_body(part, sample: torch.Tensor, time_features: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      pooled_text: torch.Tensor | None = None, add_time_features: torch.Tensor | None = None):
    """Time MLP (+ SDXL's added conditioning) + conv_in + level 0; shared by the torch part and its exported graph."""
    # 1. time (diffusers UNet2DConditionModel.forward, phase 1, after time_proj)
    temb = part.time_embedding(time_features)
    if part.add_embedding is not None:  # get_aug_embed, text_time: emb + MLP(text_embeds ++ time ids' sinusoid)
        temb = temb + part.add_embedding(torch.cat([pooled_text, add_time_features], dim=-1).to(temb.dtype))
    if part.time_embed_act is not None:
        temb = part.time_embed_act(temb)
    # 2. pre-process
    sample = part.conv_in(sample)
    # 3. down, level 0 only; its last residual is the downsampler output = r_in (the cut).
    block = part.down_block
    if _has_cross_attention(block):
        r_in, residuals = block(hidden_states=sample, temb=temb, encoder_hidden_states=encoder_hidden_states)
    else:
        r_in, residuals = block(hidden_states=sample, temb=temb)
    skips = (sample,) + tuple(residuals[:-1])
    return (temb, r_in) + skips


class HighResIn(nn.Module):
    """Inputs (sample, timestep, encoder_hidden_states[, pooled_text, time_ids]) -> (temb, r_in, skip_0 .. skip_k);
    pooled_text [B, d] and time_ids [B, 6] only for a UNet with SDXL's text_time conditioning."""

    def __init__(self, unet) -> None:
        super().__init__()
        # only the modules this part runs, so its parameters (export size, FLOP/param counts) are its own
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.time_embed_act = unet.time_embed_act
        self.add_time_proj = unet.add_time_proj if has_text_time(unet) else None
        self.add_embedding = unet.add_embedding if has_text_time(unet) else None
        self.conv_in = unet.conv_in
        self.down_block = unet.down_blocks[0]

    def add_time_features(self, time_ids: torch.Tensor) -> torch.Tensor:
        """[B, 6] size/crop ids -> [B, 6 * dim]: the sinusoid diffusers' get_aug_embed computes (host-side here)."""
        return self.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_text: torch.Tensor | None = None, time_ids: torch.Tensor | None = None):
        time_features = self.time_proj(timestep).to(dtype=sample.dtype)  # diffusers casts for half-precision UNets
        added = None if self.add_embedding is None else self.add_time_features(time_ids)
        return _high_res_in_body(self, sample, time_features, encoder_hidden_states, pooled_text, added)


class HighResInGraph(nn.Module):
    """high_res_in as exported: inputs (sample, time_features, encoder_hidden_states, pooled_text,
    add_time_features), where time_features is ``time_proj(timestep)`` and add_time_features the sinusoid of SDXL's
    time ids, both computed by the runtime (``time_features_spec``, ``add_time_features_spec``); without text_time
    conditioning the last two are unread and the exporter drops them. Shares the part's modules, under the same
    names, so exported tensor names and encodings are those of the UNet."""

    def __init__(self, part: HighResIn) -> None:
        super().__init__()
        self.time_embedding = part.time_embedding
        self.time_embed_act = part.time_embed_act
        self.add_embedding = part.add_embedding
        self.conv_in = part.conv_in
        self.down_block = part.down_block

    def forward(self, sample: torch.Tensor, time_features: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_text: torch.Tensor | None = None, add_time_features: torch.Tensor | None = None):
        return _high_res_in_body(self, sample, time_features, encoder_hidden_states, pooled_text, add_time_features)


class LowRes(nn.Module):
    """Inputs (r_in, temb, encoder_hidden_states) -> r_out: everything below the cut."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList(unet.down_blocks[1:])
        self.mid_block = unet.mid_block
        last = copy.copy(unet.up_blocks[-2])  # shallow: shares weights, own module table
        last._modules = dict(last._modules)
        last.upsamplers = None  # r_out is taken before the upsampler (PAPER.md "Split")
        self.up_blocks = nn.ModuleList(list(unet.up_blocks[:-2]) + [last])

    def forward(self, r_in: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        sample = r_in
        residuals = (r_in,)  # r_in is also the skip that up_blocks[-2] consumes
        # 3. down, levels 1..n
        for block in self.down_blocks:
            if _has_cross_attention(block):
                sample, res = block(hidden_states=sample, temb=temb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = block(hidden_states=sample, temb=temb)
            residuals += res
        # 4. mid
        if self.mid_block is not None:
            if _has_cross_attention(self.mid_block):
                sample = self.mid_block(sample, temb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample = self.mid_block(sample, temb)
        # 5. up, all but the last level; the final one stops before its upsampler -> r_out
        for block in self.up_blocks:
            n = len(block.resnets)
            res, residuals = residuals[-n:], residuals[:-n]
            if _has_cross_attention(block):
                sample = block(hidden_states=sample, temb=temb, res_hidden_states_tuple=res,
                               encoder_hidden_states=encoder_hidden_states)
            else:
                sample = block(hidden_states=sample, temb=temb, res_hidden_states_tuple=res)
        assert not residuals, "every low-res skip must be consumed inside low_res"
        return sample


class HighResOut(nn.Module):
    """Inputs (r_out, temb, encoder_hidden_states, skip_0 .. skip_k) -> noise prediction."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.upsamplers = unet.up_blocks[-2].upsamplers
        self.up_block = unet.up_blocks[-1]
        self.conv_norm_out = unet.conv_norm_out
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out

    def forward(self, r_out: torch.Tensor, temb: torch.Tensor, encoder_hidden_states: torch.Tensor, *skips):
        sample = r_out
        for upsampler in self.upsamplers:
            sample = upsampler(sample)
        # 5. up, last level
        if _has_cross_attention(self.up_block):
            sample = self.up_block(hidden_states=sample, temb=temb, res_hidden_states_tuple=tuple(skips),
                                   encoder_hidden_states=encoder_hidden_states)
        else:
            sample = self.up_block(hidden_states=sample, temb=temb, res_hidden_states_tuple=tuple(skips))
        # 6. post-process
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        return self.conv_out(sample)


@dataclass
class ClockworkSplit:
    """The three parts of one UNet, plus the names of the tensors that flow between them."""

    high_res_in: HighResIn
    low_res: LowRes
    high_res_out: HighResOut
    num_skips: int

    @property
    def skip_names(self) -> list[str]:
        return [f"skip_{i}" for i in range(self.num_skips)]

    def graph_modules(self) -> dict[str, nn.Module]:
        """The modules behind the exported graphs (high_res_in takes time features, see ``time_features_spec``)."""
        return {"high_res_in": HighResInGraph(self.high_res_in), "low_res": self.low_res,
                "high_res_out": self.high_res_out}

    def time_features(self, timestep: torch.Tensor) -> torch.Tensor:
        """high_res_in's graph input for ``timestep`` (torch; the runtime computes the same in numpy)."""
        return self.high_res_in.time_proj(timestep)

    @property
    def text_time(self) -> bool:
        """high_res_in takes SDXL's added conditioning (pooled text and time ids)."""
        return self.high_res_in.add_embedding is not None

    def add_time_features(self, time_ids: torch.Tensor) -> torch.Tensor:
        """high_res_in's ``add_time_features`` graph input for [B, 6] ``time_ids`` (SDXL; torch, as the runtime)."""
        return self.high_res_in.add_time_features(time_ids)

    def unet_forward(self, sample, timestep, encoder_hidden_states, pooled_text=None, time_ids=None) -> torch.Tensor:
        """Full step through the three parts; equals the UNet's output (tested)."""
        temb, r_in, *skips = self.high_res_in(sample, timestep, encoder_hidden_states, pooled_text, time_ids)
        r_out = self.low_res(r_in, temb, encoder_hidden_states)
        return self.high_res_out(r_out, temb, encoder_hidden_states, *skips)


def split_unet(unet) -> ClockworkSplit:
    """Cut ``unet`` (a diffusers UNet2DConditionModel) into its Clockwork parts, sharing its weights."""
    _check_splittable(unet)
    return ClockworkSplit(HighResIn(unet).eval(), LowRes(unet).eval(), HighResOut(unet).eval(),
                          num_skips=len(unet.up_blocks[-1].resnets))
