"""`edgepipe run`, `chat` and `bench` on the toy decoder artifact."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from edgepipe.cli import run as runtime_cli
from edgepipe.runtime import Generator
from tests.fixtures.toy import build_toy_artifact


@pytest.fixture(scope="module")
def toy(tmp_path_factory, qwen3_tokenizer_dir):
    return build_toy_artifact(tmp_path_factory.mktemp("toy-cli") / "artifact", qwen3_tokenizer_dir)


def run_cli(argv: list[str]) -> int:
    # Registers only this module's commands: edgepipe.cli.main.main would import every command
    # module, and this test should not depend on the build side's commands.
    parser = argparse.ArgumentParser(prog="edgepipe")
    runtime_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_run_streams_the_greedy_text(toy, capsys):
    code = run_cli(["run", str(toy), "Hello world", "--max-new-tokens", "12", "--greedy"])
    expected = Generator(toy).generate("Hello world", max_new_tokens=12, do_sample=False)
    assert code == 0
    assert capsys.readouterr().out == expected.text + "\n"


def test_run_json_prints_the_python_apis_result_and_metrics(toy, capsys):
    code = run_cli(["run", str(toy), "Hello", "--max-new-tokens", "5", "--greedy", "--json"])
    data = json.loads(capsys.readouterr().out)
    expected = Generator(toy).generate("Hello", max_new_tokens=5, do_sample=False)
    assert code == 0
    assert data["prompt_token_ids"] == expected.prompt_token_ids
    assert data["token_ids"] == expected.token_ids and data["text"] == expected.text
    assert {"time_to_first_token_s", "decode_tokens_per_s", "kv_bytes"} <= set(data["metrics"])


def test_run_reads_the_prompt_from_stdin_and_applies_the_chat_template(toy, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hi"))
    code = run_cli(
        ["run", str(toy), "-", "--chat", "--no-think", "--max-new-tokens", "4", "--json"]
    )
    data = json.loads(capsys.readouterr().out)
    gen = Generator(toy)
    prompt = gen.render_chat([{"role": "user", "content": "Say hi"}], enable_thinking=False)
    assert code == 0
    assert data["prompt_token_ids"] == gen.encode(prompt)


def test_run_sampling_flags_imply_sampling_and_the_seed_repeats(toy, capsys):
    def tokens(seed: str) -> list[int]:
        argv = ["run", str(toy), "Hello world, this is", "--max-new-tokens", "8"]
        run_cli(argv + ["--temperature", "8", "--seed", seed, "--json"])
        return json.loads(capsys.readouterr().out)["token_ids"]

    assert tokens("3") == tokens("3")
    assert tokens("3") != tokens("4")  # sampled, so the seed matters


def test_run_reports_bad_parameters_with_exit_code_2(toy, capsys):
    code = run_cli(["run", str(toy), "Hello", "--top-p", "1.5"])
    assert code == 2
    assert "top_p must be a number in (0.0, 1.0]" in capsys.readouterr().err


def test_run_reports_a_missing_artifact_with_exit_code_2(tmp_path, capsys):
    code = run_cli(["run", str(tmp_path / "nope"), "Hello"])
    assert code == 2
    assert "artifact folder not found" in capsys.readouterr().err


def test_chat_keeps_history_and_handles_commands(toy, capsys, monkeypatch):
    lines = "Hello there\n/think off\nAnd again\n/reset\nFresh start\n/bogus\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code = run_cli(["chat", str(toy), "--max-new-tokens", "6", "--greedy", "--system", "S"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "[thinking off]" in out and "[history cleared]" in out
    assert out[-1].startswith("[commands:")
    # After /reset the first turn is answered as in a fresh conversation.
    gen = Generator(toy)
    fresh = gen.chat(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Fresh start"}],
        enable_thinking=False,
        max_new_tokens=6,
        do_sample=False,
    )
    reply_after_reset = out[out.index("[history cleared]") + 1]
    assert reply_after_reset == fresh.text.split("\n")[0]


def test_bench_reports_speeds_and_peak_rss(toy, capsys):
    argv = ["bench", str(toy), "--prompt-len", "16", "--gen-len", "8", "--repeat", "2", "--json"]
    code = run_cli(argv)
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["prefill_tokens_per_s"] > 0 and report["decode_tokens_per_s"] > 0
    assert report["peak_rss_bytes"] > 10 * 2**20
    assert report["kv_bytes"] == 2 * 2 * 1 * 32 * 16 * 4  # 16 + 8 tokens rounded up to 32


def test_bench_times_prefill_unless_a_prefix_cache_is_asked_for(toy, capsys):
    argv = ["bench", str(toy), "--prompt-len", "16", "--gen-len", "4", "--repeat", "1", "--json"]
    assert run_cli(argv) == 0
    assert json.loads(capsys.readouterr().out)["prefix_reused_tokens"] == 0  # the same prompt
    assert run_cli(argv + ["--prefix-cache-mb", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["prefix_reused_tokens"] == 14  # 2 left to prefill


def test_a_negative_prefix_cache_size_is_an_error(toy, capsys):
    assert run_cli(["chat", str(toy), "--prefix-cache-mb", "-1"]) == 2
    assert "--prefix-cache-mb must be >= 0" in capsys.readouterr().err


def test_bench_rejects_a_zero_length(toy, capsys):
    assert run_cli(["bench", str(toy), "--gen-len", "0"]) == 2
    assert "--gen-len must be >= 1" in capsys.readouterr().err


def test_spin_flag_reaches_the_session(toy, monkeypatch):
    import edgepipe.runtime

    opened = []

    class Recording(Generator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self.session.get_session_options())

    monkeypatch.setattr(edgepipe.runtime, "Generator", Recording)
    assert run_cli(["run", str(toy), "Hi", "--max-new-tokens", "2", "--spin", "on"]) == 0
    assert opened[0].get_session_config_entry("session.intra_op.allow_spinning") == "1"
