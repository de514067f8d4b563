"""The parity gate's MAC back-off (cw_export.parity.stage): a MAC mix that fails the gate keeps the longest
prefix of its sweep's order that holds, instead of falling back to 16 bits whole."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from cw_export.errors import RecipeError
from cw_export.parity import stage
from cw_export.quantize.fallback import A16Fallback
from cw_export.recipe import ParitySection, load_recipe


def numbers(guidance_ratio: float) -> dict:
    return {"graphs": {"low_res": {"sqnr_db": 40.0}}, "final_latent_psnr_db": 40.0,
            "steps": [{"step": 0, "kind": "full", "latent_psnr_db": 40.0, "guidance_ratio": guidance_ratio}]}


@pytest.mark.parametrize("macs,holds_up_to", [(12, 5), (12, 11), (7, 1), (2, 1)])
def test_bisection_keeps_the_longest_prefix_that_holds(monkeypatch, macs, holds_up_to):
    """A synthetic bundle whose guidance ratio grows with the number of 8-bit MACs: the back-off must leave
    exactly the longest holding prefix in the bundle, in about log2(n) measurements."""
    in_bundle = {}

    def fake_back_off(entries, bundle, name, held, keep, found):
        in_bundle["keep"] = keep
        return {}

    monkeypatch.setattr(stage, "back_off_mac_mix", fake_back_off)
    aim = ParitySection(guidance_ratio_tolerance=0.02)
    step = 0.02 / (holds_up_to + 0.5)  # keep <= holds_up_to holds, one more does not
    calls = []

    def measure():
        calls.append(in_bundle["keep"])
        return SimpleNamespace(measured=numbers(1.0 + step * in_bundle["keep"]))

    held = A16Fallback(file=None, encodings=[], details={}, macs=[f"mac{i}" for i in range(macs)])
    kept, parity = stage._longest_holding_mix("low_res", held, ["failed"], SimpleNamespace(graphs={}), None, aim,
                                              measure)
    assert kept == holds_up_to == in_bundle["keep"]
    assert parity.measured["steps"][0]["guidance_ratio"] == pytest.approx(1.0 + step * holds_up_to)
    assert len(calls) <= math.ceil(math.log2(macs)) + 1


def test_bisection_reports_nothing_when_no_prefix_holds(monkeypatch):
    monkeypatch.setattr(stage, "back_off_mac_mix", lambda *args: {})
    held = A16Fallback(file=None, encodings=[], details={}, macs=["a", "b", "c", "d"])
    failing = lambda: SimpleNamespace(measured=numbers(1.5))  # noqa: E731
    assert stage._longest_holding_mix("low_res", held, [], SimpleNamespace(graphs={}), None,
                                      ParitySection(guidance_ratio_tolerance=0.05), failing) == (0, None)


def test_backoff_aims_at_the_tighter_of_the_two_tolerances():
    recipe = load_recipe("snapdragon-int8")
    assert stage.backoff_thresholds(recipe).guidance_ratio_tolerance == 0.03  # the recipe's aim, under the gate's 5%
    assert recipe.parity.guidance_ratio_tolerance == 0.05
    off = recipe.with_quantization(a8_gate_guidance_tolerance=0.0)
    assert stage.backoff_thresholds(off) == recipe.parity  # 0: the gate's own
    tight = recipe.with_quantization(a8_gate_guidance_tolerance=0.02)
    assert stage.backoff_thresholds(tight).guidance_ratio_tolerance == 0.02
    assert stage.backoff_thresholds(tight).final_latent_min_psnr_db == recipe.parity.final_latent_min_psnr_db
    wider = recipe.with_quantization(a8_gate_guidance_tolerance=0.2)
    assert stage.backoff_thresholds(wider) == recipe.parity  # never looser than the gate


def test_recipe_refuses_a_bad_backoff_tolerance():
    from cw_export.quantize import check_settings

    with pytest.raises(RecipeError, match="a8_mac_order"):
        check_settings(load_recipe("snapdragon-int8").quantization.__class__(backend="ort", a8_mac_order="size"))
    for bad in (-0.01, 1.0, True, "0.02"):
        with pytest.raises(RecipeError, match="a8_gate_guidance_tolerance"):
            check_settings(load_recipe("snapdragon-int8").quantization.__class__(
                backend="ort", a8_gate_guidance_tolerance=bad))
