"""onnxruntime's tensor type strings (`NodeArg.type`) and the numpy dtypes that match them."""

from __future__ import annotations

import numpy as np

# The types a decoder's inputs and outputs use (KV caches are float32 or float16).
ORT_NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
