"""Streaming safetensors reader and writer: one tensor in memory at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to `{dtype, shape, data_offsets}` (offsets relative to the end of the header), then
raw little-endian buffers. Reading the header is enough to list every tensor; a tensor is read
with one `np.fromfile` at its offset, so a 4B-parameter model never sits in memory whole.
bf16 has no numpy dtype; it is widened to float32 by shifting its 16 bits into the high half of
a float32, which is exact.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.errors import InvalidInput

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt")
CONVERT_HINT = (
    "edgepipe reads safetensors only (pickle checkpoints can run arbitrary code); convert with "
    "`AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, "
    "safe_serialization=True)` or the Hugging Face `convert` Space"
)

# safetensors dtype string -> (numpy storage dtype, bytes per element)
_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened in `read`
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_WRITE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the stored buffer in bytes."""
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and check every tensor lies inside the file.

    Args:
        path: a `.safetensors` file.

    Returns:
        Tensor name -> `TensorInfo` (absolute offsets).

    Raises:
        InvalidInput: the file is missing, not safetensors, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: weights file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidInput(f"{path}: not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise InvalidInput(
                f"{path}: header length {header_len} exceeds the file size {size}; the file is "
                "truncated or not safetensors (re-download or re-save it)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{path}: unreadable safetensors header ({exc})") from exc
    base = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype")
        if dtype not in _DTYPES:
            problems.append(f"{path}: {name}: unsupported dtype {dtype!r}")
            continue
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if end - begin != expected:
            problems.append(
                f"{path}: {name}: {end - begin} bytes stored, {expected} expected for "
                f"{dtype} {list(shape)}"
            )
        if base + end > size:
            problems.append(
                f"{path}: {name}: data ends at byte {base + end} but the file has {size} bytes; "
                "the file is truncated (re-download or re-save it)"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    if problems:
        raise InvalidInput(problems[0], problems)
    return infos


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Read one tensor (or rows [start, stop) of it); bf16 comes back as float32."""
    storage = _DTYPES[info.dtype]
    shape = info.shape
    offset, count = info.start, info.nbytes // storage.itemsize
    if rows is not None:
        row = int(np.prod(shape[1:], dtype=np.int64))
        start, stop = max(0, rows[0]), min(shape[0], rows[1])
        shape = (max(0, stop - start), *shape[1:])
        offset += start * row * storage.itemsize
        count = shape[0] * row
    data = np.fromfile(info.file, dtype=storage, count=count, offset=offset)
    if count and data.size != count:
        raise InvalidInput(f"{info.file}: {info.name}: file ended early (truncated)")
    if info.dtype == "BF16":
        wide = data.astype(np.uint32)
        del data  # keep one buffer alive besides the result
        np.left_shift(wide, 16, out=wide)
        data = wide.view(np.float32)
    return data.reshape(shape)


class SafetensorsModel:
    """The tensors of a Hugging Face model folder, read lazily one at a time.

    Accepts `model.safetensors` or shards listed in `model.safetensors.index.json`; refuses
    pickle checkpoints with the conversion command.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InvalidInput(f"{self.folder}: model folder not found")
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            self.tensors.update(read_header(file))

    def _weight_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise InvalidInput(
                    f"{index}: shards listed in weight_map are missing: {', '.join(missing)}"
                )
            return [self.folder / f for f in files]
        if (self.folder / SINGLE_FILE).is_file():
            return [self.folder / SINGLE_FILE]
        shards = sorted(self.folder.glob("*.safetensors"))
        if shards:
            return shards
        pickles = [p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        if pickles or any((self.folder / n).exists() for n in PICKLE_NAMES):
            raise InvalidInput(f"{self.folder}: found {', '.join(sorted(pickles))}; {CONVERT_HINT}")
        raise InvalidInput(
            f"{self.folder}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE} with shards)"
        )

    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        """The `TensorInfo` of `name`; InvalidInput naming the folder when absent."""
        if name not in self.tensors:
            raise InvalidInput(f"{self.folder}: tensor {name!r} not found in the weights")
        return self.tensors[name]

    def read(self, name: str, dtype: np.dtype | str | None = np.float32) -> np.ndarray:
        """Read tensor `name`, cast to `dtype` (None keeps the stored dtype; bf16 → float32)."""
        array = read_tensor(self.info(name))
        if dtype is not None and array.dtype != np.dtype(dtype):
            array = array.astype(dtype)
        return array

    def read_chunks(
        self, name: str, rows: int, dtype: np.dtype | str = np.float32
    ) -> Iterator[np.ndarray]:
        """Yield tensor `name` in blocks of `rows` rows (first axis), cast to `dtype`."""
        info = self.info(name)
        for start in range(0, info.shape[0], rows):
            yield read_tensor(info, (start, start + rows)).astype(dtype, copy=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits with round-to-nearest-even (what torch's `.to(bfloat16)` does)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def write_safetensors(
    path: Path | str,
    tensors: dict[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
    dtype: str = "float32",
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write float tensors to one safetensors file, tensor by tensor.

    Args:
        path: output file.
        tensors: name -> array, or an iterator of (name, array) pairs; with an iterator,
            `shapes` must give every shape up front (the header comes first), and each array is
            written and dropped before the next is produced.
        dtype: storage dtype, "float32", "float16" or "bfloat16".
        shapes: name -> shape, required when `tensors` is an iterator.
        metadata: optional `__metadata__` strings (HF writes {"format": "pt"}).

    Returns:
        Bytes written.
    """
    if dtype not in _WRITE_DTYPES:
        raise InvalidInput(f"write_safetensors: dtype {dtype!r}; allowed: {list(_WRITE_DTYPES)}")
    st_dtype = _WRITE_DTYPES[dtype]
    itemsize = _DTYPES[st_dtype].itemsize
    if isinstance(tensors, dict):
        shapes = {name: tuple(a.shape) for name, a in tensors.items()}
        items: Iterator[tuple[str, np.ndarray]] = iter(tensors.items())
    elif shapes is None:
        raise InvalidInput("write_safetensors: pass `shapes` when `tensors` is an iterator")
    else:
        items = tensors
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec pads the header so buffers start 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        order = list(shapes)
        written = 0
        for name, array in items:
            if written >= len(order) or name != order[written]:
                raise InvalidInput(f"write_safetensors: {name!r} out of the order `shapes` gives")
            written += 1
            if tuple(array.shape) != tuple(shapes[name]):
                raise InvalidInput(
                    f"write_safetensors: {name}: shape {array.shape} != {shapes[name]}"
                )
            if st_dtype == "BF16":
                data = _bf16_bits(array)
            else:
                data = np.ascontiguousarray(array, dtype=_DTYPES[st_dtype])
            f.write(data.tobytes())
    if written != len(order):
        raise InvalidInput(f"write_safetensors: {path}: {len(order) - written} tensors not given")
    return 8 + len(blob) + offset
