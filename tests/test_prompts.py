"""Tests for cw_export.prompts: builtin sets, file normalisation, every user error, and the provenance hash."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cw_export import prompts
from cw_export.errors import CwExportError, PromptFileError
from cw_export.prompts import (
    BUILTIN_PROMPT_SETS,
    MAX_PROMPT_FILE_BYTES,
    load_prompt_set,
    prompt_set_hash,
    read_prompt_file,
)

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "calibration"
SHAPE_WORDS = ("triangle", "circle", "square")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _raw_prompt_lines(path: Path) -> list[str]:
    """Prompt lines of a file without dedup, to check the shipped files themselves hold no duplicates."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# --- builtin sets -------------------------------------------------------------------------------------------------


def test_builtin_names_map_to_files_in_calibration_folder():
    assert set(BUILTIN_PROMPT_SETS) == {"default", "heldout", "shapes-train", "shapes-heldout"}
    for file_name in BUILTIN_PROMPT_SETS.values():
        assert (CALIBRATION_DIR / file_name).is_file()


def test_builtin_sets_load_with_expected_sizes():
    default = load_prompt_set("default")
    heldout = load_prompt_set("heldout")
    assert len(default) >= 200
    assert len(heldout) >= 50
    assert all(isinstance(p, str) and p == p.strip() and p for p in default + heldout)


def test_builtin_sets_are_disjoint_case_insensitively():
    default = {p.casefold() for p in load_prompt_set("default")}
    heldout = {p.casefold() for p in load_prompt_set("heldout")}
    assert default.isdisjoint(heldout), sorted(default & heldout)


@pytest.mark.parametrize("name", sorted(BUILTIN_PROMPT_SETS))
def test_builtin_files_hold_no_duplicates(name):
    lines = _raw_prompt_lines(CALIBRATION_DIR / BUILTIN_PROMPT_SETS[name])
    folded = [line.casefold() for line in lines]
    assert len(folded) == len(set(folded))


def test_builtin_files_start_with_comment_header():
    for file_name in BUILTIN_PROMPT_SETS.values():
        first = (CALIBRATION_DIR / file_name).read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("#")


def test_default_set_has_the_intended_mix():
    default = load_prompt_set("default")
    word_counts = [len(p.split()) for p in default]
    assert sum(1 for n in word_counts if n <= 2) >= 3, "needs very short prompts"
    assert sum(1 for n in word_counts if 60 <= n <= 100) >= 3, "needs prompts longer than CLIP's 77 tokens"
    shapes = [p for p in default if any(w in p.split() for w in SHAPE_WORDS) and len(p.split()) <= 12]
    assert len(shapes) >= 35, "needs synthetic-shape captions for the built-in tiny model"


def test_heldout_set_has_shape_prompts():
    heldout = load_prompt_set("heldout")
    shapes = [p for p in heldout if any(w in p.split() for w in SHAPE_WORDS) and len(p.split()) <= 12]
    assert len(shapes) >= 10


def test_builtin_name_equals_reading_its_file():
    path = CALIBRATION_DIR / BUILTIN_PROMPT_SETS["heldout"]
    assert load_prompt_set("heldout") == read_prompt_file(path)


def test_missing_builtin_data_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(prompts, "_calibration_dirs", lambda: (tmp_path / "nowhere",))
    with pytest.raises(PromptFileError, match="builtin prompt set 'default'"):
        load_prompt_set("default")


# --- normalisation ------------------------------------------------------------------------------------------------


def test_comments_and_blank_lines_ignored_and_whitespace_stripped(tmp_path):
    path = _write(tmp_path / "p.txt", "# header\n\n  a cat  \n   # indented comment\n\t\na dog\n\n")
    assert read_prompt_file(path) == ["a cat", "a dog"]


def test_hash_inside_a_prompt_is_kept(tmp_path):
    path = _write(tmp_path / "p.txt", "a sign reading #1\n")
    assert read_prompt_file(path) == ["a sign reading #1"]


def test_order_kept_and_exact_duplicates_dropped_keeping_first(tmp_path):
    path = _write(tmp_path / "p.txt", "b\na\nb\n  a  \nA\nc\n")
    assert read_prompt_file(path) == ["b", "a", "A", "c"]


def test_crlf_cr_and_bom_handled(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert read_prompt_file(path) == ["one", "two", "three"]


def test_non_ascii_utf8_accepted(tmp_path):
    path = _write(tmp_path / "p.txt", "un café à Paris\n東京の夜景\n")
    assert read_prompt_file(path) == ["un café à Paris", "東京の夜景"]


def test_load_prompt_set_accepts_a_path(tmp_path):
    path = _write(tmp_path / "mine.txt", "x\ny\n")
    assert load_prompt_set(str(path)) == ["x", "y"]
    assert load_prompt_set(path) == ["x", "y"]


def test_file_exactly_at_limit_is_accepted(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a\n" * (MAX_PROMPT_FILE_BYTES // 2))
    assert path.stat().st_size == MAX_PROMPT_FILE_BYTES
    assert read_prompt_file(path) == ["a"]


# --- errors -------------------------------------------------------------------------------------------------------


def _assert_one_line_error(exc_info: pytest.ExceptionInfo, path: os.PathLike | str, problem: str) -> None:
    message = str(exc_info.value)
    assert isinstance(exc_info.value, CwExportError)
    assert "\n" not in message
    assert os.fspath(path) in message
    assert problem in message


def test_missing_file(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    _assert_one_line_error(exc_info, path, "no such file")


def test_missing_file_via_load_prompt_set_lists_builtins(tmp_path):
    path = str(tmp_path / "absent.txt")
    with pytest.raises(PromptFileError) as exc_info:
        load_prompt_set(path)
    _assert_one_line_error(exc_info, path, "no such file")
    assert "default" in str(exc_info.value) and "heldout" in str(exc_info.value)


def test_directory(tmp_path):
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(tmp_path)
    _assert_one_line_error(exc_info, tmp_path, "is a directory")


def test_unreadable_permission_denied_on_open(monkeypatch, tmp_path):
    # We run as root, where chmod 000 does not stop reads, so simulate the denied open instead.
    path = _write(tmp_path / "p.txt", "a cat\n")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(prompts, "open", denied, raising=False)
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    _assert_one_line_error(exc_info, path, "unreadable (permission denied)")


def test_other_os_error_reported_as_unreadable(tmp_path):
    path = tmp_path / ("x" * 300)  # longer than NAME_MAX: stat fails with ENAMETOOLONG, not "no such file"
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    _assert_one_line_error(exc_info, path, "unreadable (file name too long)")


def test_unreadable_chmod_000(tmp_path):
    path = _write(tmp_path / "p.txt", "a cat\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user (e.g. root) that can read a mode-000 file")
        with pytest.raises(PromptFileError) as exc_info:
            read_prompt_file(path)
        _assert_one_line_error(exc_info, path, "unreadable")
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("text", ["", "\n\n   \n", "# only a comment\n# and another\n\n"])
def test_empty_or_only_comments(tmp_path, text):
    path = _write(tmp_path / "p.txt", text)
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    _assert_one_line_error(exc_info, path, "no prompts")


def test_nul_bytes_are_binary(tmp_path):
    path = tmp_path / "p.bin"
    path.write_bytes(b"a cat\n\x00\x01\x02\n")
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    _assert_one_line_error(exc_info, path, "not UTF-8 text")


def test_invalid_utf8(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("un café\n".encode("latin-1"))
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    _assert_one_line_error(exc_info, path, "not UTF-8 text")


def test_too_large(tmp_path):
    path = tmp_path / "big.txt"
    with open(path, "wb") as handle:
        handle.truncate(MAX_PROMPT_FILE_BYTES + 1)
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    _assert_one_line_error(exc_info, path, f"too large: {MAX_PROMPT_FILE_BYTES + 1} bytes >")


def test_limit_is_read_at_call_time(monkeypatch, tmp_path):
    path = _write(tmp_path / "p.txt", "a prompt that is longer than ten bytes\n")
    monkeypatch.setattr(prompts, "MAX_PROMPT_FILE_BYTES", 10)
    with pytest.raises(PromptFileError, match="too large"):
        read_prompt_file(path)


def test_path_with_newline_stays_one_line(tmp_path):
    path = tmp_path / "odd\nname.txt"
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    assert "\n" not in str(exc_info.value)
    assert repr(os.fspath(path)) in str(exc_info.value)


# --- hash ---------------------------------------------------------------------------------------------------------


def test_hash_is_sha256_of_joined_prompts():
    import hashlib

    expected = hashlib.sha256("a cat\na dog".encode("utf-8")).hexdigest()
    assert prompt_set_hash(["a cat", "a dog"]) == expected


def test_hash_stable_across_calls_and_reads(tmp_path):
    one = _write(tmp_path / "one.txt", "a cat\na dog\n")
    two = _write(tmp_path / "two.txt", "# comment\n  a cat\n\na dog  \na cat\n")
    h1 = prompt_set_hash(read_prompt_file(one))
    assert h1 == prompt_set_hash(read_prompt_file(one))
    assert h1 == prompt_set_hash(read_prompt_file(two))
    assert len(h1) == 64 and int(h1, 16) >= 0


def test_hash_changes_when_a_prompt_or_order_changes():
    base = prompt_set_hash(["a cat", "a dog"])
    assert prompt_set_hash(["a cat", "a dogs"]) != base
    assert prompt_set_hash(["a dog", "a cat"]) != base
    assert prompt_set_hash(["a cat"]) != base
    assert prompt_set_hash(["a cat a dog"]) != base


def test_hash_of_builtin_default_is_stable():
    assert prompt_set_hash(load_prompt_set("default")) == prompt_set_hash(load_prompt_set("default"))


def test_hash_rejects_prompt_with_newline():
    with pytest.raises(ValueError):
        prompt_set_hash(["a\nb"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_rejected_without_blocking(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    with pytest.raises(PromptFileError) as exc_info:
        read_prompt_file(path)
    _assert_one_line_error(exc_info, path, "not a regular file")
