"""The trained adaptor in a bundle: exported as graph 'adaptor', run by the runtime on clocked steps, equal to the
torch reference clocked trajectory through split + the same adaptor; and build-time distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cw_export.adaptor import build_adaptor
from cw_export.build import BuildOptions, build_bundle
from cw_export.distill.checkpoint import read_checkpoint
from cw_export.recipe import load_recipe
from cw_export.reference import text_embeddings, torch_split_trajectory
from cw_export.runtime.pipeline import BundleRunner


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def learned_bundle(trained_checkpoint, tmp_path_factory):
    recipe = load_recipe("cpu-fp32").with_build(adaptor="learned")
    out = tmp_path_factory.mktemp("learned") / "bundle"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_bundle(recipe, BuildOptions(model="tiny-random", out=out, adaptor_checkpoint=trained_checkpoint,
                                                 progress=False))
    finally:
        torch.set_num_threads(before)


def test_adaptor_graph_is_wired_to_clocked_steps(learned_bundle, trained_checkpoint):
    manifest = BundleRunner(learned_bundle).manifest
    graph = manifest["graphs"]["adaptor"]
    assert [i["name"] for i in graph["inputs"]] == ["r_in", "r_out_prev", "temb", "pooled_text"]
    assert manifest["wiring"]["steps"]["clocked"] == ["high_res_in", "adaptor", "high_res_out"]
    assert "adaptor" not in manifest["wiring"]["steps"]["full"]
    checkpoint = read_checkpoint(trained_checkpoint)
    assert manifest["adaptor"]["kind"] == "learned"
    assert manifest["adaptor"]["checkpoint_sha256"] == checkpoint.sha256
    assert manifest["adaptor"]["training"]["steps"] == manifest["schedule"]["steps"]


def test_runtime_matches_torch_split_reference_with_the_same_adaptor(tiny_model, learned_bundle, trained_checkpoint):
    checkpoint = read_checkpoint(trained_checkpoint)
    adaptor = build_adaptor(checkpoint.config, checkpoint.state_dict)
    hidden, pooled = text_embeddings(tiny_model, "a large blue triangle at the bottom right")
    runner = BundleRunner(learned_bundle)
    noise = np.random.default_rng(21).standard_normal(runner.latent_shape(), dtype=np.float32)
    ran = []
    original = runner.run_graph
    runner.run_graph = lambda graph, slots: (ran.append(graph), original(graph, slots))
    ours = runner.generate(hidden.numpy(), pooled.numpy(), noise)
    assert ran.count("adaptor") == 4 and ran.count("low_res") == 4  # 8 steps, clock 2
    ref = torch_split_trajectory(tiny_model, hidden, pooled, torch.from_numpy(noise), 8, clock=2, adaptor=adaptor)
    for i, (a, b) in enumerate(zip(ours.step_latents, ref.step_latents)):
        assert _rel(a, b) <= 1e-4, f"step {i}"
    identity = torch_split_trajectory(tiny_model, hidden, pooled, torch.from_numpy(noise), 8, clock=2)
    assert _rel(ours.latents, identity.latents) > 1e-3, "the trained adaptor must differ from the identity"


def test_build_without_checkpoint_distils_with_the_recipe_settings(tiny_model, tmp_path, monkeypatch):
    """--adaptor learned without --adaptor-checkpoint: distillation runs as a build stage, cached by settings."""
    import cw_export.build as build
    import cw_export.distill.train as train

    monkeypatch.setenv("CW_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train, "BUILD_DEFAULTS", train.DistillOptions(num_prompts=2, epochs=1, progress=False))
    monkeypatch.setattr(build, "load_model", lambda spec: tiny_model)
    exported = []

    class Stop(Exception):
        pass

    def fake_export_all(model, recipe, graphs_dir, latent, table, adaptor_state, progress):
        exported.append(adaptor_state)
        raise Stop

    monkeypatch.setattr(build, "export_all", fake_export_all)
    recipe = load_recipe("cpu-fp32").with_build(adaptor="learned", steps=4, clock=2, guidance_scale=5.0)
    for _ in range(2):
        with pytest.raises(Stop):
            build_bundle(recipe, BuildOptions(model="tiny-random", out=tmp_path / "bundle", progress=False))
        monkeypatch.setattr(train, "distill", lambda *a, **k: pytest.fail("the second build must reuse the cache"))
    (checkpoint_file,) = (tmp_path / "cache" / "adaptors").glob("*.safetensors")
    checkpoint = read_checkpoint(checkpoint_file)
    t = checkpoint.training
    assert (t["steps"], t["clock"], t["guidance_scale"], t["sampler"]) == (4, 2, 5.0, "dpmpp_2m")
    assert (t["num_prompts"], t["epochs"], t["model_sha256"]) == (2, 1, tiny_model.source["sha256"])
    for state in exported:
        assert all(torch.equal(state[k], v) for k, v in checkpoint.state_dict.items())
    assert not (tmp_path / "bundle").exists()
