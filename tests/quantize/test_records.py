"""The manifest's typed records have one reader and one JSON form: reading a built bundle's manifest and writing
its records back gives the same JSON, for FP32, quantized and parity records alike (gate-fallback records:
test_gate.test_a8_choice_that_fails_the_gate_falls_back_to_a16)."""

from __future__ import annotations

import pytest

from cw_export.contract.manifest import load_manifest
from cw_export.contract.schema import parse_manifest
from cw_export.errors import BundleError


def _round_trip(bundle) -> None:
    typed = load_manifest(bundle)
    raw = typed.raw
    assert {name: entry.to_dict() for name, entry in typed.graphs.items()} == raw["graphs"]
    assert (typed.parity.to_dict() if typed.parity else None) == raw.get("parity")


def test_fp32_bundle_records_round_trip(fp32_bundle):
    _round_trip(fp32_bundle)
    assert load_manifest(fp32_bundle).parity is None


def test_quantized_bundle_records_round_trip(low_parity_bundle):
    _round_trip(low_parity_bundle)
    typed = load_manifest(low_parity_bundle)
    assert typed.parity.gate["allowed_by_flag"] and not typed.parity.passed
    assert {e.quantization.backend for e in typed.graphs.values()} >= {"ort"}
    assert typed.schedule.steps == typed.raw["schedule"]["steps"]
    assert typed.schedule.sampler == typed.raw["sampler"]["name"]


@pytest.mark.parametrize("parity, message", [
    ({"prompt_set": "x"}, "manifest parity.prompts_sha256: missing"),
    ({"prompt_set": "x", "prompts_sha256": "y", "session_options": {}, "thresholds": {}, "gate": {"passed": "yes"},
      "graphs": {}}, "manifest parity.gate.passed: must be true or false"),
])
def test_reader_names_a_bad_parity_field(low_parity_bundle, parity, message):
    raw = dict(load_manifest(low_parity_bundle).raw, parity=parity)
    with pytest.raises(BundleError, match=message.replace(".", r"\.")):
        parse_manifest(raw)
