"""`edgepipe run`, `edgepipe chat` and `edgepipe bench`: the runtime from the command line.

Only `edgepipe.runtime` is imported, inside the handlers (plus the stdlib-only
`edgepipe.process`), so these commands never load the build side. Runtime errors
(`GeneratorError`, bad parameter values) print `error: ...` and exit with code 2, like the
build side's `InvalidInput`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from edgepipe.cli.command import add_command
from edgepipe.process import peak_rss_bytes

# Sampling flags shared by run and chat; any of them (without --greedy) turns sampling on.
_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "seed")


def register(subparsers) -> None:
    """Add the `run`, `chat` and `bench` subcommands."""
    run = add_command(subparsers, "run", cmd_run)
    _artifact_args(run)
    run.add_argument("prompt", help="prompt text, or - to read it from stdin")
    run.add_argument("--chat", action="store_true", help="wrap the prompt as a user message")
    run.add_argument("--no-think", action="store_true", help="Qwen3: turn thinking off (--chat)")
    run.add_argument("--json", action="store_true", help="print the result and metrics as JSON")
    _sampling_args(run)

    chat = add_command(subparsers, "chat", cmd_chat)
    _artifact_args(chat)
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--no-think", action="store_true", help="Qwen3: start with thinking off")
    chat.add_argument("--thinking-budget", type=int, help="thinking tokens per turn at most")
    _prefix_arg(chat, None, "default: the runtime's, 256")
    _sampling_args(chat)

    bench = add_command(subparsers, "bench", cmd_bench)
    _artifact_args(bench)
    bench.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    bench.add_argument("--gen-len", type=int, default=64, help="generated tokens (default 64)")
    bench.add_argument("--repeat", type=int, default=3, help="timed runs (default 3)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    bench.add_argument("--batch", type=int, default=1, help="prompts per call (default 1)")
    # Off by default: every run repeats the prompt, so a cache would time a 2-token prefill.
    _prefix_arg(bench, 0, "default 0: the runs repeat one prompt; N times the reuse path")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")


def _artifact_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact (or bare export) folder")
    parser.add_argument("--provider", help="execution provider (default: the artifact's)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    parser.add_argument("--max-length", type=int, help="cap on KV positions (prompt + output)")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="check the manifest's sha256 sums (default; each file is hashed once, then "
        "re-hashed only when it changes); --no-verify skips it",
    )
    parser.add_argument(
        "--spin",
        choices=("auto", "on", "off"),
        help="intra-op thread spinning (default auto: a bounded spin while every thread has "
        "a core to itself; on; off)",
    )


def _prefix_arg(parser: argparse.ArgumentParser, default: int | None, note: str) -> None:
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=default,
        metavar="N",
        help=f"memory for earlier prompts' KV, reused by prompts that start alike ({note}; 0=off)",
    )


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding")
    mode.add_argument("--sample", action="store_true", help="sample (defaults otherwise)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--stop", action="append", default=None, help="stop string (repeatable)", metavar="TEXT"
    )


def _params(args) -> dict:
    params = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop_strings": args.stop,
    }
    if args.greedy:
        params["do_sample"] = False
    elif args.sample or any(getattr(args, f) is not None for f in _SAMPLING_FLAGS):
        params["do_sample"] = True
    return params


def _open(args):
    from edgepipe.runtime import Generator

    prefix_mb = getattr(args, "prefix_cache_mb", None)
    if prefix_mb is not None and prefix_mb < 0:
        raise ValueError("--prefix-cache-mb must be >= 0")
    gen = Generator(
        args.artifact,
        args.provider,
        verify=args.verify,
        max_length=args.max_length,
        intra_op_num_threads=args.threads,
        spinning=args.spin,
        prefix_cache_bytes=None if prefix_mb is None else prefix_mb << 20,
    )
    if args.verify and gen.artifact.verification != "verified":
        print(
            f"warning: {args.artifact}: {gen.artifact.verification}; its files may be corrupt "
            "(--no-verify silences this)",
            file=sys.stderr,
        )
    return gen


def _read_stdin() -> str:
    """All of stdin as UTF-8 text; bytes that are not UTF-8 raise `ValueError` saying so."""
    buffer = getattr(sys.stdin, "buffer", None)
    return sys.stdin.read() if buffer is None else _utf8(buffer.read(), "stdin")


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _guarded(handler):
    """Turn runtime errors into `error: ...` on stderr and exit code 2."""

    def wrapper(args) -> int:
        from edgepipe.runtime import GeneratorError

        try:
            return handler(args)
        except (GeneratorError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            if getattr(args, "json", False):
                # Scripts that read the JSON report (`--json > report.json`) get one either way.
                print(json.dumps({"ok": False, "exit_code": 2, "error": str(exc)}, indent=2))
            return 2

    return wrapper


@_guarded
def _run(args) -> int:
    gen = _open(args)
    prompt = _read_stdin() if args.prompt == "-" else args.prompt
    params = _params(args)
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        enable = False if args.no_think else None
        stream = gen.chat_stream(messages, enable_thinking=enable, **params)
    else:
        stream = gen.stream(prompt, **params)
    if args.json:
        for _ in stream:
            pass
        print(json.dumps(stream.result.to_dict(), ensure_ascii=False, indent=2))
        return 0
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_run(args) -> int:
    """Generate from a prompt, streaming the text to stdout.

    edgepipe run ARTIFACT "The capital of France is" --max-new-tokens 32
    edgepipe run ARTIFACT "Hi" --chat --no-think --json
    """
    return _run(args)


@_guarded
def _chat(args) -> int:
    from edgepipe.runtime import ChatSession

    gen = _open(args)
    session = ChatSession(
        gen,
        system=args.system,
        enable_thinking=False if args.no_think else None,
        thinking_budget=args.thinking_budget,
        **_params(args),
    )
    interactive = sys.stdin.isatty()
    if interactive:
        print("edgepipe chat: /reset clears history, /think on|off, /exit quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        try:
            line = _read_line()
        except ValueError as exc:  # one undecodable line ends that line, not the session
            print(f"error: {exc}", file=sys.stderr)
            continue
        if line is None:
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command and not _chat_command(session, command):
            _reply(session, line)
    return 0


def _read_line() -> str | None:
    """The next stdin line without its newline (None at the end); not UTF-8: `ValueError`."""
    buffer = getattr(sys.stdin, "buffer", None)
    raw = sys.stdin.readline() if buffer is None else buffer.readline()
    if not raw:
        return None
    text = raw if isinstance(raw, str) else _utf8(raw, "this line")
    return text.rstrip("\r\n")


def _chat_command(session, command: str) -> bool:
    """Handle a /command; False when `command` is a user turn."""
    if command == "/reset":
        session.reset()
        print("[history cleared]")
    elif command in ("/think on", "/think off"):
        session.enable_thinking = command.endswith("on")
        print(f"[thinking {'on' if session.enable_thinking else 'off'}]")
    elif command.startswith("/"):
        print("[commands: /reset, /think on, /think off, /exit]")
    else:
        return False
    return True


def _reply(session, text: str) -> None:
    """Stream one reply. The history is trimmed from the oldest turn when it outgrows the
    context; a bad line or Ctrl-C ends this reply only (the turn is not kept)."""
    from edgepipe.runtime import GeneratorError, PromptTooLong

    dropped = 0
    try:
        while True:
            stream = session.send_stream(text)
            try:
                first = next(stream, None)
            except PromptTooLong:
                if not session.drop_oldest_turn():
                    raise
                dropped += 1
                continue
            break
        if dropped:
            print(f"[context full: dropped the {dropped} oldest turn(s); system prompt kept]")
        if first is not None:
            sys.stdout.write(first)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n[reply interrupted]\n")
    except (GeneratorError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    sys.stdout.flush()


def cmd_chat(args) -> int:
    """Chat with a model interactively (reads stdin, so input can be piped).

    Lines are user turns; /reset clears the history, /think on|off switches Qwen3 thinking,
    /exit quits. The KV cache is kept between turns.
    """
    return _chat(args)


@_guarded
def _bench(args) -> int:
    import numpy as np

    for name in ("prompt_len", "gen_len", "repeat", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    gen = _open(args)
    rng = np.random.default_rng(0)
    # Ordinary BPE ids only (special tokens start at 151643); greedy with no stop tokens so every
    # run generates exactly --gen-len tokens.
    prompts = rng.integers(100, 150000, size=(args.batch, args.prompt_len)).tolist()
    prompt = prompts[0] if args.batch == 1 else prompts
    params = {"max_new_tokens": args.gen_len, "do_sample": False, "stop_token_ids": []}
    for _ in range(max(0, args.warmup)):
        gen.generate(prompt, **params)
    runs = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        result = gen.generate(prompt, **params)
        metrics = (result[0] if isinstance(result, list) else result).metrics
        runs.append((metrics, time.perf_counter() - started))
    median = lambda values: float(np.median(values))  # noqa: E731
    report = {
        "artifact": str(args.artifact),
        "provider": gen.provider,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "repeat": args.repeat,
        "prefill_tokens_per_s": median([m.prefill_tokens_per_s for m, _ in runs]),
        "decode_tokens_per_s": median([m.decode_tokens_per_s for m, _ in runs]),
        "time_to_first_token_s": median([m.time_to_first_token_s for m, _ in runs]),
        "total_s": median([s for _, s in runs]),
        "kv_bytes": runs[-1][0].kv_bytes,
        "prefix_reused_tokens": runs[-1][0].prefix_reused_tokens,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rss = report["peak_rss_bytes"]
        print(
            f"prefill {report['prefill_tokens_per_s']:.1f} tok/s  "
            f"decode {report['decode_tokens_per_s']:.1f} tok/s  "
            f"TTFT {report['time_to_first_token_s'] * 1000:.1f} ms  "
            f"KV {report['kv_bytes'] / 2**20:.1f} MiB  "
            f"peak RSS {'n/a' if rss is None else f'{rss / 2**20:.0f} MiB'}"
        )
    return 0


def cmd_bench(args) -> int:
    """Measure prefill and decode speed, time to first token and peak RSS.

    edgepipe bench ARTIFACT --prompt-len 64 --gen-len 64 --repeat 3 --json
    """
    return _bench(args)
