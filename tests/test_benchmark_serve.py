"""benchmarks/serve.py's arithmetic: the issue's goal ratios from measured rows."""

from __future__ import annotations

from tests.fixtures.benchmarks import load_scripts

serve_bench = load_scripts("common", "serve")["serve"]


def row(clients, aggregate, p99, decode=None):
    return {
        "clients": clients,
        "aggregate_tokens_per_s": aggregate,
        "ttft_p99_s": p99,
        "decode_tokens_per_s_mean": decode,
    }


def test_goals_compare_four_clients_with_one_and_with_llama_server():
    edgepipe = [row(1, 15.0, 0.5, decode=20.0), row(4, 50.0, 0.9), row(8, 70.0, 2.0)]
    llama = [row(1, 18.0, 0.4), row(4, 40.0, 1.0)]
    assert serve_bench.goals(edgepipe, llama) == {
        "aggregate_4_over_single_decode": 2.5,
        "ttft_p99_4_over_1": 1.8,
        "aggregate_4_over_llama_server": 1.25,
    }
    assert "aggregate_4_over_llama_server" not in serve_bench.goals(edgepipe, None)


def test_the_commands_bind_loopback_with_equal_parallel():
    ours = serve_bench.edgepipe_cmd("art", 8001, 4, 2)
    assert ours[ours.index("--parallel") + 1] == "4" and "--host" not in ours  # 127.0.0.1
