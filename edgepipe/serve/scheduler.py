"""The scheduler: one thread that owns the `SlotBatch` and runs its decode steps.

onnxruntime calls block (and release the GIL), so they run on a worker thread while the event
loop keeps serving HTTP. Requests reach the thread through a bounded waiting list; between two
decode steps the thread drops cancelled rows, lets waiting requests join free slots (each
prefilled alone), then runs one step for every active row. Results go back to each request's
`asyncio.Queue` with `loop.call_soon_threadsafe`. A request whose client disconnected sets its
`cancelled` flag and loses its slot before the next step, so it costs at most one more step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass

from edgepipe.runtime.batch import Emission, RowRequest, SlotBatch
from edgepipe.serve.errors import overloaded


@dataclass
class Finished:
    """The last event of a job that did not end with a token: an error or a cancellation."""

    error: BaseException | None = None


class Job:
    """One request on its way through the scheduler.

    Args:
        request: the row to generate.
        loop: the event loop of the HTTP handler waiting for it.

    Attributes:
        events: `Emission`s, then (only on failure or cancellation) a `Finished`.
        reused: prompt tokens taken from the prefix cache (set when it joins).
        ended_early: the handler stopped the row because the reply was complete.
        submitted, first_token_at: perf_counter times.
    """

    def __init__(self, request: RowRequest, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.ended_early = False
        self.reused = 0
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        """Ask the scheduler to drop this job before its next step (thread-safe)."""
        self.cancelled.set()

    def end_early(self) -> None:
        """The handler has the whole reply before the row stopped (its one tool call, with
        `parallel_tool_calls: false`): free the slot like a cancellation, but not as one."""
        self.ended_early = True
        self.cancelled.set()

    def push(self, event) -> None:
        """Hand an event to the waiting handler (called from the scheduler thread)."""
        # A closed loop raises RuntimeError: nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """Continuous batching over a `SlotBatch`.

    Args:
        batch: the slots.
        max_queue: jobs waiting for a slot at most.
        metrics: a `ServerMetrics` (gauges updated each step), or None.
        prefill_budget: prompt tokens fed between two decode steps (at least one chunk): a long
            prompt is fed over several steps instead of stalling the rows already decoding.
    """

    def __init__(
        self, batch: SlotBatch, *, max_queue: int, metrics=None, prefill_budget: int = 256
    ):
        self.batch, self.max_queue, self.metrics = batch, max_queue, metrics
        self.prefill_budget = prefill_budget
        self._prefilling: deque[int] = deque()  # slots whose prompt is being fed, oldest first
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="edgepipe-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Jobs waiting or running."""
        with self._cond:
            return len(self._waiting) + len(self._running)

    def submit(self, job: Job) -> None:
        """Queue `job`.

        Raises:
            APIError: 503 when every slot is busy and the queue is full, or while shutting down.
        """
        with self._cond:
            if not self._accepting:
                raise overloaded("The server is shutting down")
            if len(self._waiting) + len(self._running) >= self.batch.slots + self.max_queue:
                raise overloaded(
                    f"All {self.batch.slots} slots are busy and {self.max_queue} requests are "
                    "queued; retry later"
                )
            self._waiting.append(job)
            self._cond.notify()

    def stop_accepting(self) -> None:
        """Refuse new jobs (503); running and queued ones go on."""
        with self._cond:
            self._accepting = False

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job and end the thread."""
        with self._cond:
            self._accepting, self._stop = False, True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
            self._drop_cancelled()
            self._admit()
            self._prefill()
            if any(not self.batch.prefilling(slot) for slot in self._running):
                self._step()
            self._observe()
        for job in list(self._waiting) + list(self._running.values()):
            job.push(Finished(RuntimeError("server shutting down")))
        with self._cond:
            self._waiting.clear()
            self._running.clear()

    def _drop_cancelled(self) -> None:
        with self._cond:
            for job in [j for j in self._waiting if j.cancelled.is_set()]:
                self._waiting.remove(job)
                job.push(Finished())
            for slot, job in list(self._running.items()):
                if job.cancelled.is_set():
                    self.batch.cancel(slot)
                    del self._running[slot]
                    if slot in self._prefilling:
                        self._prefilling.remove(slot)
                    job.push(Finished())

    def _admit(self) -> None:
        while self.batch.free:
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            try:
                slot = self.batch.join(job.request)
            except Exception as exc:  # a bad prompt fails its own request, not the server
                job.push(Finished(exc))
                continue
            job.reused = self.batch.reused(slot)
            with self._cond:
                self._running[slot] = job
            self._prefilling.append(slot)

    def _prefill(self) -> None:
        """Feed waiting prompts, oldest first, up to the budget; send each first token at once."""
        budget = self.prefill_budget
        while self._prefilling and budget > 0:
            slot = self._prefilling[0]
            job = self._running[slot]
            try:
                budget -= self.batch.prefill(slot, budget)
            except Exception as exc:  # onnxruntime failed on this prompt: fail its request only
                self._prefilling.popleft()
                self.batch.cancel(slot)
                with self._cond:
                    del self._running[slot]
                job.push(Finished(exc))
                continue
            if self.batch.prefilling(slot):
                return
            self._prefilling.popleft()
            # The first token goes out now, not after the other prompts and a decode step.
            self._deliver(self.batch.sample(slot), time.perf_counter())

    def _step(self) -> None:
        try:
            emissions = self.batch.step()
        except Exception as exc:  # onnxruntime failed: fail the jobs in the step, keep serving
            with self._cond:
                running, self._running = self._running, {}
            self._prefilling.clear()
            for slot, job in running.items():
                self.batch.cancel(slot)
                job.push(Finished(exc))
            return
        now = time.perf_counter()
        for emission in emissions:
            self._deliver(emission, now)

    def _deliver(self, emission: Emission, now: float) -> None:
        job = self._running.get(emission.slot)
        if job is None:
            return
        if self.metrics is not None:
            if job.first_token_at is None:
                self.metrics.ttft.observe(now - job.submitted)
            else:
                self.metrics.itl.observe(now - job.last_token_at)
            self.metrics.generated_tokens.inc()
        if job.first_token_at is None:
            job.first_token_at = now
        job.last_token_at = now
        if emission.done:
            with self._cond:
                self._running.pop(emission.slot, None)
        job.push(emission)

    def _observe(self) -> None:
        m = self.metrics
        if m is None:
            return
        with self._cond:
            m.queue_depth.set(len(self._waiting))
            m.active.set(len(self._running))
        m.kv_bytes.set(self.batch.kv_bytes_in_use)
        m.observe_speculation(self.batch.stats)
        prefix = self.batch.prefix_cache
        if prefix is not None:
            m.observe_prefix(prefix.stats, prefix.nbytes)
