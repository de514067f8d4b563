"""Tests for cw_export.models.tokenizer_files: CLIP file layout, deterministic + standard BPE, offline loading."""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections import Counter
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

from transformers import CLIPTokenizer, CLIPTokenizerFast  # noqa: E402

from cw_export.models.tokenizer_files import (  # noqa: E402
    BOS_TOKEN,
    DEFAULT_VOCAB_SIZE,
    END_OF_WORD,
    EOS_TOKEN,
    builtin_corpus,
    bytes_to_unicode,
    train_clip_bpe,
    write_clip_tokenizer,
)

FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return train_clip_bpe(builtin_corpus())


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, trained) -> Path:
    out = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(out, *trained)
    return out


def _naive_bpe(corpus: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Textbook BPE: recount every pair each step, take the most frequent, ties to the smallest pair."""
    enc = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus:
        for w in line.lower().split():
            sym = [enc[b] for b in w.encode("utf-8")]
            sym[-1] += END_OF_WORD
            words[tuple(sym)] += 1
    merges = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged
    return merges


def test_builtin_corpus_covers_prompt_vocabulary() -> None:
    words = set(" ".join(builtin_corpus()).lower().replace(".", " ").replace(",", " ").split())
    required = {"left", "right", "top", "bottom", "center", "red", "blue", "circle", "square", "triangle", "small",
                "large", "forest", "city", "watercolor", "painting", "photo", "cat", "dog"}
    assert required <= words, sorted(required - words)
    assert len(words) >= 300


def test_vocab_layout_matches_clip(trained) -> None:
    vocab, merges = trained
    base = list(bytes_to_unicode().values())
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert sorted(vocab.values()) == list(range(len(vocab)))  # dense ids
    assert tokens[:256] == base
    assert tokens[256:512] == [b + END_OF_WORD for b in base]
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]
    assert len(vocab) == DEFAULT_VOCAB_SIZE
    assert tokens[512:-2] == [a + b for a, b in merges]
    for a, b in merges:
        assert a in vocab and b in vocab and a + b in vocab


def test_training_is_deterministic_and_order_independent(tmp_path: Path) -> None:
    corpus = builtin_corpus()
    shuffled = corpus[:]
    random.Random(0).shuffle(shuffled)
    for name, lines in (("a", corpus), ("b", corpus), ("c", shuffled)):
        write_clip_tokenizer(tmp_path / name, *train_clip_bpe(lines))
    for f in FILES:
        ref = (tmp_path / "a" / f).read_bytes()
        assert (tmp_path / "b" / f).read_bytes() == ref, f
        assert (tmp_path / "c" / f).read_bytes() == ref, f


def test_training_is_fast() -> None:
    start = time.perf_counter()
    train_clip_bpe(builtin_corpus())
    assert time.perf_counter() - start < 2.0


def test_merges_equal_textbook_bpe() -> None:
    # Letters only, so whitespace splitting and CLIP's pattern give the same words.
    corpus = [re.sub(r"[^a-z]+", " ", line.lower()) for line in builtin_corpus()]
    n = 600
    _, merges = train_clip_bpe(corpus, vocab_size=514 + n)
    assert merges == _naive_bpe(corpus, n)


def test_ties_go_to_the_lexicographically_smallest_pair() -> None:
    one = 514 + 1
    assert train_clip_bpe(["cd ab"], vocab_size=one)[1] == [("a", "b</w>")]
    assert train_clip_bpe(["ab cd"], vocab_size=one)[1] == [("a", "b</w>")]
    assert train_clip_bpe(["cd cd ab"], vocab_size=one)[1] == [("c", "d</w>")]  # frequency before order


def test_pretokenisation_is_clips() -> None:
    # CLIP's pattern keeps "'s" as its own word and splits digits one by one; case and whitespace are folded.
    _, merges = train_clip_bpe(["It's  12 DOGS"], vocab_size=10_000)
    tokens = {a + b for a, b in merges}
    assert {"it</w>", "'s</w>", "dogs</w>"} <= tokens
    assert not any(t.startswith("1") or t.startswith("2") for t in tokens)


def test_vocab_size_below_fixed_entries_is_rejected() -> None:
    with pytest.raises(ValueError, match="513"):
        train_clip_bpe(["a"], vocab_size=513)


def test_written_files_format(tok_dir: Path, trained) -> None:
    vocab, merges = trained
    assert sorted(p.name for p in tok_dir.iterdir()) == sorted(FILES)  # no temp files left behind
    assert json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8")) == vocab
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert lines[1:] == [f"{a} {b}" for a, b in merges]
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == EOS_TOKEN


@pytest.mark.parametrize("cls", [CLIPTokenizer, CLIPTokenizerFast])
def test_transformers_loads_offline(tok_dir: Path, trained, cls) -> None:
    vocab, _ = trained
    tok = cls.from_pretrained(str(tok_dir), local_files_only=True)
    assert tok.bos_token_id == vocab[BOS_TOKEN]
    assert tok.eos_token_id == tok.pad_token_id == vocab[EOS_TOKEN]  # SD 1.5 pads with <|endoftext|>
    assert tok.model_max_length == 77
    assert tok.tokenize("A red  circle, top-left.") == ["a</w>", "red</w>", "circle</w>", ",</w>", "top</w>",
                                                         "-</w>", "left</w>", ".</w>"]
    ids = tok(["a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert ids[:4] == [vocab[BOS_TOKEN], vocab["a</w>"], vocab["cat</w>"], vocab[EOS_TOKEN]]
    assert len(ids) == 77 and set(ids[3:]) == {vocab[EOS_TOKEN]}
