"""The model side of the server: a `Generator`, its `SlotBatch` and the scheduler thread.

`Runner.open` loads the artifact with the runtime's public `Generator` (tokenizer, chat template,
generation defaults, the engine) and builds the continuous batch on the generator's engine.
`stream_events` is how a handler waits for its job: it enforces the request timeout and, for
non-streamed responses, notices a client that went away, cancelling the job either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from edgepipe.runtime import Generator
from edgepipe.runtime.batch import Emission, RowRequest, SlotBatch
from edgepipe.runtime.prefix import PrefixCache
from edgepipe.serve.errors import APIError, bad_request, overloaded, timed_out
from edgepipe.serve.scheduler import Finished, Job, Scheduler

# KV positions per slot when --max-length is not given: long enough for chat, and with lazily
# mapped buffers only the positions a request touches become resident memory.
DEFAULT_SLOT_LENGTH = 4096
# How often a non-streamed request checks that its client is still connected (seconds).
DISCONNECT_POLL_S = 0.1


class Runner:
    """The loaded model and its scheduler.

    Args:
        gen: the generator (its engine, tokenizer, template and defaults are used).
        batch: the slots.
        scheduler: the thread driving `batch`.

    Attributes:
        capacity: KV positions per slot.
    """

    def __init__(self, gen: Generator, batch: SlotBatch, scheduler: Scheduler):
        self.gen, self.batch, self.scheduler = gen, batch, scheduler
        self.capacity = batch.capacity
        self._started = False

    @classmethod
    def open(cls, config, metrics=None, *, start: bool = True) -> Runner:
        """Load `config.artifact` and (by default) start the scheduler thread.

        Raises:
            GeneratorError: the artifact does not load, or is not a dynamic one.
        """
        gen = Generator(
            config.artifact,
            provider=config.provider,
            intra_op_num_threads=config.threads,
            max_length=config.max_length,
        )
        capacity = config.max_length or min(gen.context_length, DEFAULT_SLOT_LENGTH)
        prefix = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes else None
        batch = SlotBatch(
            gen.engine,
            gen.tokenizer,
            slots=config.parallel,
            capacity=capacity,
            eos_token_ids=gen.artifact.eos_token_ids,
            pad_token_id=gen.artifact.pad_token_id,
            prefix_cache=prefix,
            token_bytes=gen.token_bytes,  # the generator's table: built once per server
        )
        scheduler = Scheduler(
            batch, max_queue=config.max_queue, prefill_budget=config.prefill_budget
        )
        runner = cls(gen, batch, scheduler)
        if metrics is not None:
            runner.attach(metrics)
        if start:
            runner.start()
        return runner

    def attach(self, metrics) -> None:
        """Report to `metrics` (a `ServerMetrics`); call before `start`."""
        self.scheduler.metrics = metrics
        metrics.slots.set(self.batch.slots)

    def start(self) -> None:
        """Start the scheduler thread (once)."""
        if not self._started:
            self._started = True
            self.scheduler.start()

    def submit(self, request: RowRequest) -> Job:
        """Queue a row for the scheduler (call from the event loop).

        Raises:
            APIError: 503 when the queue is full.
        """
        job = Job(request, asyncio.get_running_loop())
        self.scheduler.submit(job)
        return job

    def close(self) -> None:
        """Cancel whatever still runs and stop the scheduler."""
        self.scheduler.stop()


def job_error(error: BaseException) -> APIError:
    """The response for a job the scheduler failed."""
    if isinstance(error, ValueError):  # PromptTooLong and bad prompts
        return bad_request(str(error))
    if isinstance(error, RuntimeError) and "shutting down" in str(error):
        return overloaded("The server is shutting down")
    return APIError(500, f"Generation failed: {error}", type="server_error")


async def stream_events(job: Job, state, is_disconnected) -> AsyncIterator[Emission]:
    """The job's emissions until it is done.

    Args:
        job: a submitted job.
        state: the server state (its request timeout and metrics).
        is_disconnected: an async callable telling whether the client left, or None when the
            response streams (Starlette then cancels the stream itself on disconnect).

    A caller that stops reading before the last emission cancels the job (counted as
    cancelled) unless it called `job.end_early()` first.

    Raises:
        APIError: 504 past the request timeout, 499 when the client left, the job's error.
    """
    timeout = state.config.request_timeout_s
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    checked = loop.time()
    done = False
    try:
        while True:
            now = loop.time()
            if now >= deadline:
                raise timed_out(timeout)
            if is_disconnected is not None and now - checked >= DISCONNECT_POLL_S:
                checked = now
                if await is_disconnected():
                    raise APIError(499, "The client disconnected")
            wait = min(deadline - now, DISCONNECT_POLL_S)
            try:
                event = await asyncio.wait_for(job.events.get(), wait)
            except asyncio.TimeoutError:
                continue
            if isinstance(event, Finished):
                done = True
                if event.error is None:
                    raise APIError(499, "The request was cancelled")
                raise job_error(event.error)
            yield event
            if event.done:
                done = True
                return
    finally:
        if not done and not job.ended_early:
            job.cancel()
            state.metrics.cancelled.inc()
