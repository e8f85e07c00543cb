"""`SpinWatch`: "auto" spinning re-decided between calls from other processes' CPU use, and the
Generator re-opening its session when it changes (same tokens either way)."""

from __future__ import annotations

import pytest

from edgepipe.runtime import Generator
from edgepipe.runtime import options as runtime_options
from edgepipe.runtime import spin as runtime_spin
from edgepipe.runtime.spin import MIN_SWITCH_S, SpinWatch, watching
from tests.fixtures.toy import build_toy_artifact

SPIN = "session.intra_op.allow_spinning"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticks:
    """The cumulative (busy ticks of our CPUs, our own ticks) a watch samples; 100 per second."""

    def __init__(self):
        self.busy = self.own = 0

    def __call__(self) -> tuple[int, int]:
        return self.busy, self.own

    def elapse(self, clock: Clock, seconds: float, *, ours: float, others: float) -> None:
        clock.now += seconds
        self.own += round(100 * seconds * ours)
        self.busy += round(100 * seconds * (ours + others))


def watch_with(spinning: bool, clock: Clock, ticks, threads=None) -> SpinWatch:
    return SpinWatch(threads, spinning, sample=ticks, clock=clock, ticks_per_s=100)


def call(watch: SpinWatch, clock: Clock, ticks: Ticks, seconds: float, *, others: float) -> None:
    """One call of ours (2 cores of our own work) while others keep `others` cores busy."""
    watch.start()
    ticks.elapse(clock, seconds, ours=2.0, others=others)
    watch.stop()


@pytest.fixture(autouse=True)
def two_cores(monkeypatch):
    monkeypatch.setattr(runtime_spin, "usable_cores", lambda: 2)


def test_a_spinning_session_stops_when_other_work_appears_and_not_sooner():
    clock, ticks = Clock(), Ticks()
    watch = watch_with(True, clock, ticks)
    call(watch, clock, ticks, 1.0, others=0.0)
    assert watch.check() is None  # all the busy ticks were ours
    call(watch, clock, ticks, 1.0, others=1.0)
    assert watch.check() is None  # others used a core, but the session opened < 30 s ago
    ticks.elapse(clock, MIN_SWITCH_S, ours=0.0, others=0.0)
    call(watch, clock, ticks, 1.0, others=1.1)
    assert watch.check() is False  # others kept ~1.1 cores busy during our call
    assert watch.spinning is False


def test_what_others_do_while_we_are_idle_does_not_count():
    # A benchmark alternating contenders, or a user compiling between two requests: the CPUs
    # are busy between our calls, idle during them; spinning stays on.
    clock, ticks = Clock(), Ticks()
    watch = watch_with(True, clock, ticks)
    for _ in range(3):
        ticks.elapse(clock, MIN_SWITCH_S, ours=0.0, others=2.0)
        call(watch, clock, ticks, 2.0, others=0.0)
        assert watch.check() is None


def test_an_idle_machine_turns_spinning_back_on_and_short_calls_say_nothing():
    clock, ticks = Clock(), Ticks()
    watch = watch_with(False, clock, ticks)
    ticks.elapse(clock, MIN_SWITCH_S, ours=0.0, others=0.0)
    call(watch, clock, ticks, 0.1, others=0.0)
    assert watch.check() is None  # 0.1 s of calls is too short to judge
    call(watch, clock, ticks, 0.5, others=0.0)
    assert watch.check() is True  # 0.6 s of calls, everything busy was this process
    call(watch, clock, ticks, 1.0, others=0.0)
    assert watch.check() is None  # already spinning


def test_one_thread_may_spin_next_to_one_busy_core():
    clock, ticks = Clock(), Ticks()
    watch = watch_with(False, clock, ticks, threads=1)
    ticks.elapse(clock, 40.0, ours=0.0, others=1.0)
    watch.start()
    ticks.elapse(clock, 1.0, ours=1.0, others=1.0)
    watch.stop()
    assert watch.check() is True  # others kept one core busy; the other is ours


def test_without_proc_nothing_changes():
    clock = Clock()
    watch = watch_with(True, clock, lambda: None)
    watch.start()
    clock.now = 100.0
    watch.stop()
    assert watch.check() is None


def test_watching_marks_a_call_even_when_it_raises():
    clock, ticks = Clock(), Ticks()
    watch = watch_with(True, clock, ticks)
    with pytest.raises(RuntimeError), watching(watch):
        ticks.elapse(clock, 1.0, ours=2.0, others=1.5)
        raise RuntimeError("a call that fails still ran")
    clock.now += MIN_SWITCH_S
    assert watch.check() is False
    with watching(None):  # an explicit mode has no watch
        pass


def test_the_process_counters_read_back():
    busy, own = runtime_options.busy_ticks(), runtime_options.own_ticks()
    if busy is None:
        pytest.skip("no /proc on this platform")
    sum(i * i for i in range(300_000))  # burn a few ticks
    assert runtime_options.own_ticks() >= own
    assert runtime_options.busy_ticks() >= busy


@pytest.fixture(scope="module")
def toy(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(tmp_path_factory.mktemp("toy") / "artifact", qwen3_tokenizer_dir)


def spin_entry(gen: Generator) -> str:
    return gen.session.get_session_options().get_session_config_entry(SPIN)


def test_generator_reopens_its_session_when_the_watch_says_so(toy, monkeypatch):
    monkeypatch.setattr(runtime_options, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(runtime_options, "usable_cores", lambda: 2)
    gen = Generator(toy)
    assert spin_entry(gen) == "1"
    before = gen.generate([5, 6, 7], max_new_tokens=12, do_sample=False).token_ids
    decisions = iter([False, None])
    monkeypatch.setattr(gen.spin_watch, "check", lambda: next(decisions))
    old = gen.session
    after = gen.generate([5, 6, 7], max_new_tokens=12, do_sample=False).token_ids
    assert gen.session is not old and spin_entry(gen) == "0"
    assert after == before
    again = gen.session
    gen.generate([5, 6, 7], max_new_tokens=4, do_sample=False)
    assert gen.session is again  # no change asked: the same session


def test_generator_marks_its_calls_for_the_watch_streamed_or_whole(toy, monkeypatch):
    monkeypatch.setattr(runtime_options, "busy_cores", lambda: 0.0)
    gen = Generator(toy)
    marks = []
    monkeypatch.setattr(gen.spin_watch, "start", lambda: marks.append("start"))
    monkeypatch.setattr(gen.spin_watch, "stop", lambda: marks.append("stop"))
    gen.generate([5, 6, 7], max_new_tokens=4, do_sample=False)
    assert marks == ["start", "stop"]
    stream = gen.stream([5, 6, 7], max_new_tokens=8, do_sample=False)
    next(iter(stream))
    assert marks[-1] == "start"  # the call is still running
    list(stream)
    assert marks == ["start", "stop"] * 2


def test_explicit_modes_and_session_entries_are_never_re_decided(toy):
    assert Generator(toy, spinning="on").spin_watch is None
    assert Generator(toy, spinning="off").spin_watch is None
    assert Generator(toy, session_config={SPIN: "0"}).spin_watch is None
