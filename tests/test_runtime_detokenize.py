"""UTF-8-safe streaming and stop strings, with the real Qwen3 tokenizer."""

from __future__ import annotations

import pytest
import tokenizers

from edgepipe.runtime.detokenize import (
    IncrementalDetokenizer,
    StopStringFilter,
    TokenBytes,
    token_bytes_for,
)

TEXTS = {
    "chinese": "北京是中华人民共和国的首都，也是全国的政治、文化中心。龘靐麤𠀀𪚥",
    "thai": "ภาษาไทยเป็นภาษาที่มีวรรณยุกต์ และเขียนโดยไม่เว้นวรรคระหว่างคำ",
    "burmese": "မြန်မာဘာသာစကားသည် မြန်မာနိုင်ငံ၏ ရုံးသုံးဘာသာစကား ဖြစ်သည်။",
    "emoji": "Family: 👨‍👩‍👧‍👦, flags 🇯🇵🇫🇷, skin 👍🏽 and 🙂🙃 done",
    "mixed": "Hello 世界! ไทย မြန်မာ 🤖 — naïve café\n\nend",
}


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir):
    return tokenizers.Tokenizer.from_file(str(qwen3_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def token_bytes(tokenizer):
    return TokenBytes(tokenizer)


def stream_pieces(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    return [p for p in pieces if p]


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("path", ["byte_level", "fallback"])
def test_streamed_pieces_join_to_the_full_decode_without_broken_characters(
    tokenizer, token_bytes, name, path
):
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer, token_bytes if path == "byte_level" else None)
    pieces = stream_pieces(detok, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXTS[name]
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("name", ["chinese", "burmese", "emoji"])
def test_the_texts_really_split_characters_across_tokens(tokenizer, name):
    # Guards the test above: at least one token must be an incomplete UTF-8 sequence on its own.
    # (Qwen's vocabulary has every Thai character whole, so Thai text is checked above only.)
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False).ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)


def test_special_tokens_are_skipped_and_plain_added_tokens_kept(tokenizer, token_bytes):
    ids = tokenizer.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>").ids
    detok = IncrementalDetokenizer(tokenizer, token_bytes)
    assert "".join(stream_pieces(detok, ids)) == tokenizer.decode(ids)
    assert "".join(stream_pieces(IncrementalDetokenizer(tokenizer, token_bytes), ids)) == (
        "assistant\n<think>\nhm\n</think>\n\nok"
    )


def test_an_incomplete_character_at_the_end_flushes_as_replacement(tokenizer, token_bytes):
    ids = tokenizer.encode("🫠", add_special_tokens=False).ids
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, token_bytes)
    assert [detok.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.flush() == tokenizer.decode(ids[:-1])


def test_token_bytes_refuses_a_non_byte_level_tokenizer():
    wordpiece = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}))
    wordpiece.decoder = tokenizers.decoders.WordPiece()
    with pytest.raises(ValueError, match="byte-level"):
        TokenBytes(wordpiece)
    assert token_bytes_for(wordpiece) is None  # the detokenizer then re-decodes a window


def test_token_bytes_for_a_byte_level_tokenizer_gives_its_bytes(tokenizer):
    table = token_bytes_for(tokenizer)
    ids = tokenizer.encode(TEXTS["mixed"], add_special_tokens=False).ids
    assert b"".join(table(t) for t in ids).decode("utf-8") == TEXTS["mixed"]


def stop_run(stops, pieces):
    flt = StopStringFilter(stops)
    out = [flt.push(p) for p in pieces]
    out.append(flt.flush())
    return "".join(out), flt


def test_text_is_cut_before_a_stop_string_split_across_pieces():
    text, flt = stop_run(["STOP"], ["Hello S", "TO", "P and more", " after"])
    assert text == "Hello "
    assert flt.stopped and flt.matched == "STOP"


def test_a_partial_match_is_released_when_it_turns_out_not_to_be_one():
    flt = StopStringFilter(["</end>"])
    assert flt.push("a </e") == "a "
    assert flt.push("x") == "</ex"
    assert not flt.stopped


def test_the_earliest_of_several_stop_strings_wins():
    text, flt = stop_run(["world", "lo w"], ["Hello", " world"])
    assert text == "Hel"
    assert flt.matched == "lo w"


def test_no_stop_strings_pass_everything_through():
    text, flt = stop_run([], ["a", "b"])
    assert text == "ab" and not flt.stopped


def test_held_text_is_released_at_the_end():
    text, flt = stop_run(["STOP"], ["abc ST"])
    assert text == "abc ST" and not flt.stopped
