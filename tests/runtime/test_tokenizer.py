"""Tests for cw_export.runtime.tokenizer: identical input_ids to transformers' CLIPTokenizer, and a light import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

from transformers import CLIPTokenizer  # noqa: E402

from cw_export.models.tokenizer_files import builtin_corpus, train_clip_bpe, write_clip_tokenizer  # noqa: E402
from cw_export.runtime import tokenizer as rt  # noqa: E402
from cw_export.runtime.tokenizer import ClipTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MAX_LEN = 77

EDGE_CASES = [
    "",
    " ",
    "   \t \n  ",
    "a red circle on the left",
    "A RED CIRCLE ON THE LEFT",
    "MiXeD CaSe Words",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "unit\x1fseparators\x1cstay\x1dwords\x1e",  # not whitespace for the backend, unlike str.isspace()
    "nbsp\xa0ideographic\u3000space\u2009thin\u200bzero-width\u2028line",
    "!!! ??? ... ,,, --- !?!? ***",
    "a.b,c;d:e!f?g (h) [i] {j} <k> \"l\" `m` ~n @o #p $q %r ^s &t *u _v +w =x |y \\z /",
    "0123456789 3.14159 1,000,000 2024-01-01 42nd 7x7",
    "it's don't they're we've i'm you'll he'd",
    "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "'s 't ''s '''t 'sx 're's",
    "dog's cat's the 90's",
    "café naïve résumé ñandú über crème brûlée",
    "cafe\u0301 n\u0303 decomposed accents",
    "İstanbul ΟΔΟΣ Σ ß ǅ ﬁ ﬂ Å",
    "東京の夜景、桜の木 한국어 中文字符",
    "Москва красная площадь",
    "مرحبا עברית हिन्दी ภาษาไทย",
    "🐱🐶🦊 emoji 👩‍👩‍👧 flags 🇫🇷 skin 👍🏽 ❤️",
    "½ ² Ⅷ ٣ ⅔ ①",
    "xylophone quixotic zzzz qwxj bzzkt",
    "<|endoftext|>",
    "<|startoftext|>",
    "a photo<|endoftext|>of a cat",
    "<|startoftext|>a dog<|endoftext|><|endoftext|>",
    "<|ENDOFTEXT|> <|StartOfText|>",
    "!<|endoftext|>? <|endoftext <|endoftext|",
    "<|endoftext|>\u0338",
    "word " * 100,
    "a very long prompt, " * 30,
    " ".join(str(i) for i in range(200)),
    "\u0000 null \u0001 control \u007f del",
]


def _calibration_lines() -> list[str]:
    """Every line of calibration/*.txt (comments included: they are text too), if the files exist."""
    lines: list[str] = []
    for path in sorted((REPO / "calibration").glob("*.txt")):
        lines.extend(path.read_text(encoding="utf-8").splitlines())
    return lines


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(out, *train_clip_bpe(builtin_corpus()))
    return out


@pytest.fixture(scope="module")
def reference(tok_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path) -> ClipTokenizer:
    return ClipTokenizer.from_dir(tok_dir)


def _reference_ids(reference: CLIPTokenizer, texts: list[str]) -> np.ndarray:
    """input_ids exactly as diffusers' StableDiffusionPipeline asks for them."""
    out = reference(texts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="np")
    return out.input_ids.astype(np.int64)


def _mismatches(reference: CLIPTokenizer, tokenizer: ClipTokenizer, texts: list[str]) -> list[str]:
    ref = _reference_ids(reference, texts)
    got = tokenizer(texts)
    rows = zip(texts, ref, got)
    return [f"{t!r:.80}: expected {r.tolist()} got {g.tolist()}" for t, r, g in rows if not np.array_equal(r, g)]


@pytest.mark.parametrize("text", EDGE_CASES, ids=lambda t: repr(t)[:40])
def test_edge_case_matches_transformers(reference, tokenizer, text: str) -> None:
    assert _mismatches(reference, tokenizer, [text]) == []


def test_calibration_prompts_match_transformers(reference, tokenizer) -> None:
    lines = _calibration_lines()
    if not lines:
        pytest.skip("no calibration/*.txt in this checkout")
    bad = _mismatches(reference, tokenizer, lines)
    assert not bad, f"{len(bad)} of {len(lines)} lines differ:\n" + "\n".join(bad[:20])


def test_every_character_class_matches_transformers(reference, tokenizer) -> None:
    """Every BMP code point, the Unicode 15-16 additions and a stride through the other planes, in several contexts."""
    cps = [c for c in range(0x10000) if not 0xD800 <= c < 0xE000]
    extra = {c for lo, hi in rt._EXTRA_LETTERS + rt._EXTRA_NUMBERS for c in range(lo, hi + 1)} | set(rt._EXTRA_LOWER)
    cps += sorted(c for c in extra if c >= 0x10000) + list(range(0x10000, 0x110000, 97))
    contexts = [f"x{chr(c)}{chr(c)}7{chr(c)}'s {chr(c)}Q" for c in cps]  # 10 characters per code point
    texts = ["".join(contexts[k : k + 64]) for k in range(0, len(contexts), 64)]
    ref = reference(texts, add_special_tokens=False).input_ids
    bad = [" ".join(f"{ord(ch):04X}" for ch in t[1::10]) for t, r in zip(texts, ref) if tokenizer.tokenize_ids(t) != r]
    assert not bad, f"{len(bad)} chunks differ; code points of the first: {bad[0]}"


def test_batch_shape_dtype_and_padding(tokenizer: ClipTokenizer, reference) -> None:
    ids = tokenizer(["a red circle", ""])
    assert ids.shape == (2, MAX_LEN) and ids.dtype == np.int64
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == reference.pad_token_id
    assert tokenizer.bos_token_id == reference.bos_token_id
    content = tokenizer.tokenize_ids("a red circle")
    assert ids[0, :5].tolist() == [tokenizer.bos_token_id, *content, tokenizer.eos_token_id]
    assert (ids[0, 5:] == tokenizer.pad_token_id).all()
    assert ids[1, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]


def test_truncation_keeps_bos_first_75_and_eos(tokenizer: ClipTokenizer) -> None:
    text = " ".join(f"{i % 10}" for i in range(100))  # one token per digit
    full = tokenizer.encode(text)
    assert len(full) == 102
    row = tokenizer([text])[0].tolist()
    assert row == full[:76] + [tokenizer.eos_token_id]


def test_encode_adds_bos_and_eos(tokenizer: ClipTokenizer, reference) -> None:
    text = "a watercolor fox, top-left"
    assert tokenizer.encode(text) == reference(text).input_ids


def test_from_dir_reads_config(tok_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tok_dir / name).read_bytes())
    # SD 1.5 style: special tokens as AddedToken dicts and a shorter max length.
    token = {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False, "normalized": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": token, "model_max_length": 16}))
    tok = ClipTokenizer.from_dir(tmp_path)
    assert tok.model_max_length == 16
    assert tok(["a cat"]).shape == (1, 16)
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert tok.bos_token_id == vocab["<|startoftext|>"] and tok.pad_token_id == vocab["<|endoftext|>"]


def test_import_loads_no_heavy_library() -> None:
    code = (
        "import sys, cw_export.runtime.tokenizer\n"
        "print(sorted(m for m in ('transformers', 'tokenizers', 'torch', 'regex', 'ftfy') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
