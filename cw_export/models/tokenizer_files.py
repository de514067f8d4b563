"""Build a small CLIP-format BPE tokenizer locally, so exports and tests never download one.

The files are byte-for-byte in OpenAI CLIP's format (``vocab.json`` + ``merges.txt``): the vocabulary starts with the
256 ``bytes_to_unicode`` symbols, then the same symbols with the ``</w>`` end-of-word suffix, then one entry per learned
merge, then ``<|startoftext|>`` and ``<|endoftext|>``. ``transformers.CLIPTokenizer`` and
``cw_export.runtime.tokenizer.ClipTokenizer`` both load the folder written by :func:`write_clip_tokenizer`.

Steps: 1. pre-tokenise the corpus exactly like CLIP (whitespace cleanup, lowercase, CLIP's regex) and count words;
2. learn merges by standard BPE (most frequent adjacent pair, ties broken by lexicographic order, so the result is
deterministic); 3. write the files via temp file + ``os.replace``.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex

from cw_export.runtime.tokenizer import bytes_to_unicode

DEFAULT_VOCAB_SIZE = 2000
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

# OpenAI CLIP's pre-tokeniser pattern (clip/simple_tokenizer.py); needs the `regex` package for \p{L} / \p{N}.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

# Fixed training text: the vocabulary prompts for this project use (objects, colours, shapes, positions, sizes,
# scenes, art styles), plus function words. Words not covered still encode, as byte-level pieces.
_CORPUS_TEXT = """
a an the of and or with without on in at to from by for into onto over under above below behind beside between near
is are was be being has have its it's this that these those there here very more most some many few one two three
four five six seven eight nine ten dozen pair group single double half full empty
left right top bottom center centre middle corner edge side front back upper lower inside outside far close
background foreground horizon distance upright upside down diagonal horizontal vertical tilted rotated
small large big tiny huge giant little tall short long wide narrow thick thin heavy light round flat deep shallow
red orange yellow green blue purple violet pink brown black white gray grey silver gold golden beige cyan magenta
teal turquoise navy crimson scarlet maroon olive lime ivory pastel dark bright pale vivid colorful colourful muted
neon warm cool monochrome striped dotted checkered plain shiny glossy matte metallic wooden glass stone plastic
circle square triangle rectangle oval ellipse star heart hexagon pentagon diamond cube sphere cylinder cone pyramid
ring line arrow cross spiral dot grid pattern shape shapes outline solid hollow filled curved straight sharp soft
cat cats dog dogs horse bird birds fish cow sheep rabbit fox wolf bear lion tiger elephant giraffe monkey owl eagle
duck chicken butterfly bee snake frog turtle dolphin whale deer mouse puppy kitten dragon unicorn
man woman men women person people child children boy girl baby family friends portrait face eyes hair smile hand
hands king queen knight wizard robot astronaut soldier farmer chef doctor student teacher musician dancer
house houses home building buildings castle tower bridge church temple city town village street road path door
window roof wall floor room kitchen bedroom garden park farm market shop cafe restaurant library school station
car cars truck bus bicycle motorcycle train airplane plane boat ship rocket spaceship helicopter
tree trees forest flower flowers rose grass leaf leaves mountain mountains hill river lake sea ocean beach island
desert field valley waterfall cave rock rocks sand snow ice rain cloud clouds sky sun moon stars planet galaxy
fire water smoke storm lightning rainbow fog mist sunset sunrise night day morning evening winter summer spring autumn
apple apples banana orange lemon strawberry cherry grapes bread cake pizza burger coffee tea cup mug bowl plate
bottle vase table chair sofa bed lamp clock book books computer phone camera television guitar piano violin drum
ball toy box bag hat shoes shirt dress coat umbrella sword shield crown key candle mirror painting picture map
photo photograph photography photorealistic realistic hyperrealistic detailed highly intricate sharp focus blurry
painting painted drawing sketch illustration cartoon anime comic watercolor watercolour oil acrylic pencil charcoal
ink digital art artwork concept render rendered 3d cgi octane unreal engine pixel vector minimalist abstract
surreal impressionist impressionism cubism baroque renaissance gothic cyberpunk steampunk fantasy futuristic
vintage retro modern classic ancient medieval studio lighting cinematic dramatic golden hour volumetric ambient
bokeh macro wide angle lens close-up closeup shot view aerial panoramic landscape cityscape seascape still life
trending award winning masterpiece beautiful cute scary epic peaceful quiet busy crowded lonely happy sad
sitting standing walking running flying swimming jumping sleeping eating reading playing holding wearing looking
upper-left upper-right lower-left lower-right top-left top-right bottom-left bottom-right centered offset aligned
leftmost rightmost topmost overlapping touching surrounded stacked scattered arranged row column circular
miniature enormous massive slender chubby fluffy furry spiky smooth rough wet dry frozen burning glowing
transparent translucent reflective sparkling dusty rusty broken ancient weathered polished embroidered
amber emerald sapphire ruby jade coral lavender indigo charcoal cream mint peach plum rust sepia tan
bronze copper marble granite porcelain ceramic leather silk velvet paper cardboard concrete brick steel
octagon crescent cross-shaped zigzag wavy swirl checkerboard polka gradient silhouette symmetrical
meadow jungle swamp canyon glacier volcano cliff shore harbor pier lighthouse windmill barn cottage cabin
skyscraper alley plaza courtyard fountain staircase hallway balcony attic basement warehouse factory
kitchenette classroom laboratory hospital museum gallery theater stadium airport subway highway
penguin parrot octopus jellyfish squirrel hedgehog raccoon panda koala kangaroo zebra camel llama
pumpkin carrot tomato potato mushroom sandwich noodles sushi donut cookie chocolate honey cheese salad
teapot kettle spoon fork knife basket blanket pillow curtain rug shelf ladder bucket lantern telescope
art nouveau deco ukiyo-e pop low poly isometric claymation origami mosaic stained pointillism expressionism
photograph documentary editorial fashion product advertisement poster postcard magazine cover album
morning fog golden light soft shadows rim backlit overcast moonlight candlelight twilight dawn dusk
a red circle on the left. a blue square at the top right. a green triangle in the center of a white background.
a small yellow star at the bottom left corner. two large black circles side by side.
a photo of a cat sitting on a wooden table. an oil painting of a castle on a hill at sunset.
a watercolor illustration of a fox in a snowy forest. a futuristic city at night, neon lights, cinematic.
portrait of an old man, highly detailed, studio lighting. a bowl of fruit, still life, oil on canvas.
"""


def builtin_corpus() -> list[str]:
    """The fixed English corpus shipped with cw-export, one line per item (no download, same text every run)."""
    return [line.strip() for line in _CORPUS_TEXT.strip().splitlines() if line.strip()]


def _clip_words(text: str) -> list[str]:
    """CLIP's pre-tokenisation for plain text: collapse whitespace, strip, lowercase, split with CLIP's pattern."""
    text = " ".join(text.split()).strip().lower()
    return CLIP_PATTERN.findall(text)


def _count_words(corpus: Iterable[str]) -> Counter[tuple[str, ...]]:
    """Word frequency table, each word as its tuple of byte symbols with ``</w>`` on the last one."""
    byte_encoder = bytes_to_unicode()
    counts: Counter[tuple[str, ...]] = Counter()
    for line in corpus:
        for word in _clip_words(line):
            if word in (BOS_TOKEN, EOS_TOKEN):
                continue
            symbols = [byte_encoder[b] for b in word.encode("utf-8")]
            symbols[-1] += END_OF_WORD
            counts[tuple(symbols)] += 1
    return counts


def _merge_word(word: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of ``pair`` in ``word``, left to right (as CLIP's bpe() does)."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _pairs(word: list[str]) -> Counter[tuple[str, str]]:
    return Counter(zip(word, word[1:]))


def train_clip_bpe(
    corpus: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn CLIP-format BPE merges on ``corpus``; returns (vocab token -> id, merges in rank order).

    Each step merges the pair with the highest corpus frequency; ties go to the lexicographically smallest pair, so the
    same corpus always gives the same files. Stops at ``vocab_size`` entries or when every word is one symbol.
    """
    base = list(bytes_to_unicode().values())
    n_fixed = 2 * len(base) + 2  # base symbols, their </w> forms, two special tokens
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size={vocab_size} is below the {n_fixed} entries every CLIP vocabulary holds")

    counts = _count_words(corpus)
    words = [list(w) for w in counts]
    freqs = list(counts.values())
    pair_counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for pair, k in _pairs(word).items():
            pair_counts[pair] += k * freq
            where[pair].add(i)
    # Max-heap on count, min on pair: entries go stale as counts change and are re-checked when popped.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while len(merges) < vocab_size - n_fixed and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg <= 0:
            continue
        merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, set())):
            old = _pairs(words[i])
            words[i] = _merge_word(words[i], pair)
            new = _pairs(words[i])
            for p in old.keys() | new.keys():
                delta = (new.get(p, 0) - old.get(p, 0)) * freqs[i]
                if delta:
                    pair_counts[p] += delta
                    touched.add(p)
                if p in new:
                    where[p].add(i)
                elif p in where:
                    where[p].discard(i)
        pair_counts.pop(pair, None)
        for p in touched:
            if p != pair and pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))

    tokens = base + [b + END_OF_WORD for b in base] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge can rebuild an existing token; keep its first id so ids stay dense
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_clip_tokenizer(
    out_dir: str | os.PathLike[str],
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    model_max_length: int = 77,
) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json as SD 1.5 ships them.

    The pad token is ``<|endoftext|>`` (as in SD 1.5), so padded prompts match what diffusers feeds the text encoder.
    """
    for token in (BOS_TOKEN, EOS_TOKEN):
        if token not in vocab:
            raise ValueError(f"vocab lacks the special token {token!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_id = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    _write_atomic(out / "vocab.json", json.dumps(by_id, ensure_ascii=False) + "\n")
    _write_atomic(out / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_atomic(out / "special_tokens_map.json", json.dumps(special, indent=2, sort_keys=True) + "\n")
