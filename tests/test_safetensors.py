"""The streaming safetensors reader/writer against the safetensors library and torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from edgepipe.errors import InvalidInput
from edgepipe.formats.safetensors import SafetensorsModel, read_header, write_safetensors


@pytest.fixture()
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((7, 5)).astype(np.float32),
        "b.bias": rng.standard_normal(3).astype(np.float32) * 1000,
        "c.empty": np.zeros((0, 4), np.float32),
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_written_file_loads_in_safetensors_library(arrays, tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    size = write_safetensors(path, arrays, dtype)
    assert size == path.stat().st_size
    loaded = load_file(path)
    for name, array in arrays.items():
        assert loaded[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(loaded[name], array.astype(dtype))


def test_bf16_writer_rounds_like_torch(arrays, tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, arrays, "bfloat16")
    from safetensors.torch import load_file as load_torch

    loaded = load_torch(path)
    for name, array in arrays.items():
        expected = torch.from_numpy(array).to(torch.bfloat16)
        assert torch.equal(loaded[name], expected), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reader_matches_torch_for_each_storage_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    tensors = {"x": torch.randn(33, 17).to(dtype), "y": torch.randn(4).to(dtype)}
    save_file(tensors, tmp_path / "model.safetensors")
    model = SafetensorsModel(tmp_path)
    assert model.names() == ["x", "y"]
    for name, tensor in tensors.items():
        got = model.read(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, tensor.float().numpy())
    assert model.read("x", dtype=None).dtype == (
        np.float32 if dtype == torch.bfloat16 else tensor.numpy().dtype
    )


def test_streamed_writer_checks_order_and_count(tmp_path):
    shapes = {"a": (2,), "b": (3,)}
    write_safetensors(
        tmp_path / "ok.safetensors",
        iter([("a", np.ones(2)), ("b", np.ones(3))]),
        shapes=shapes,
    )
    with pytest.raises(InvalidInput, match="out of the order"):
        write_safetensors(tmp_path / "x.safetensors", iter([("b", np.ones(3))]), shapes=shapes)
    with pytest.raises(InvalidInput, match="1 tensors not given"):
        write_safetensors(tmp_path / "y.safetensors", iter([("a", np.ones(2))]), shapes=shapes)


def test_sharded_folder_reads_through_the_index(arrays, tmp_path):
    write_safetensors(
        tmp_path / "model-00001-of-00002.safetensors", {"a.weight": arrays["a.weight"]}
    )
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b.bias": arrays["b.bias"]})
    index = {
        "metadata": {},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.bias": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = SafetensorsModel(tmp_path)
    np.testing.assert_array_equal(model.read("b.bias"), arrays["b.bias"])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InvalidInput, match="shards listed in weight_map are missing"):
        SafetensorsModel(tmp_path)


def test_truncated_file_is_an_error_naming_the_file(arrays, tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, arrays)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4)
    with pytest.raises(InvalidInput, match=rf"{path}: b.bias: data ends .* truncated"):
        read_header(path)


def test_file_cut_inside_the_header_is_an_error(arrays, tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, arrays)
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(InvalidInput, match="header length .* exceeds the file size"):
        read_header(path)


def test_reader_never_loads_more_than_the_requested_tensor(tmp_path):
    big = np.zeros((1024, 1024), np.float32)
    write_safetensors(tmp_path / "model.safetensors", {"big": big, "small": np.ones(3, np.float32)})
    info = SafetensorsModel(tmp_path).info("small")
    assert info.nbytes == 12 and info.start > big.nbytes


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InvalidInput, match="safetensors only"):
        SafetensorsModel(tmp_path)


def test_missing_tensor_names_the_folder(arrays, tmp_path):
    write_safetensors(tmp_path / "model.safetensors", arrays)
    with pytest.raises(InvalidInput, match="tensor 'nope' not found"):
        SafetensorsModel(tmp_path).read("nope")


def test_unknown_write_dtype_lists_allowed(tmp_path):
    with pytest.raises(InvalidInput, match="bfloat16"):
        write_safetensors(tmp_path / "m.safetensors", {"a": np.ones(1)}, "int4")


def test_row_chunks_reassemble_the_tensor(tmp_path):
    torch.manual_seed(0)
    table = torch.randn(1001, 6).to(torch.bfloat16)
    save_file({"t": table}, tmp_path / "model.safetensors")
    model = SafetensorsModel(tmp_path)
    chunks = list(model.read_chunks("t", 300, np.float16))
    assert [c.shape[0] for c in chunks] == [300, 300, 300, 101]
    assert all(c.dtype == np.float16 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), table.float().numpy().astype(np.float16))
