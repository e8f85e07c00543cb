"""The Starlette application: OpenAI's endpoints over the scheduler.

`create_app(config)` returns the ASGI app. The model loads on a background thread when the app
starts, so `/health` answers 503 ("loading") at once and 200 when the first request can run;
the other endpoints answer 503 until then. Each request: API key (401) -> request bucket (429)
-> body size (413) -> schema (400) -> model name (404) -> prompt, limits, tools and response
format (400; run on a worker thread: a first constraint compiles for seconds) -> token bucket
(429) -> queue (503) -> generation, streamed as SSE or returned whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from functools import partial

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgepipe.runtime.batch import RowRequest
from edgepipe.serve.config import ServeConfig
from edgepipe.serve.errors import APIError, bad_request, model_not_found, overloaded, too_large
from edgepipe.serve.limits import KeyRing, RateLimits
from edgepipe.serve.logs import log_request
from edgepipe.serve.metrics import ServerMetrics
from edgepipe.serve.prompts import prepare_chat, prepare_completion
from edgepipe.serve.replies import StreamedReply
from edgepipe.serve.responses import TOOL_CALLS, ChunkWriter, Outcome, full_response
from edgepipe.serve.runner import Runner, stream_events
from edgepipe.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    include_usage,
    parse,
    refuse_unsupported,
)


class ServerState:
    """Everything the handlers share: config, keys, limits, metrics and (once loaded) the model.

    Args:
        config: the settings.
        runner: a `Runner` already loaded (tests), or None to load one in the background.
    """

    def __init__(self, config: ServeConfig, runner: Runner | None = None):
        self.config = config
        self.keys = KeyRing(config.api_keys)
        self.limits = RateLimits(
            config.requests_per_minute, config.tokens_per_minute, config.rate_window_s
        )
        self.metrics = ServerMetrics()
        self.runner = runner
        self.load_error: str | None = None
        self.draining = False

    def load(self) -> None:
        """Open the artifact and start the scheduler (run on a worker thread)."""
        try:
            self.runner = Runner.open(self.config, self.metrics)
        except Exception as exc:  # reported by /health and every endpoint, not a crash
            self.load_error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> Runner:
        """The loaded runner.

        Raises:
            APIError: 503 while loading, shutting down, or when loading failed.
        """
        if self.draining:
            raise overloaded("The server is shutting down")
        if self.runner is None:
            reason = f"failed to load: {self.load_error}" if self.load_error else "loading"
            raise overloaded(f"The model is not ready ({reason})", retry_after=5)
        return self.runner


def create_app(config: ServeConfig, runner: Runner | None = None) -> Starlette:
    """The ASGI app serving `config.artifact` (or `runner`, already loaded)."""
    state = ServerState(config, runner)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if state.runner is None:
            threading.Thread(target=state.load, name="edgepipe-load", daemon=True).start()
        else:
            state.runner.attach(state.metrics)
            state.runner.start()
        yield
        state.draining = True
        if state.runner is not None:
            await asyncio.to_thread(state.runner.close)

    routes = [
        Route("/health", partial(health, state), methods=["GET"]),
        Route("/metrics", partial(metrics, state), methods=["GET"]),
        Route("/v1/models", partial(models, state), methods=["GET"]),
        Route("/v1/models/{model:path}", partial(models, state), methods=["GET"]),
        Route("/v1/chat/completions", partial(complete, state, "chat"), methods=["POST"]),
        Route("/v1/completions", partial(complete, state, "completion"), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.serve = state
    return app


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def health(state: ServerState, request: Request) -> Response:
    """200 when requests can run, 503 while loading (or draining, or after a failed load)."""
    try:
        state.ready()
    except APIError as exc:
        return JSONResponse({"status": "unavailable", "detail": exc.message}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(state: ServerState, request: Request) -> Response:
    try:
        state.keys.identify(request.headers.get("authorization"))
    except APIError as exc:
        return error_response(exc)
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


async def models(state: ServerState, request: Request) -> Response:
    """`/v1/models` (the list) and `/v1/models/{model}` (one entry, or 404)."""
    try:
        state.keys.identify(request.headers.get("authorization"))
    except APIError as exc:
        return error_response(exc)
    name = state.config.served_name
    created = int(state.config.artifact.stat().st_mtime) if state.config.artifact.exists() else 0
    entry = {"id": name, "object": "model", "created": created, "owned_by": "edgepipe"}
    asked = request.path_params.get("model")
    if asked is None:
        return JSONResponse({"object": "list", "data": [entry]})
    if asked != name:
        return error_response(model_not_found(asked, name))
    return JSONResponse(entry)


async def read_body(request: Request, limit: int):
    """The JSON body, refusing more than `limit` bytes without reading them all.

    Raises:
        APIError: 413 over the limit, 400 for invalid JSON.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON") from None


async def complete(state: ServerState, kind: str, request: Request) -> Response:
    """`/v1/chat/completions` and `/v1/completions`."""
    endpoint = request.url.path
    started = time.perf_counter()
    key = None
    try:
        key = state.keys.identify(request.headers.get("authorization"))
        state.limits.admit_request(key)
        body = await read_body(request, state.config.max_body_bytes)
        runner = state.ready()
        req = parse(ChatRequest if kind == "chat" else CompletionRequest, body)
        if req.model != state.config.served_name:
            raise model_not_found(req.model, state.config.served_name)
        refuse_unsupported(req)
        prepare = prepare_chat if kind == "chat" else prepare_completion
        # Off the event loop: templates, tokenizing and a first constraint's compile take time.
        prepared = await asyncio.to_thread(prepare, req, runner.gen, state.config, runner.capacity)
        state.limits.admit_tokens(key, len(prepared.prompt))
        p = prepared.params
        job = runner.submit(
            RowRequest(
                prepared.prompt,
                p,
                p.stop_token_ids,
                prepared.thinking,
                prepared.constraint,
                prepared.speculative,
            )
        )
    except APIError as exc:
        state.metrics.requests.labels(endpoint, str(exc.status)).inc()
        log_request(
            endpoint=endpoint,
            key=key,
            status=exc.status,
            error=exc.message,
            total_s=round(time.perf_counter() - started, 4),
        )
        return error_response(exc)
    state.metrics.prompt_tokens.inc(len(prepared.prompt))
    out = Outcome(kind, state.config.served_name, len(prepared.prompt))
    ctx = RequestContext(state, endpoint, key, job, out, prepared, started)
    if req.stream:
        return StreamingResponse(
            stream_body(ctx, include_usage(req)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await whole_body(ctx, request)


class RequestContext:
    """One admitted request: where it came from, its job and what it produced so far."""

    def __init__(self, state, endpoint, key, job, out, prepared, started):
        self.state, self.endpoint, self.key, self.job = state, endpoint, key, job
        self.out, self.prepared, self.started = out, prepared, started

    def finish(self, status: int, error: str | None = None) -> None:
        """Count, charge and log the request once it is over."""
        state, out, job = self.state, self.out, self.job
        state.metrics.requests.labels(self.endpoint, str(status)).inc()
        state.limits.charge_generated(self.key, out.completion_tokens)
        out.cached_tokens = job.reused
        first = job.first_token_at
        log_request(
            id=out.id,
            endpoint=self.endpoint,
            key=self.key,
            status=status,
            prompt_tokens=out.prompt_tokens,
            cached_tokens=job.reused,
            completion_tokens=out.completion_tokens,
            finish_reason=out.finish_reason,
            ttft_s=None if first is None else round(first - job.submitted, 4),
            total_s=round(time.perf_counter() - self.started, 4),
            error=error,
        )


def streamed_reply(prepared) -> StreamedReply:
    """The splitter of a request's reply into reasoning, content and tool calls."""
    return StreamedReply(
        started=prepared.thinking_started,
        reasoning=prepared.reasoning,
        structured=prepared.structured,
    )


async def whole_body(ctx: RequestContext, request: Request) -> Response:
    """Wait for the whole generation, then answer with one JSON body."""
    out, texts, prepared = ctx.out, [], ctx.prepared
    # Only watched to stop at the first call when parallel tool calls are off.
    one_call = prepared.structured.parses_calls and not prepared.structured.parallel
    watch = streamed_reply(prepared) if one_call else None
    try:
        events = stream_events(ctx.job, ctx.state, request.is_disconnected)
        async with contextlib.aclosing(events):
            async for emission in events:
                texts.append(emission.text)
                out.completion_tokens += 1
                out.finish_reason = emission.finish_reason
                if watch is not None and not emission.done:
                    watch.push(emission.text)
                    if watch.complete:
                        ctx.job.end_early()
                        break
    except APIError as exc:
        ctx.finish(exc.status, exc.message)
        return error_response(exc)
    out.text = "".join(texts)
    out.cached_tokens = ctx.job.reused
    body = full_response(
        out,
        reasoning=prepared.reasoning,
        started=prepared.thinking_started,
        structured=prepared.structured,
    )
    ctx.finish(200)
    return JSONResponse(body)


async def stream_body(ctx: RequestContext, usage: bool):
    """The SSE body; closing it early (client gone) cancels the generation."""
    out = ctx.out
    writer = ChunkWriter(out, usage=usage)
    reply = streamed_reply(ctx.prepared)
    status, error = 200, None
    try:
        yield writer.first()
        events = stream_events(ctx.job, ctx.state, None)
        async with contextlib.aclosing(events):
            async for emission in events:
                out.completion_tokens += 1
                deltas = reply.push(emission.text)
                last = emission.done or reply.complete
                if last:
                    deltas += reply.close()
                    out.finish_reason = TOOL_CALLS if reply.tool_calls else emission.finish_reason
                    out.cached_tokens = ctx.job.reused
                    if not emission.done:
                        ctx.job.end_early()  # the reply's one tool call is complete
                chunk = writer.deltas(deltas, out.finish_reason if last else None)
                if chunk:
                    yield chunk
                if last:
                    break
        yield writer.end()
    except APIError as exc:
        status, error = exc.status, exc.message
        yield f"data: {json.dumps(exc.body())}\n\n"
    except BaseException:  # cancelled: the client disconnected
        status, error = 499, "client disconnected"
        ctx.job.cancel()
        raise
    finally:
        ctx.job.cancel()  # no-op when done; frees the slot when the stream was abandoned
        ctx.finish(status, error)
