"""The adaptor's cost: at most 5% of SD 1.5's UNet MACs (PAPER.md: ~1%), counted on the meta device."""

from __future__ import annotations

from cw_export.distill.cost import adaptor_cost


def test_sd15_adaptor_costs_at_most_5_percent_of_the_unet():
    cost = adaptor_cost("sd15")
    assert cost["latent_hw"] == [64, 64]
    assert cost["adaptor_config"]["r_in_channels"] == 320 and cost["adaptor_config"]["r_out_channels"] == 640
    assert 800e6 < cost["unet"]["params"] < 900e6  # 859.5M (PAPER.md)
    assert 380e9 < cost["unet"]["macs"] < 420e9  # 803 GFLOPs with attention, batch 1 (PAPER.md)
    assert cost["adaptor"]["params"] < 20e6  # the paper's ResNet adaptor: ~14M
    assert cost["adaptor_macs_pct_of_unet"] <= 5.0
    assert cost["adaptor"]["macs"] < cost["low_res"]["macs"] / 20
