"""`SpinWatch`: "auto" spinning re-decided between calls from other processes' CPU use, and the
Generator re-opening its session when it changes (same tokens either way)."""

from __future__ import annotations

import pytest

from edgepipe.runtime import Generator
from edgepipe.runtime import options as runtime_options
from edgepipe.runtime import spin as runtime_spin
from edgepipe.runtime.spin import MIN_SWITCH_S, SpinWatch
from tests.fixtures.toy import build_toy_artifact

SPIN = "session.intra_op.allow_spinning"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watch_with(samples, spinning: bool, clock: Clock, threads=None) -> SpinWatch:
    feed = iter(samples)
    return SpinWatch(threads, spinning, sample=lambda: next(feed), clock=clock, ticks_per_s=100)


@pytest.fixture(autouse=True)
def two_cores(monkeypatch):
    monkeypatch.setattr(runtime_spin, "usable_cores", lambda: 2)


def test_a_spinning_session_stops_when_other_work_appears_and_not_sooner():
    clock = Clock()
    # (busy ticks of our CPUs, our own ticks); 100 ticks per second.
    samples = [(0, 0), (100, 100), (400, 300), (4000, 500)]
    watch = watch_with(samples, True, clock)
    clock.now = 1.0
    assert watch.check() is None  # 1 s: all the busy ticks were ours
    clock.now = 2.0
    assert watch.check() is None  # others used 1 core, but the session opened < 30 s ago
    clock.now = MIN_SWITCH_S + 3.0
    assert watch.check() is False  # others kept ~1.1 cores busy over the last 31 s
    assert watch.spinning is False


def test_an_idle_machine_turns_spinning_back_on_and_short_calls_say_nothing():
    clock = Clock()
    samples = [(0, 0), (10, 5), (1000, 995), (2000, 1995)]
    watch = watch_with(samples, False, clock)
    clock.now = 0.1
    assert watch.check() is None  # 0.1 s is too short to judge
    clock.now = MIN_SWITCH_S + 1.0
    assert watch.check() is True  # everything busy was this process
    clock.now = MIN_SWITCH_S + 2.0
    assert watch.check() is None  # already spinning


def test_one_thread_may_spin_next_to_one_busy_core():
    clock = Clock()
    watch = watch_with([(0, 0), (100 * 40, 0)], False, clock, threads=1)
    clock.now = 40.0
    assert watch.check() is True  # others kept one core busy; the other is ours


def test_without_proc_nothing_changes():
    clock = Clock()
    watch = watch_with([None, None], True, clock)
    clock.now = 100.0
    assert watch.check() is None


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


def test_explicit_modes_and_session_entries_are_never_re_decided(toy):
    assert Generator(toy, spinning="on").spin_watch is None
    assert Generator(toy, spinning="off").spin_watch is None
    assert Generator(toy, session_config={SPIN: "0"}).spin_watch is None
