"""What the dynamic and the static exporter share: the data file, rotary tables, table chunking,
progress steps and the tokenizer files copied beside the graphs.

Both exporters import this module; neither imports the other.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Every weight of an export, in one external-data file beside the graph(s).
DATA_FILE = "model.onnx.data"
# Rows per chunk when streaming [vocab, hidden] tables (8192 x 2560 fp32 = 80 MiB). Read at call
# time (`common.TABLE_CHUNK_ROWS`), so a test can shrink it to cover the multi-chunk path.
TABLE_CHUNK_ROWS = 8192
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)

Progress = Callable[[str, int, int], None]


class Steps:
    """Counts an export's steps (embedding, each layer, lm_head) and reports each to `progress`."""

    def __init__(self, progress: Progress | None, num_layers: int):
        self.progress = progress
        self.done = 0
        self.total = num_layers + 2

    def tick(self, what: str) -> None:
        """Mark step `what` done and report it."""
        self.done += 1
        if self.progress is not None:
            self.progress(what, self.done, self.total)


def rotary_caches(
    head_dim: int, theta: float, length: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches `[length, head_dim / 2]` for non-interleaved rotary.

    Computed in float32 the way transformers does (inv_freq, then position * inv_freq), so the
    angles match the reference bit for bit before the final cast.

    Args:
        head_dim: the attention head size (even).
        theta: config.json's `rope_theta`.
        length: rows, one per position.
        dtype: the dtype of the returned tables.

    Returns:
        (cos, sin), each `[length, head_dim // 2]`.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq).astype(np.float32)
    # cos/sin of the float32 angles evaluated in float64: float32 libm kernels differ by a few
    # ulps between numpy and torch at large angles; this is the exact value of the same angle.
    angles = freqs.astype(np.float64)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def copy_side_files(model_dir: Path, out_dir: Path) -> list[Path]:
    """Copy the tokenizer files and generation_config.json of `model_dir` that exist.

    Args:
        model_dir: the source model folder.
        out_dir: the export folder.

    Returns:
        The copied files' new paths.
    """
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        src = model_dir / name
        if src.is_file() and src.resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)
            copied.append(out_dir / name)
    return copied
