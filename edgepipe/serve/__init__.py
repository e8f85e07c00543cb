"""edgepipe.serve: an OpenAI-compatible HTTP server for one artifact (`edgepipe serve`).

    edgepipe serve artifacts/qwen3-0.6b-cpu --parallel 4 --api-key-file keys.txt

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`
and `GET /metrics`. Concurrent requests share decode steps (continuous batching over
`edgepipe.runtime.batch.SlotBatch`). Needs the `serve` extra: `pip install "edgepipe[serve]"`.
This package imports `edgepipe.runtime` and nothing else of edgepipe; the runtime never imports
it. See docs/serve.md.
"""

from edgepipe.serve.app import create_app
from edgepipe.serve.config import ServeConfig, read_api_keys

__all__ = ["ServeConfig", "create_app", "read_api_keys"]
