"""What the learned adaptor costs next to the UNet it shortcuts: parameters and MACs, batch 1.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` through ``cw_export.bundle.flops.count_module`` (the
project's one counting convention: convolutions, linear layers and attention matmuls; norms and activations are not
counted),
on the meta device, so SD 1.5's 860M-parameter UNet costs shapes only, no weights. MACs = FLOPs / 2.
PAPER.md "Adaptor": ~14M params and ~1% of a step's FLOPs for the paper's ResNet adaptor.
"""

from __future__ import annotations

ARCHITECTURES = {  # name -> (UNet config, text encoder config) in cw_export.models.configs
    "sd15": ("SD15_UNET", "SD15_TEXT_ENCODER"),
    "tiny-random": ("TINY_UNET", "TINY_TEXT_ENCODER"),
}


def adaptor_cost(architecture: str = "sd15", latent_hw: tuple[int, int] | None = None) -> dict:
    """Params and MACs of the UNet and of the default learned adaptor for a published architecture (batch 1)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..adaptor import LearnedAdaptor, default_adaptor_config
    from ..bundle.flops import count_module
    from ..models import configs
    from ..split import split_unet

    unet_name, text_name = ARCHITECTURES[architecture]
    unet_config, text_config = getattr(configs, unet_name), getattr(configs, text_name)
    hw = tuple(latent_hw or (unet_config["sample_size"],) * 2)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        config = default_adaptor_config(unet, text_config["hidden_size"])
        adaptor = LearnedAdaptor(config)
        sample = torch.zeros((1, unet_config["in_channels"], *hw))
        timestep = torch.full((1,), 999.0)
        text = torch.zeros((1, text_config["max_position_embeddings"], unet_config["cross_attention_dim"]))
        pooled = torch.zeros((1, text_config["hidden_size"]))
    unet_cost, _ = count_module(unet, (sample, timestep, text))
    split = split_unet(unet)
    with torch.no_grad():
        temb, r_in, *_ = split.high_res_in(sample, timestep, text)
        r_out = split.low_res(r_in, temb, text)
    adaptor_cost_, _ = count_module(adaptor, (r_in, r_out, temb, pooled))
    low_res_cost, _ = count_module(split.low_res, (r_in, temb, text))

    def entry(cost) -> dict:
        return {"params": cost.params, "macs": cost.flops // 2}

    result = {"architecture": architecture, "latent_hw": list(hw), "adaptor_config": config.to_dict(),
              "unet": entry(unet_cost), "low_res": entry(low_res_cost), "adaptor": entry(adaptor_cost_),
              "convention": "batch 1; MACs of convolutions, linear layers and attention matmuls "
                            "(FlopCounterMode FLOPs / 2); the adaptor's params are all of its own"}
    result["adaptor_macs_pct_of_unet"] = round(100.0 * result["adaptor"]["macs"] / result["unet"]["macs"], 3)
    result["adaptor_params_pct_of_unet"] = round(100.0 * result["adaptor"]["params"] / result["unet"]["params"], 3)
    return result
