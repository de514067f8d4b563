"""README.md, the bundle's hand-off document: written by every build, listed in the manifest, complete (files, graph
I/O, schedule), and correct: its pseudo-code, executed as written, reproduces the runtime's trajectory."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from cw_export.cli import main
from cw_export.bundle.handoff import HANDOFF_NAME, SECTIONS, render_handoff
from cw_export.contract.manifest import read_manifest, verify_bundle


@pytest.fixture(scope="module")
def clock4_bundle(make_fp32_bundle, tmp_path_factory):
    """Same model, another schedule (6 steps, clock 4: full, clocked x3, full, clocked)."""
    return make_fp32_bundle(tmp_path_factory.mktemp("clock4") / "bundle", steps=6, clock=4)


def _doc(bundle) -> str:
    return (bundle / HANDOFF_NAME).read_text(encoding="utf-8")


def _section(doc: str, title: str) -> str:
    number = SECTIONS.index(title) + 1
    return doc.split(f"## {number}. {title}\n", 1)[1].split("\n## ", 1)[0]


def _step_rows(doc: str) -> list[tuple[int, str]]:
    """(i, kind) of every row of the step table."""
    return [(int(m.group(1)), m.group(2))
            for m in re.finditer(r"^\| (\d+) \| (full|clocked) \|", _section(doc, "Step table"), re.MULTILINE)]


def test_build_writes_readme_listed_with_sha256_and_reproducible(fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    assert HANDOFF_NAME in manifest["files"]
    assert verify_bundle(fp32_bundle, manifest) == []
    assert render_handoff(fp32_bundle, manifest) == _doc(fp32_bundle)  # a pure function of the bundle


def test_names_every_file_graph_and_io_tensor_with_shape(fp32_bundle):
    manifest = read_manifest(fp32_bundle)
    doc = _doc(fp32_bundle)
    files = _section(doc, "Files")
    for rel in [*manifest["files"], "manifest.json"]:
        assert f"| `{rel}` |" in files, rel
    graphs = _section(doc, "Graphs")
    for name, graph in manifest["graphs"].items():
        assert f"### `{name}` — `{graph['file']}`" in graphs
        block = graphs.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        for kind in ("inputs", "outputs"):
            for spec in graph[kind]:
                shape = f"{spec['dtype']} [{', '.join(map(str, spec['shape']))}]"
                assert f"| {kind[:-1]} | `{spec['name']}` | {shape} |" in block, (name, spec)


def test_step_kinds_and_loop_follow_the_manifest(fp32_bundle, clock4_bundle):
    for bundle in (fp32_bundle, clock4_bundle):
        manifest = read_manifest(bundle)
        doc = _doc(bundle)
        kinds = manifest["schedule"]["step_kinds"]
        assert _step_rows(doc) == list(enumerate(kinds))
        loop = _section(doc, "The denoising loop")
        for kind in set(kinds):
            steps = ", ".join(str(i) for i, k in enumerate(kinds) if k == kind)
            assert f"i = {steps}" in loop
            assert " -> ".join(f"`{g}`" for g in manifest["wiring"]["steps"][kind]) in loop
        for target in manifest["wiring"]["cache"]:
            assert f'cache["{target}"]' in loop
        table = manifest["sampler"]["step_table"]
        for i, t in enumerate(table["timesteps"]):
            assert f"| {i} | {kinds[i]} | " in doc and f"| {t} | {table['input_scale'][i]!r} |" in doc


def test_document_changes_with_the_schedule(fp32_bundle, clock4_bundle):
    first, second = _doc(fp32_bundle), _doc(clock4_bundle)
    assert _step_rows(first) != _step_rows(second)
    assert _section(first, "Step table") != _section(second, "Step table")
    assert _section(first, "The denoising loop") != _section(second, "The denoising loop")
    assert 'kind = ["full", "clocked", "clocked", "clocked", "full", "clocked"]' in second


def _run_pseudo_code(bundle, prompt: str, noise: np.ndarray,
                     negative_prompt: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Execute the README's loop as written, with each graph an onnxruntime session called by keyword."""
    import onnxruntime as ort

    from cw_export.runtime.tokenizer import ClipTokenizer

    manifest = read_manifest(bundle)
    code = _section(_doc(bundle), "The denoising loop").split("```python\n", 1)[1].split("```", 1)[0]

    def graph(name: str):
        spec = manifest["graphs"][name]
        session = ort.InferenceSession(str(bundle / spec["file"]), providers=["CPUExecutionProvider"])

        def call(**feeds):
            inputs = {s["name"]: np.asarray(feeds[s["name"]], dtype=s["dtype"]) for s in spec["inputs"]}
            outputs = session.run(None, inputs)
            return outputs[0] if len(outputs) == 1 else outputs
        return call

    tokenizer = ClipTokenizer.from_dir(bundle / manifest["tokenizer"]["folder"])
    namespace = {name: graph(name) for name in manifest["graphs"]}
    if "tokenizer_2" in manifest:  # SDXL
        namespace["tokenize_2"] = ClipTokenizer.from_dir(bundle / manifest["tokenizer_2"]["folder"])
    namespace.update(sampler=SimpleNamespace(step_table=SimpleNamespace(**manifest["sampler"]["step_table"])),
                     tokenize=tokenizer, concat=np.concatenate, exp=np.exp, log=np.log, arange=np.arange,
                     sin=np.sin, cos=np.cos, negative_prompt=negative_prompt, prompt=prompt, noise=noise)
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the document's own code, in a test
    return namespace["x"], namespace["image"]


@pytest.mark.parametrize("which", ["fp32", "clock4"])
def test_pseudo_code_as_written_reproduces_the_runtime(which, fp32_bundle, clock4_bundle):
    """The acceptance test of the document: an engineer who types in the loop gets the runtime's latents."""
    from cw_export.runtime.pipeline import BundleRunner

    bundle = fp32_bundle if which == "fp32" else clock4_bundle
    runner = BundleRunner(bundle)
    noise = np.random.default_rng(3).standard_normal(runner.latent_shape(), dtype=np.float32)
    hidden, pooled = runner.encode_prompt("a red triangle")
    expected = runner.generate(hidden, pooled, noise).latents
    latents, image = _run_pseudo_code(bundle, "a red triangle", noise)
    assert latents.shape == expected.shape
    scale = float(np.max(np.abs(expected)))
    assert float(np.max(np.abs(latents - expected))) <= 1e-4 * scale  # float32 vs the runtime's float64 update
    assert image.shape == tuple(read_manifest(bundle)["graphs"]["vae_decoder"]["outputs"][0]["shape"])


@pytest.mark.parametrize("negative_prompt", ["", "a blue square"])
def test_pseudo_code_of_an_sdxl_bundle_reproduces_the_runtime(negative_prompt, sdxl_fp32_bundle):
    """Two tokenizers, the empty negative prompt as zeros, the added time features: as written, the runtime's."""
    from cw_export.runtime.pipeline import BundleRunner

    runner = BundleRunner(sdxl_fp32_bundle)
    noise = np.random.default_rng(5).standard_normal(runner.latent_shape(), dtype=np.float32)
    hidden, pooled = runner.encode_prompt("a red triangle", negative_prompt)
    expected = runner.generate(hidden, pooled, noise).latents
    code = _section(_doc(sdxl_fp32_bundle), "The denoising loop")
    assert "tokenize_2(" in code and "add_time_features =" in code and "pooled_text[0] = 0" in code
    latents, _ = _run_pseudo_code(sdxl_fp32_bundle, "a red triangle", noise, negative_prompt=negative_prompt)
    assert float(np.max(np.abs(latents - expected))) <= 1e-4 * float(np.max(np.abs(expected)))


def test_pseudo_code_with_a_negative_prompt_reproduces_the_runtime(fp32_bundle):
    from cw_export.runtime.pipeline import BundleRunner

    runner = BundleRunner(fp32_bundle)
    noise = np.random.default_rng(4).standard_normal(runner.latent_shape(), dtype=np.float32)
    hidden, pooled = runner.encode_prompt("a red triangle", "a blue square")
    expected = runner.generate(hidden, pooled, noise).latents
    latents, _ = _run_pseudo_code(fp32_bundle, "a red triangle", noise, negative_prompt="a blue square")
    assert float(np.max(np.abs(latents - expected))) <= 1e-4 * float(np.max(np.abs(expected)))
    plain, _ = _run_pseudo_code(fp32_bundle, "a red triangle", noise)
    assert float(np.max(np.abs(plain - expected))) > 1e-3 * float(np.max(np.abs(expected)))


def test_fp32_bundle_says_it_has_no_npu_graphs_and_gives_export_parity(fp32_bundle):
    doc = _doc(fp32_bundle)
    assert "This bundle is FP32" in _section(doc, "Running on the Snapdragon NPU")
    parity = _section(doc, "Measured parity")
    for name in read_manifest(fp32_bundle)["graphs"]:
        assert f"| `{name}` |" in parity


def test_report_command_regenerates_a_stale_readme(fp32_bundle, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, bundle)
    (bundle / HANDOFF_NAME).write_text("stale", encoding="utf-8")
    assert verify_bundle(bundle, read_manifest(bundle)) != []
    assert main(["report", str(bundle)]) == 0
    assert "hand-off written" in capsys.readouterr().out
    assert _doc(bundle) == _doc(fp32_bundle)
    assert verify_bundle(bundle, read_manifest(bundle)) == []
    assert main(["report", str(bundle)]) == 0
    assert "hand-off unchanged" in capsys.readouterr().out


def test_loop_section_states_text_noise_precision_image_and_cache_rules(fp32_bundle):
    doc = _doc(fp32_bundle)
    loop = " ".join(_section(doc, "The denoising loop").split())
    for sentence in (
        "`cw-export run --negative-prompt TEXT`",
        "the ids are cut to 77 - 2 = 75, then `[BOS] + ids + [EOS]`",
        "Truncation keeps EOS",
        "`</w>` appended to the last symbol",
        "numpy.random.default_rng(N).standard_normal([1, 4, 16, 16], dtype=numpy.float32)",
        "`x0_prev` (the previous step's `x0`) is kept in float64 (never rounded)",
        "Guidance: float32",
        "`cache` is refreshed after *every* step, clocked ones included",
        "ignored by this identity-adaptor bundle",
        "`uint8(clip(floor(image * 255 + 0.5), 0, 255))`",
    ):
        assert sentence in loop, sentence
    assert "Do not quantize inputs or dequantize outputs by hand" in _section(doc, "Graphs")
    assert "from the previous full step" not in doc
