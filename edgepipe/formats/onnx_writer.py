"""A small onnx-ir graph writer that streams initializers to one external-data file.

Each weight is written to `model.onnx.data` the moment it is produced and replaced in the graph
by an `onnx_ir.ExternalTensor` that only records (location, offset, length); onnx-ir serializes
such tensors as references without reading them back, so the graph in memory holds no weight
bytes. Node and value names are derived from a caller-given prefix, so two builds of the same
model produce byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"
# Offsets are aligned so ORT can memory-map or read each tensor without copying into an aligned
# buffer; 64 bytes matches its CPU allocator alignment.
ALIGNMENT = 64

_NP_TO_IR = {
    np.dtype(np.float32): ir.DataType.FLOAT,
    np.dtype(np.float16): ir.DataType.FLOAT16,
    np.dtype(np.int64): ir.DataType.INT64,
    np.dtype(np.int32): ir.DataType.INT32,
    np.dtype(np.uint8): ir.DataType.UINT8,
    np.dtype(np.int8): ir.DataType.INT8,
}


def ir_dtype(dtype: np.dtype | type) -> ir.DataType:
    """The onnx-ir DataType of a numpy dtype."""
    return _NP_TO_IR[np.dtype(dtype)]


class GraphWriter:
    """Collects nodes and initializers; weights go straight to the external data file."""

    def __init__(self, data_path: Path, location: str = "model.onnx.data"):
        self.data_path = Path(data_path)
        self.location = location
        self._file = open(self.data_path, "wb")  # noqa: SIM115 - closed in close()
        self._offset = 0
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._names: set[str] = set()

    @classmethod
    def sibling(cls, owner: GraphWriter) -> GraphWriter:
        """A writer for a second graph over `owner`'s data file. It stores no bytes itself: its
        weights are `alias`es of the owner's, so the two graphs share every stored tensor."""
        view = cls.__new__(cls)
        view.data_path, view.location = owner.data_path, owner.location
        view._file, view._offset = None, 0
        view.nodes, view.initializers, view._names = [], [], set()
        return view

    def _pad(self) -> None:
        if self._file is None:
            raise TypeError("a sibling GraphWriter stores no weights: alias its owner's")
        pad = -self._offset % ALIGNMENT
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad

    @property
    def bytes_written(self) -> int:
        """Bytes in the external data file so far."""
        return self._offset

    def close(self) -> None:
        """Flush and close the external data file."""
        if self._file is not None and not self._file.closed:
            self._file.close()

    def weight(self, name: str, array: np.ndarray) -> ir.Value:
        """Append `array` to the data file and return an initializer value referring to it."""
        array = np.ascontiguousarray(array)
        self._pad()
        # Write the array's own buffer: `tobytes()` would hold a second copy of a large table.
        self._file.write(memoryview(array.reshape(-1)).cast("B"))
        tensor = ir.ExternalTensor(
            self.location,
            self._offset,
            array.nbytes,
            ir_dtype(array.dtype),
            shape=ir.Shape(array.shape),
            name=name,
            base_dir=self.data_path.parent,
        )
        self._offset += array.nbytes
        return self._register(name, tensor)

    def packed_weight(
        self, name: str, packed: np.ndarray, dtype: ir.DataType, shape: Sequence[int]
    ) -> ir.Value:
        """Append already packed bytes as a `dtype` tensor of `shape` (INT4: two per byte)."""
        packed = np.ascontiguousarray(packed, dtype=np.uint8)
        self._pad()
        self._file.write(memoryview(packed.reshape(-1)).cast("B"))
        tensor = ir.ExternalTensor(
            self.location,
            self._offset,
            packed.nbytes,
            dtype,
            shape=ir.Shape(shape),
            name=name,
            base_dir=self.data_path.parent,
        )
        self._offset += packed.nbytes
        return self._register(name, tensor)

    def stream_weight(
        self,
        name: str,
        dtype: np.dtype | type,
        shape: Sequence[int],
        chunks: Iterable[np.ndarray],
    ) -> ir.Value:
        """Like `weight`, but the data arrives in row chunks (each written and dropped).

        Keeps large tables (a 151936-row embedding) from ever being whole in memory.
        """
        self._pad()
        start = self._offset
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            self._file.write(memoryview(chunk.reshape(-1)).cast("B"))
            self._offset += chunk.nbytes
        length = self._offset - start
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if length != expected:
            raise ValueError(f"{name}: streamed {length} bytes, {expected} expected for {shape}")
        tensor = ir.ExternalTensor(
            self.location,
            start,
            length,
            ir_dtype(dtype),
            shape=ir.Shape(shape),
            name=name,
            base_dir=self.data_path.parent,
        )
        return self._register(name, tensor)

    def alias(self, name: str, of: ir.Value, shape: Sequence[int]) -> ir.Value:
        """A second initializer viewing the same stored bytes of `of` with another shape.

        Used where two ops want one weight in different layouts (GatherBlockQuantized takes the
        tied embedding 2-D, MatMulNBits 3-D): the data is stored once.
        """
        src = of.const_value
        if not isinstance(src, ir.ExternalTensor):
            raise TypeError(f"{of.name} is not stored externally")
        if int(np.prod(shape)) != int(np.prod(src.shape.numpy())):
            raise ValueError(f"alias {name}: {list(shape)} does not match {src.shape}")
        tensor = ir.ExternalTensor(
            self.location,
            src.offset,
            src.length,
            src.dtype,
            shape=ir.Shape(shape),
            name=name,
            base_dir=self.data_path.parent,
        )
        return self._register(name, tensor)

    def const(self, name: str, array: np.ndarray | Sequence[Any]) -> ir.Value:
        """A small initializer stored inside model.onnx (shapes, axes, scalars)."""
        array = np.asarray(array)
        return self._register(name, ir.Tensor(array, name=name))

    def _register(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        self._claim(name)
        value = ir.Value(
            name=name,
            type=ir.TensorType(tensor.dtype),
            shape=ir.Shape(tensor.shape),
            const_value=tensor,
        )
        self.initializers.append(value)
        return value

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"duplicate graph name {name!r}")
        self._names.add(name)

    def op(
        self,
        op_type: str,
        name: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, Any] | None = None,
        *,
        domain: str = "",
        num_outputs: int = 1,
        output_names: Sequence[str] | None = None,
    ) -> ir.Value | list[ir.Value]:
        """Add node `name` and return its output (or outputs when `num_outputs` > 1).

        Outputs are named `{name}/output_{i}` unless `output_names` gives graph-level names; an
        empty output name leaves that optional output unused.
        """
        self._claim(name)
        names = (
            list(output_names)
            if output_names
            else [f"{name}/output_{i}" for i in range(num_outputs)]
        )
        outputs = [ir.Value(name=n) for n in names]
        attrs = ir.convenience.convert_attributes(dict(attributes or {}))
        node = ir.Node(domain, op_type, inputs, attrs, outputs=outputs, name=name)
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def model(
        self,
        inputs: Sequence[ir.Value],
        outputs: Sequence[ir.Value],
        *,
        opset: int = 21,
        ir_version: int = 10,
        producer: str = "edgepipe",
        contrib_ops: bool = True,
        name: str = "decoder",
    ) -> ir.Model:
        """Assemble the model. ORT contrib ops come from the com.microsoft domain; a standard-ops
        graph (`contrib_ops=False`) does not import it."""
        graph = ir.Graph(
            inputs,
            outputs,
            nodes=self.nodes,
            initializers=self.initializers,
            opset_imports={"": opset, MS_DOMAIN: 1} if contrib_ops else {"": opset},
            name=name,
        )
        return ir.Model(graph, ir_version=ir_version, producer_name=producer)


def tensor_input(name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
    """A graph input/output value with a (partly symbolic) shape."""
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def save_model(model: ir.Model, path: Path) -> int:
    """Serialize `model` (external tensors stay references) and return the file size."""
    proto = ir.to_proto(model)
    data = proto.SerializeToString(deterministic=True)
    Path(path).write_bytes(data)
    return len(data)
