"""`edgepipe run` / `chat` against hostile input: exit 2 with one line, sessions that survive."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.cli.main import main
from edgepipe.runtime import ChatSession
from tests.fixtures.toy import build_toy_artifact

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(tmp_path_factory.mktemp("toy-hard") / "artifact", qwen3_tokenizer_dir)


def stdin_bytes(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_a_bare_folder_warns_that_it_is_unverifiable(toy, capsys):
    assert main(["run", str(toy), "Hi", "--max-new-tokens", "2", "--greedy"]) == 0
    assert "unverifiable: no manifest.json" in capsys.readouterr().err
    assert main(["run", str(toy), "Hi", "--max-new-tokens", "2", "--no-verify"]) == 0
    assert "unverifiable" not in capsys.readouterr().err


def test_stdin_that_is_not_utf8_exits_2_with_one_line(toy, capsys, monkeypatch):
    stdin_bytes(monkeypatch, b"caf\xe9 au lait")
    assert main(["run", str(toy), "-", "--no-verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: stdin is not UTF-8 text (byte 0xe9 at offset 3)"]


def test_an_argument_that_is_not_utf8_exits_2(toy):
    # Python turns undecodable argv bytes into lone surrogates; the tokenizer would raise a
    # TypeError on them.
    argv = [sys.executable, "-m", "edgepipe", "run", os.fsencode(str(toy)), b"caf\xe9"]
    argv.append("--no-verify")
    done = subprocess.run(argv, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    assert b"Traceback" not in done.stderr and b"lone surrogate" in done.stderr


def test_run_json_prints_a_json_report_on_failure(toy, capsys):
    code = main(["run", str(toy), "Hi", "--top-p", "7", "--json", "--no-verify"])
    report = json.loads(capsys.readouterr().out)
    assert code == 2 and report["ok"] is False and "top_p" in report["error"]


def test_chat_survives_a_bad_line_and_keeps_going(toy, capsys, monkeypatch):
    stdin_bytes(monkeypatch, b"Hello\nbad \xff line\nAgain\n")
    code = main(["chat", str(toy), "--max-new-tokens", "3", "--greedy", "--no-verify"])
    captured = capsys.readouterr()
    assert code == 0
    assert "error: this line is not UTF-8 text" in captured.err
    assert len([line for line in captured.out.splitlines() if line]) == 2  # both good turns


def test_chat_drops_the_oldest_turns_when_the_context_fills(toy, capsys, monkeypatch):
    turns = "".join(f"turn {i} with a few more words to fill the window\n" for i in range(6))
    stdin_bytes(monkeypatch, turns.encode())
    argv = ["chat", str(toy), "--max-length", "64", "--max-new-tokens", "4", "--greedy"]
    code = main([*argv, "--system", "S", "--no-verify"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[context full: dropped the 1 oldest turn(s); system prompt kept]" in out


def test_ctrl_c_during_a_reply_ends_the_reply_not_the_session(toy, capsys, monkeypatch):
    real = ChatSession.send_stream

    def send_stream(self, text, **params):
        if text == "stop me":
            raise KeyboardInterrupt
        return real(self, text, **params)

    monkeypatch.setattr(ChatSession, "send_stream", send_stream)
    stdin_bytes(monkeypatch, b"stop me\nHello\n")
    code = main(["chat", str(toy), "--max-new-tokens", "3", "--greedy", "--no-verify"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[reply interrupted]" in out
    assert out.rstrip().splitlines()[-1] != "[reply interrupted]"  # "Hello" was answered


def test_a_tokenizer_json_that_is_not_json_exits_2(toy, tmp_path, capsys):
    import shutil

    folder = tmp_path / "a"
    shutil.copytree(toy, folder)
    (folder / "tokenizer.json").write_text("{ not json")
    assert main(["run", str(folder), "Hi", "--no-verify"]) == 2
    assert "tokenizer.json: not a tokenizer file" in capsys.readouterr().err
