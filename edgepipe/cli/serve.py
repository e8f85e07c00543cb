"""`edgepipe serve`: an OpenAI-compatible local server for one artifact.

The serve package (Starlette, uvicorn, prometheus-client: the `serve` extra) is imported inside
the handler, so `edgepipe run` and the other commands never load it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgepipe.cli.command import add_command

INSTALL_HINT = 'edgepipe serve needs the serve extra: pip install "edgepipe[serve]"'


def register(subparsers) -> None:
    parser = add_command(subparsers, "serve", cmd_serve)
    parser.add_argument("artifact", type=Path, help="artifact folder to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--model-name", help="model id clients send (default: folder name)")
    parser.add_argument("--api-key-file", type=Path, help="keys, one per line: name:key or key")
    parser.add_argument("--parallel", type=int, default=4, help="slots decoded together (4)")
    parser.add_argument("--max-queue", type=int, default=16, help="waiting requests (16)")
    parser.add_argument("--max-length", type=int, help="KV positions per slot (default 4096)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens (1024)")
    parser.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body cap")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds (600)")
    parser.add_argument("--rpm", type=float, help="requests per minute per key")
    parser.add_argument("--tpm", type=float, help="tokens per minute per key")
    parser.add_argument("--rate-window", type=float, default=60.0, help="--rpm/--tpm window (60 s)")
    parser.add_argument(
        "--prefix-cache-mb", type=int, default=256, help="memory for prompt prefixes (256; 0=off)"
    )
    parser.add_argument(
        "--prefill-budget", type=int, default=256, help="prompt tokens fed between steps (256)"
    )
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    parser.add_argument("--provider", help="execution provider (default: the artifact's)")
    parser.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds (30)")
    parser.add_argument(
        "--speculative",
        metavar="MODE",
        help="ngram: prompt-lookup speculative decoding of greedy requests that do not say (off)",
    )


def config_from_args(args: argparse.Namespace, serve_config, read_api_keys):
    """The `ServeConfig` the flags describe."""
    keys = read_api_keys(args.api_key_file) if args.api_key_file else {}
    return serve_config(
        artifact=args.artifact,
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        api_keys=keys,
        parallel=args.parallel,
        max_queue=args.max_queue,
        max_length=args.max_length,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        request_timeout_s=args.request_timeout,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        rate_window_s=args.rate_window,
        prefix_cache_bytes=args.prefix_cache_mb << 20,
        prefill_budget=args.prefill_budget,
        threads=args.threads,
        provider=args.provider,
        shutdown_grace_s=args.shutdown_grace,
        speculative=args.speculative,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve an artifact over an OpenAI-compatible HTTP API (chat, completions, metrics).

    Binds 127.0.0.1 by default. Concurrent requests share decode steps (--parallel slots,
    --max-queue waiting); --api-key-file turns on Bearer keys. See docs/serve.md.
    """
    try:
        from edgepipe.serve import ServeConfig, read_api_keys
        from edgepipe.serve.logs import to_stderr
        from edgepipe.serve.server import serve
    except ImportError as exc:
        print(f"error: {INSTALL_HINT} ({exc})", file=sys.stderr)
        return 2
    from edgepipe.runtime.speculative import SPECULATIVE

    if args.speculative not in (None, *SPECULATIVE):
        print(f"error: --speculative must be one of {SPECULATIVE}", file=sys.stderr)
        return 2
    if args.parallel < 1 or args.max_queue < 0:
        print("error: --parallel must be >= 1 and --max-queue >= 0", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args, ServeConfig, read_api_keys)
    except (OSError, ValueError) as exc:
        print(f"error: --api-key-file: {exc}", file=sys.stderr)
        return 2
    if not config.artifact.is_dir():
        print(f"error: {config.artifact}: no such artifact folder", file=sys.stderr)
        return 2
    to_stderr()
    where = f"http://{config.host}:{config.port}/v1"
    print(f"edgepipe serve: {config.served_name} on {where}", file=sys.stderr)
    return serve(config)
