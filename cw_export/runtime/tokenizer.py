"""CLIP BPE tokenizer in pure Python + numpy, so a bundle encodes prompts where transformers is not installed.

It reproduces ``transformers.CLIPTokenizer`` (transformers 5: a ``tokenizers``-backed class; no ftfy, no
BasicTokenizer) called as diffusers' StableDiffusionPipeline calls it:
``tokenizer(texts, padding="max_length", max_length=77, truncation=True)``. The stages, in the backend's order:

1. special tokens (``<|startoftext|>``, ``<|endoftext|>``) are cut out of the raw text first, case-sensitively;
2. each remaining segment is normalised: NFC, every run of whitespace -> one space, per-character lowercase
   (``char::to_lowercase``: no final-sigma rule, unlike ``str.lower``);
3. CLIP's pattern ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   keeps its matches, then the ByteLevel pre-tokeniser re-splits each with GPT-2's pattern (this only changes
   special-token look-alikes such as ``<|ENDOFTEXT|>`` -> ``<|``, ``endoftext``, ``|>``);
4. each piece -> UTF-8 bytes -> ``bytes_to_unicode`` symbols, ``</w>`` on the last, merged by BPE rank exactly as
   ``tokenizers``' ``Word::merge_all`` does (lowest rank first, then leftmost);
5. ``[BOS] + ids[:max_length - 2] + [EOS]``, right-padded with the pad token.

Character classes: ``tokenizers`` uses Oniguruma and Rust's std tables (Unicode 16); Python 3.11's ``unicodedata`` is
Unicode 14. The tables below add the letters, numbers and lowercase mappings assigned in Unicode 15-16, and ``\\s`` is
Oniguruma's set (``str.isspace`` also counts U+001C..U+001F). Known remaining gap: NFC of U+11935 U+11930 (Dives
Akuru), which Python composes and ``tokenizers`` does not.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
_CACHE_SIZE = 100_000

# Oniguruma's \s: U+0009..U+000D, U+0085 and the Zs/Zl/Zp characters.
_WHITESPACE_SET = frozenset(" \t\n\x0b\x0c\r\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)
_WHITESPACE_RUN = re.compile("[" + "".join(sorted(_WHITESPACE_SET)) + "]+")


def _ranges(spec: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in spec.split():
        lo, _, hi = item.partition("-")
        out.append((int(lo, 16), int(hi or lo, 16)))
    return tuple(out)


# Unicode 15-16 code points that Oniguruma (Unicode 16) treats as \p{L} / \p{N} but unicodedata 14.0 does not know.
_EXTRA_LETTERS = _ranges(
    "1C89-1C8A A7CB-A7CD A7DA-A7DC 105C0-105F3 10D4A-10D65 10D6F-10D85 10EC2-10EC4 1123F-11240 11380-11389 1138B "
    "1138E 11390-113B5 113B7 113D1 113D3 11BC0-11BE0 11F02 11F04-11F10 11F12-11F33 1342F 13441-13446 13460-143FA "
    "16100-1611D 16D40-16D6C 18CFF 1B132 1B155 1DF25-1DF2A 1E030-1E06D 1E4D0-1E4EB 1E5D0-1E5ED 1E5F0 2B739 "
    "2EBF0-2EE5D 31350-323AF"
)
_EXTRA_NUMBERS = _ranges(
    "10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16D70-16D79 1CCF0-1CCF9 1D2C0-1D2D3 1E4F0-1E4F9 "
    "1E5F1-1E5FA"
)
# Rust's char::to_lowercase mappings (Unicode 16) missing from Python 3.11: (first, last, offset to add).
_EXTRA_LOWER = {
    c: chr(c + off)
    for lo, hi, off in ((0x1C89, 0x1C89, 1), (0xA7CB, 0xA7CB, -0xA567), (0xA7CC, 0xA7CC, 1), (0xA7CE, 0xA7CE, 1),
                        (0xA7D2, 0xA7D2, 1), (0xA7D4, 0xA7D4, 1), (0xA7DA, 0xA7DA, 1), (0xA7DC, 0xA7DC, -0xA641),
                        (0x10D50, 0x10D65, 0x20), (0x16EA0, 0x16EB8, 0x1B))
    for c in range(lo, hi + 1)
}
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@lru_cache(maxsize=65536)
def _char_class(ch: str) -> str:
    """'S' whitespace, 'L' letter, 'N' number, 'P' anything else (the classes of CLIP's pattern)."""
    if ch in _WHITESPACE_SET:
        return "S"
    cat = unicodedata.category(ch)[0]
    if cat in "LN":
        return cat
    cp = ord(ch)
    if any(lo <= cp <= hi for lo, hi in _EXTRA_LETTERS):
        return "L"
    if any(lo <= cp <= hi for lo, hi in _EXTRA_NUMBERS):
        return "N"
    return "P"


def _lower(text: str) -> str:
    """Per-character lowercase, as ``tokenizers.normalizers.Lowercase`` (no context-dependent final sigma)."""
    return "".join(_EXTRA_LOWER.get(ord(ch)) or ch.lower() for ch in text)


def normalize(text: str) -> str:
    """NFC -> whitespace runs to one space -> lowercase (CLIPTokenizer's normalizer; leading/trailing space kept)."""
    return _lower(_WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text)))


def _split(text: str, specials: tuple[str, ...], digit_runs: bool) -> list[str]:
    """Leftmost-first matches of ``specials|contractions|L+|N|P+`` (CLIP) or ``contractions|L+|N+|P+`` (GPT-2)."""
    pieces: list[str] = []
    i, n = 0, len(text)
    while i < n:
        special = next((s for s in specials if text.startswith(s, i)), None)
        if special is not None:
            pieces.append(special)
            i += len(special)
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None) if text[i] == "'" else None
        if contraction is not None:
            pieces.append(contraction)
            i += len(contraction)
            continue
        cls = _char_class(text[i])
        if cls == "S":
            i += 1
            continue
        j = i + 1
        if cls != "N" or digit_runs:
            while j < n and _char_class(text[j]) == cls:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def pre_tokenize(normalized: str) -> list[str]:
    """CLIP's regex split, then the ByteLevel pre-tokeniser's GPT-2 split of each piece (whitespace removed)."""
    clip_specials = ("<|startoftext|>", "<|endoftext|>")
    return [p for piece in _split(normalized, clip_specials, False) for p in _split(piece, (), True)]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable unicode symbol table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _token_content(value: object) -> str | None:
    """A special token from a tokenizer config: a plain string or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ClipTokenizer:
    """CLIP BPE tokenizer giving the same ``input_ids`` as transformers' CLIPTokenizer for diffusers-style calls."""

    OPTIONAL_FILES = ("special_tokens_map.json", "tokenizer_config.json")  # besides vocab.json and merges.txt

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        model_max_length: int = DEFAULT_MAX_LENGTH,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
    ) -> None:
        self.vocab = vocab
        self.model_max_length = model_max_length
        self.bos_token_id = vocab[bos_token]
        self.eos_token_id = vocab[eos_token]
        self.pad_token_id = vocab[pad_token]
        self.unk_token_id = vocab.get(unk_token)
        # Longest first so that, as in the backend's added-vocabulary trie, the longest token wins at a position.
        specials = sorted({bos_token, eos_token, pad_token, unk_token}, key=len, reverse=True)
        self._specials = {t: vocab[t] for t in specials if t in vocab}
        self._special_re = re.compile("|".join(re.escape(t) for t in self._specials) or r"(?!)")
        self._byte_encoder = bytes_to_unicode()
        # (left id, right id) -> (rank, merged id); a repeated pair keeps its last rank, as a Rust HashMap collect does.
        self._merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(merges):
            self._merges[(vocab[a], vocab[b])] = (rank, vocab[a + b])
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> ClipTokenizer:
        """Load vocab.json, merges.txt and (if present) tokenizer_config.json / special_tokens_map.json."""
        root = Path(path)
        return cls.from_files(lambda name: (root / name).read_bytes() if (root / name).is_file() else None)

    @classmethod
    def from_files(cls, read: Callable[[str], bytes | None]) -> ClipTokenizer:
        """``from_dir`` over ``read(name)``: a file's bytes, or None when it is absent (a bundle's files are read
        through its confinement: ``BundleRunner.encode_prompt``)."""
        def required(name: str) -> str:
            data = read(name)
            if data is None:
                raise FileNotFoundError(f"tokenizer file {name} not found")
            return data.decode("utf-8")

        vocab = json.loads(required("vocab.json"))
        merges: list[tuple[str, str]] = []
        for line in required("merges.txt").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            a, b = line.split(" ")
            merges.append((a, b))
        settings: dict[str, object] = {}
        for name in cls.OPTIONAL_FILES:  # the config wins, as in transformers
            data = read(name)
            if data is not None:
                settings.update(json.loads(data.decode("utf-8")))
        kwargs = {k: tok for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                  if (tok := _token_content(settings.get(k))) is not None}
        max_len = settings.get("model_max_length", DEFAULT_MAX_LENGTH)
        max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e9 else DEFAULT_MAX_LENGTH
        return cls(vocab, merges, model_max_length=max_len, **kwargs)

    def _bpe(self, piece: str) -> list[int]:
        """Token ids of one pre-tokenised piece, merged like ``tokenizers``' ``Word::merge_all`` (no dropout)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        chars = [self._byte_encoder[b] for b in piece.encode("utf-8")]
        chars[-1] += END_OF_WORD
        ids = [self.vocab.get(c, self.unk_token_id) for c in chars]
        if any(i is None for i in ids):
            raise KeyError(f"symbol of {piece!r} is not in the vocabulary and there is no unk token")
        n = len(ids)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n)) + [-1]
        alive = [True] * n
        queue = [(m[0], pos, m[1]) for pos in range(n - 1) if (m := self._merges.get((ids[pos], ids[pos + 1])))]
        heapq.heapify(queue)
        while queue:
            rank, pos, new_id = heapq.heappop(queue)
            if not alive[pos] or nxt[pos] == -1:
                continue
            right = nxt[pos]
            current = self._merges.get((ids[pos], ids[right]))
            if current is None or current[1] != new_id:  # expired entry
                continue
            ids[pos] = new_id
            alive[right] = False
            nxt[pos] = nxt[right]
            if nxt[right] != -1:
                prev[nxt[right]] = pos
            if prev[pos] != -1 and (m := self._merges.get((ids[prev[pos]], new_id))):
                heapq.heappush(queue, (m[0], prev[pos], m[1]))
            if nxt[pos] != -1 and (m := self._merges.get((new_id, ids[nxt[pos]]))):
                heapq.heappush(queue, (m[0], pos, m[1]))
        out = [i for i, keep in zip(ids, alive) if keep]
        if len(self._cache) >= _CACHE_SIZE:  # bounded, for long-running processes
            self._cache.clear()
        self._cache[piece] = out
        return out

    def tokenize_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS and without truncation."""
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids.extend(self._encode_segment(text[start:match.start()]))
            ids.append(self._specials[match.group()])
            start = match.end()
        ids.extend(self._encode_segment(text[start:]))
        return ids

    def _encode_segment(self, segment: str) -> list[int]:
        return [i for piece in pre_tokenize(normalize(segment)) for i in self._bpe(piece)] if segment else []

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """``[BOS] + ids + [EOS]``; with ``max_length`` the ids are cut to ``max_length - 2`` as transformers does."""
        ids = self.tokenize_ids(text)
        if max_length is not None:
            ids = ids[: max(max_length - 2, 0)]
        return [self.bos_token_id, *ids, self.eos_token_id]

    def __call__(self, texts: list[str] | str, max_length: int | None = None) -> np.ndarray:
        """int64 ``[batch, max_length]`` ids, truncated and right-padded with the pad token (diffusers' call)."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.model_max_length if max_length is None else max_length
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text, max_length=length)
            out[row, : len(ids)] = ids
        return out
