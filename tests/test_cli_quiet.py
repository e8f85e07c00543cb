"""Third-party noise silenced unless --verbose; SIGTERM and Ctrl-C exit 130 saying so."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from edgepipe.cli.quiet import quiet_third_parties
from tests.fixtures.toy import build_toy_artifact

REPO = Path(__file__).resolve().parents[1]


def test_onnxruntimes_preprocessing_hint_is_dropped_unless_verbose(monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    root = logging.getLogger()
    before = list(root.filters)
    try:
        quiet_third_parties(verbose=True)
        assert root.filters == before and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
        quiet_third_parties(verbose=False)
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # transformers' loading bar
        with caplog.at_level(logging.WARNING):
            logging.warning("Please consider to run pre-processing before quantization. ...")
            logging.warning("something else")
        assert [r.getMessage() for r in caplog.records] == ["something else"]
    finally:
        root.filters[:] = before


def test_sigterm_exits_130_and_says_interrupted(tmp_path, qwen3_tokenizer_dir):
    toy = build_toy_artifact(tmp_path / "toy", qwen3_tokenizer_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    chat = subprocess.Popen(
        [sys.executable, "-m", "edgepipe", "chat", str(toy), "--no-verify"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(5)  # loading or waiting for a line: SIGTERM unwinds either way
    chat.send_signal(signal.SIGTERM)
    _, err = chat.communicate(timeout=60)
    assert chat.returncode == 130
    assert err.decode().strip().splitlines()[-1] == "interrupted"
