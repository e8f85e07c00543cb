"""Session options: spinning modes reach the onnxruntime session (read back from it)."""

from __future__ import annotations

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
    monkeypatch.setattr(runtime_options.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(runtime_options.os, "sched_getaffinity", lambda pid: {0, 1})
    gen = Generator(toy, spinning="auto")
    assert session_entry(gen, SPIN) == "1"
    assert session_entry(gen, SPIN_US) == str(AUTO_SPIN_US)


def test_auto_does_not_spin_on_a_busy_machine(toy, monkeypatch):
    monkeypatch.setattr(runtime_options.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    monkeypatch.setattr(runtime_options.os, "sched_getaffinity", lambda pid: {0, 1})
    assert session_entry(Generator(toy, spinning="auto"), SPIN) == "0"


def test_session_config_entries_win_over_the_spinning_mode(toy):
    gen = Generator(toy, spinning="on", session_config={SPIN: "0"})
    assert session_entry(gen, SPIN) == "0"


def test_default_does_not_spin_and_unknown_modes_are_refused(toy):
    assert session_entry(Generator(toy), SPIN) == "0"
    with pytest.raises(ValueError, match="spinning must be one of"):
        spinning_config("sometimes")
