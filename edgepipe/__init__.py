"""edgepipe: Qwen models → device-tuned ONNX Runtime artifacts, and a thin runtime for them."""

# The one place the version is written: pyproject.toml reads it from here (hatch's dynamic
# version), so the wheel's metadata and `edgepipe --version` cannot disagree.
__version__ = "0.1.0"
