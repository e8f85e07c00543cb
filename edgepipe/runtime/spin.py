"""Re-deciding "auto" spinning between calls, from what other processes did during them.

`spinning="auto"` decides when the session opens (`options.spinning_config`), but a process
lives on: an app opened on an idle laptop spins on when a build starts beside it, and spinning
threads next to other work lose badly (measured, quiet 2-core VM with one core kept busy after
the session opened, Qwen3-0.6B shape int4: 15.5-23.0 tok/s spinning vs 27.0-29.9 not). onnxruntime
fixes spinning per session, so `SpinWatch` tells the `Generator`, before a call, when the other
processes' CPU use during its recent calls says the opposite of what the session does; the
`Generator` then re-opens its session (about a second for a 0.5B model, once per change).

Other processes' use = ticks the CPUs this process may run on were busy (/proc/stat), less this
process's own CPU ticks (/proc/self/stat: its spinning counts as its own), over the wall time
of this process's calls only (`watching` marks them): what others do while it is idle does not
slow its kernels, and counting it made a benchmark that alternates contenders (or an app that
waits while its user compiles, then decodes on an idle machine) turn spinning off for nothing
(side_by_side.py, quiet, Qwen2.5-0.5B shape: "auto" decoded 65-76 tok/s after its first round
while "on" did 74-92). A change needs at least `MIN_INTERVAL_S` of call time (a short call
says little) and at least `MIN_SWITCH_S` since the last change (a load that comes and goes
must not re-open the session every call). Where /proc is missing nothing is re-decided.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from edgepipe.runtime.options import SPARE_SLACK, busy_ticks, own_ticks, usable_cores

MIN_INTERVAL_S = 0.5
MIN_SWITCH_S = 30.0


def tick_sample() -> tuple[int, int] | None:
    """(busy ticks of this process's CPUs, this process's CPU ticks), or None without /proc."""
    busy, own = busy_ticks(), own_ticks()
    return None if busy is None or own is None else (busy, own)


class SpinWatch:
    """Whether a session that spins (or not) still should, judged between calls.

    Args:
        threads: the session's intra-op threads (None: one per usable core).
        spinning: whether the session spins now.
        sample: (busy ticks, own ticks) reader (`tick_sample`; tests pass their own).
        clock: seconds, monotonic.
        ticks_per_s: the tick rate of both counters (USER_HZ).
    """

    def __init__(
        self,
        threads: int | None,
        spinning: bool,
        *,
        sample: Callable[[], tuple[int, int] | None] = tick_sample,
        clock: Callable[[], float] = time.monotonic,
        ticks_per_s: float | None = None,
    ):
        self.threads, self.spinning = threads, spinning
        self._sample, self._clock = sample, clock
        self._ticks_per_s = ticks_per_s or _clock_ticks()
        self._call: tuple[float, tuple[int, int] | None] | None = None
        self._wall = 0.0  # call time since the last decision...
        self._others = 0  # ...and other processes' ticks during it
        self._changed = clock()

    def start(self) -> None:
        """A call of this process begins."""
        self._call = (self._clock(), self._sample())

    def stop(self) -> None:
        """The call `start` began has ended: count what other processes did meanwhile."""
        if self._call is None:
            return
        (then, before), self._call = self._call, None
        sample = self._sample()
        if sample is not None and before is not None:
            self._wall += self._clock() - then
            self._others += (sample[0] - before[0]) - (sample[1] - before[1])

    def check(self) -> bool | None:
        """The spinning to switch to now, or None to keep the session as it is."""
        now = self._clock()
        if self._wall < MIN_INTERVAL_S:
            return None
        others = self._others / self._ticks_per_s / self._wall
        self._wall, self._others = 0.0, 0
        cores = usable_cores()
        want = max(others, 0.0) + (self.threads or cores) <= cores + SPARE_SLACK
        if want == self.spinning or now - self._changed < MIN_SWITCH_S:
            return None
        self.spinning, self._changed = want, now
        return want


@contextmanager
def watching(watch: SpinWatch | None) -> Iterator[None]:
    """Mark a call for `watch` (None: nothing to mark)."""
    if watch is None:
        yield
        return
    watch.start()
    try:
        yield
    finally:
        watch.stop()


def _clock_ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0
