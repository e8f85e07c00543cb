"""edgepipe: Qwen models → device-tuned ONNX Runtime artifacts, and a thin runtime for them."""

__version__ = "0.1.0"
