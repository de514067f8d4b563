"""Tests for cw_export.models.shapes: determinism, caption/label consistency, splits, rendering."""

from __future__ import annotations

import numpy as np
import pytest

from cw_export.models import shapes


def test_batch_is_deterministic_per_seed():
    a, b, c = shapes.make_batch(3, 16), shapes.make_batch(3, 16), shapes.make_batch(4, 16)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images)


def test_batch_layout_and_range():
    batch = shapes.make_batch(0, 8)
    assert batch.images.shape == (8, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    assert batch.images.dtype == np.float32
    assert batch.images.min() >= -1.0 and batch.images.max() <= 1.0
    assert set(batch.labels) == set(shapes.ATTRIBUTES)


def test_captions_name_the_labels():
    batch = shapes.make_batch(1, 200, split="all")
    named_size = 0
    for i, (caption, spec) in enumerate(zip(batch.captions, batch.specs)):
        parsed = shapes.parse_caption(caption)
        assert parsed["shape"] == spec.shape == shapes.SHAPES[batch.labels["shape"][i]]
        assert parsed["colour"] == spec.colour == shapes.COLOURS[batch.labels["colour"][i]]
        assert parsed["position"] == spec.position == shapes.POSITIONS[batch.labels["position"][i]]
        assert spec.size == shapes.SIZES[batch.labels["size"][i]]
        assert ("size" in parsed) == spec.size_in_caption
        if spec.size_in_caption:
            assert parsed["size"] == spec.size
            named_size += 1
    assert 0.3 < named_size / 200 < 0.7


def test_shape_colour_is_at_its_position():
    """The nominal centre of a large shape is covered by the shape, so that pixel has (about) the named colour."""
    batch = shapes.make_batch(2, 100, split="all")
    n = shapes.IMAGE_SIZE
    for image, spec in zip(batch.images, batch.specs):
        if spec.size != "large":
            continue
        x, y = (np.array(shapes.POSITION_XY[spec.position]) * n).astype(int)
        pixel = (image[:, y, x] + 1) / 2
        assert np.abs(pixel - np.array(shapes.COLOUR_RGB[spec.colour])).max() < shapes.COLOUR_JITTER + 0.02, spec


def test_held_out_triples_never_in_train_split():
    held = set(shapes.HELD_OUT)
    assert len(shapes.triples("train")) + len(shapes.triples("held_out")) == len(shapes.triples("all")) == 100
    train = shapes.make_batch(5, 500, split="train")
    assert not {(s.colour, s.shape, s.position) for s in train.specs} & held
    assert {(s.colour, s.shape, s.position) for s in shapes.make_batch(5, 50, split="held_out").specs} <= held
    for values, index in ((shapes.COLOURS, 0), (shapes.SHAPES, 1), (shapes.POSITIONS, 2)):
        assert {t[index] for t in held} == set(values)  # every value is tested compositionally


def test_eval_captions_cover_each_held_out_triple_three_ways():
    captions = shapes.eval_captions("held_out")
    assert len(captions) == 3 * len(shapes.HELD_OUT) == len(set(captions))
    assert "a small red triangle on the right" in captions and "a red triangle on the right" in captions


def test_unknown_split_and_shape_are_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        shapes.triples("test")
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.render(shapes.ShapeSpec("hexagon", "red", "left", "small"), np.random.default_rng(0))


def test_vocabulary_encodes_to_whole_words():
    from cw_export.models.tokenizer_files import builtin_corpus, train_clip_bpe

    vocab, _ = train_clip_bpe(builtin_corpus())
    for values in shapes.ATTRIBUTES.values():
        for word in values:
            assert word + "</w>" in vocab, word
