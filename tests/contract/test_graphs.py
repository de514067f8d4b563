"""The graph registry (cw_export.contract.graphs) is the one source of the bundle's graphs and wiring."""

from __future__ import annotations

from cw_export.contract.graphs import (ADAPTOR, CLOCKED, FULL, GRAPHS, IMAGE_GRAPHS, LOOP_GRAPHS, PER_IMAGE, PER_STEP,
                                       graph_names, make_wiring)
from cw_export.contract.manifest import read_manifest


def test_registry_splits_graphs_by_when_they_run():
    assert LOOP_GRAPHS == ("high_res_in", "low_res", "adaptor", "high_res_out")
    assert IMAGE_GRAPHS == ("text_encoder", "vae_decoder")
    assert all(GRAPHS[n].runs == PER_STEP and GRAPHS[n].step_kinds for n in LOOP_GRAPHS)
    assert all(GRAPHS[n].runs == PER_IMAGE and not GRAPHS[n].step_kinds for n in IMAGE_GRAPHS)
    assert graph_names("identity") == [n for n in GRAPHS if n != ADAPTOR]
    assert graph_names("learned") == list(GRAPHS)


def test_wiring_follows_the_registry():
    identity, learned = make_wiring(3, "identity"), make_wiring(3, "learned")
    assert identity["steps"] == {FULL: ["high_res_in", "low_res", "high_res_out"],
                                 CLOCKED: ["high_res_in", "high_res_out"]}
    assert learned["steps"][CLOCKED] == ["high_res_in", "adaptor", "high_res_out"]
    assert identity["clocked_aliases"] == {"r_out": "r_out_prev"} and learned["clocked_aliases"] == {}
    skips = ["skip_0", "skip_1", "skip_2"]
    assert list(identity["graphs"]["high_res_in"]["outputs"]) == ["temb", "r_in", *skips]
    assert list(identity["graphs"]["high_res_out"]["inputs"]) == ["r_out", "temb", "encoder_hidden_states", *skips]
    assert ADAPTOR not in identity["graphs"] and ADAPTOR in learned["graphs"]
    # every slot a step reads is a step input, the cache, an alias, or written earlier in that step
    for wiring in (identity, learned):
        for kind, order in wiring["steps"].items():
            available = set(wiring["step_inputs"]) | (set(wiring["cache"]) | set(wiring["clocked_aliases"])
                                                      if kind == CLOCKED else set())
            for graph in order:
                assert set(wiring["graphs"][graph]["inputs"].values()) <= available, (kind, graph)
                available |= set(wiring["graphs"][graph]["outputs"].values())
            assert wiring["step_output"] in available


def test_a_built_bundle_has_exactly_the_registry_graphs(fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    assert sorted(manifest["graphs"]) == sorted(graph_names(manifest["adaptor"]["kind"]))
    num_skips = sum(o["name"].startswith("skip_") for o in manifest["graphs"]["high_res_in"]["outputs"])
    for name, entry in manifest["graphs"].items():
        assert [o["name"] for o in entry["outputs"]] == GRAPHS[name].output_names(num_skips), name
        kept = [i["name"] for i in entry["inputs"]]  # the exporter may drop an unused input, never add one
        registry = GRAPHS[name].input_names(num_skips)
        assert kept == [n for n in registry if n in kept], name
