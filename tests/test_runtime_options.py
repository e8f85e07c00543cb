"""Session options: spinning modes reach the onnxruntime session (read back from it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepipe.runtime import Generator
from edgepipe.runtime import options as runtime_options
from edgepipe.runtime.options import AUTO_SPIN_US, spinning_config
from tests.fixtures.toy import build_toy_artifact

SPIN = "session.intra_op.allow_spinning"
SPIN_US = "session.intra_op.spin_duration_us"


@pytest.fixture(scope="module")
def toy(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(tmp_path_factory.mktemp("toy") / "artifact", qwen3_tokenizer_dir)


def session_entry(gen: Generator, key: str) -> str:
    return gen.session.get_session_options().get_session_config_entry(key)


@pytest.mark.parametrize(("mode", "want"), [("on", "1"), ("off", "0")])
def test_spinning_on_and_off_are_set_on_the_session(toy, mode, want):
    assert session_entry(Generator(toy, spinning=mode), SPIN) == want


def test_auto_spins_for_a_bounded_time_when_a_core_is_idle(toy, monkeypatch):
    monkeypatch.setattr(runtime_options, "busy_cores", lambda: 0.1)
    monkeypatch.setattr(runtime_options, "usable_cores", lambda: 2)
    gen = Generator(toy, spinning="auto")
    assert session_entry(gen, SPIN) == "1"
    assert session_entry(gen, SPIN_US) == str(AUTO_SPIN_US)


@pytest.mark.parametrize(
    ("busy", "threads", "spins"),
    [(1.0, None, False), (0.5, None, False), (1.0, 1, True), (1.5, 1, False), (0.0, 3, False)],
)
def test_auto_spins_only_when_every_thread_finds_a_free_core(monkeypatch, busy, threads, spins):
    monkeypatch.setattr(runtime_options, "busy_cores", lambda: busy)
    monkeypatch.setattr(runtime_options, "usable_cores", lambda: 2)
    assert (spinning_config("auto", threads)[SPIN] == "1") is spins


def test_auto_falls_back_to_the_load_average_without_proc_stat(monkeypatch):
    monkeypatch.setattr(runtime_options, "busy_cores", lambda: None)
    monkeypatch.setattr(runtime_options, "usable_cores", lambda: 2)
    monkeypatch.setattr(runtime_options.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert spinning_config("auto")[SPIN] == "0"
    monkeypatch.setattr(runtime_options.os, "getloadavg", lambda: (0.1, 1.0, 1.0))
    assert spinning_config("auto")[SPIN] == "1"


def test_busy_cores_counts_the_ticks_that_were_not_idle(monkeypatch):
    # cpu0 busy 3 of 10 ticks, cpu1 all 10: 1.3 cores; iowait counts as idle.
    samples = iter([
        {"cpu0": (100, 1000), "cpu1": (50, 500)},
        {"cpu0": (107, 1010), "cpu1": (50, 510)},
    ])  # fmt: skip
    monkeypatch.setattr(runtime_options, "cpu_ticks", lambda cpus: next(samples))
    assert runtime_options.busy_cores(0.0) == pytest.approx(1.3)


def test_busy_cores_sees_another_process_spin():
    """A child process burning a core reads as at least most of a core busy (whatever else the
    machine runs, the total only grows)."""
    import subprocess
    import sys
    import time

    if not Path("/proc/stat").is_file():
        pytest.skip("no /proc/stat on this platform")
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the child starts and its interpreter settles into the loop
        loaded = runtime_options.busy_cores(0.3)
    finally:
        burner.kill()
        burner.wait()
    assert loaded > 0.6


def test_session_config_entries_win_over_the_spinning_mode(toy):
    gen = Generator(toy, spinning="on", session_config={SPIN: "0"})
    assert session_entry(gen, SPIN) == "0"


def test_default_is_auto_and_unknown_modes_are_refused(toy, monkeypatch):
    monkeypatch.setattr(runtime_options, "usable_cores", lambda: 2)
    monkeypatch.setattr(runtime_options, "busy_cores", lambda: 0.0)
    assert session_entry(Generator(toy), SPIN_US) == str(AUTO_SPIN_US)
    monkeypatch.setattr(runtime_options, "busy_cores", lambda: 1.0)
    assert session_entry(Generator(toy), SPIN) == "0"
    with pytest.raises(ValueError, match="spinning must be one of"):
        spinning_config("sometimes")


def test_sessions_given_as_is_are_not_changed(toy):
    options = runtime_options.session_options(session_config={SPIN: "1"})
    assert session_entry(Generator(toy, session_options=options), SPIN) == "1"
