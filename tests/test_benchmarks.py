"""The arithmetic of the benchmark scripts (benchmarks/): roofline bytes, goals, child RSS.

Timings are never asserted (they belong to the scripts); these check that what the scripts
compute from an artifact and from their measurements is right.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.fixtures.benchmarks import BENCH, load_scripts

SCRIPTS = load_scripts("common", "quant_sizes", "report", "roofline", "prefix_reuse")
common, quant_sizes, report, roofline, prefix_reuse = SCRIPTS.values()


def test_loading_the_scripts_leaves_sys_path_and_plain_module_names_alone():
    assert str(BENCH) not in sys.path
    assert not {"common", "report", "roofline", "quant_sizes", "prefix_reuse"} & set(sys.modules)
    assert roofline.CACHE is common.CACHE, "the scripts share one `common`"


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory) -> Path:
    from edgepipe.arch.presets import write_preset
    from edgepipe.stages.export.dynamic import build_decoder
    from edgepipe.stages.quantize.plan import QuantPlan

    tmp = tmp_path_factory.mktemp("bench")
    source = write_preset("tiny-qwen2", 0, tmp / "source", tokenizer=False)
    plan = QuantPlan.from_precision("int4", accuracy_level=4)
    build_decoder(source, tmp / "int4", quant=plan)
    return tmp / "int4"


def test_decode_reads_every_weight_once_and_no_rotary_cache(tiny_int4):
    config = json.loads((tiny_int4.parent / "source" / "config.json").read_text())
    # quant_sizes counts the same artifact term by term from the config alone.
    theory = quant_sizes.theoretical_bytes(config, embedding_bits=4)
    counted = roofline.weight_bytes_per_token(tiny_int4 / "model.onnx")
    # The graph also reads a few int64 shape constants (axes, slice bounds): under 1 KiB.
    extra = counted["weights_read"] - (theory["total"] - theory["rotary_caches"])
    assert 0 <= extra < 1024
    # Left out: the gathered-only table codes and the cos/sin caches.
    table_codes = config["vocab_size"] * config["hidden_size"] // 2
    assert 0 <= counted["gathered_not_counted"] - table_codes - theory["rotary_caches"] < 1024


def test_roofline_adds_the_mean_kv_cache_of_the_decode(tiny_int4):
    line = roofline.roofline(tiny_int4, 1e10, prompt_len=100, gen_len=21)
    geometry = roofline.decoder_geometry(tiny_int4)
    per_position = 2 * geometry["layers"] * geometry["kv_heads"] * geometry["head_dim"] * 4
    assert line["kv_read_mean"] == per_position * 110  # positions 100..120, mean 110
    assert line["roofline_tokens_per_s"] == pytest.approx(1e10 / line["bytes_per_token"])


def _doc(decode_ep, decode_genai, rss_ep, rss_genai):
    def speed(decode):
        median = {"decode_tokens_per_s": decode, "prefill_tokens_per_s": 100.0}
        return {"128": {"median": median, "rounds": []}, "512": {"median": median, "rounds": []}}

    model = {
        "model": "qwen3-0.6b",
        "speed": {"edgepipe": speed(decode_ep), "genai": speed(decode_genai)},
        "memory": {
            "edgepipe/default": {"peak_rss_mib": rss_ep},
            "genai/default": {"peak_rss_mib": rss_genai},
        },
        "builds": {"edgepipe": {"peak_rss_mib": 300}, "genai": {"peak_rss_mib": 1000}},
        "roofline": {"edgepipe": {"bytes_per_token": 1e9}},
    }
    return {
        "settings": {"prompt_lens": [128, 512], "gen_len": 128},
        "bandwidth": {"best_bytes_per_s": 40e9},
        "bandwidth_after": {"best_bytes_per_s": 50e9},
        "models": [model],
    }


def test_goals_are_ratios_of_medians_against_their_targets():
    rows = {g["goal"]: g for g in report.goals(_doc(66.0, 60.0, 200.0, 1000.0))}
    decode = rows["decode tok/s, edgepipe / genai"]
    assert decode["value"] == pytest.approx(1.1) and decode["met"] is True
    assert rows["runtime peak RSS at defaults, edgepipe / genai"]["value"] == pytest.approx(0.2)
    assert rows["build peak RSS, edgepipe / genai builder"]["met"] is True
    assert rows["prefill tok/s at 512, edgepipe / genai"]["met"] is False  # 1.0 < 1.3
    # The roofline uses the better of the two bandwidth passes: 66 / (50e9 / 1e9).
    assert rows["decode / bandwidth roofline"]["value"] == pytest.approx(66 / 50)


def test_a_goal_missed_is_reported_as_not_met():
    rows = {g["goal"]: g for g in report.goals(_doc(50.0, 60.0, 400.0, 1000.0))}
    assert rows["decode tok/s, edgepipe / genai"]["met"] is False
    assert rows["runtime peak RSS at defaults, edgepipe / genai"]["met"] is False
    assert "**no**" in report.markdown({**_doc(50.0, 60.0, 400.0, 1000.0), **_facts()})


def _facts():
    return {
        "machine": {
            "cpu": "test cpu",
            "cores": 2,
            "memory_bytes": 2**34,
            "versions": {"onnxruntime": "x", "onnxruntime-genai": "y"},
            "edgepipe_git": "abc",
            "load": [0.0, 0.0, 0.0],
        },
        "settings": {
            "prompt_lens": [128, 512],
            "gen_len": 128,
            "rounds": 5,
            "profile": "cpu-x64",
            "command": "side_by_side.py",
        },
        "bandwidth": {
            "best_bytes_per_s": 40e9,
            "method": "test",
            "threads": 2,
            "buffer_bytes": 2**31,
        },
    }


def test_child_peak_rss_is_the_childs_not_the_parents():
    # The parent holds ~300 MiB; a child that allocates ~40 MiB must not report the parent's.
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "b = bytearray(40 * 2**20); b[::4096] = b'y' * len(b[::4096])"
    result = common.run_measured([sys.executable, "-c", code])
    del ballast
    assert result["rc"] == 0
    assert 40 <= result["peak_rss_mib"] < 200, result


def test_prefix_reuse_reports_ratios_of_medians_and_whether_tokens_matched():
    def runs(ttfts, totals, prompt, reused):
        return [
            {"ttft_s": a, "total_s": b, "prompt_tokens": prompt,
             "prefix_reused_tokens": reused, "token_ids": [i]}
            for i, (a, b) in enumerate(zip(ttfts, totals, strict=True))
        ]  # fmt: skip

    rows = {
        "reuse": runs([0.01, 0.03, 0.02], [0.1, 0.3, 0.2], 32, 512),
        "off": runs([0.10, 0.12, 0.08], [0.2, 0.4, 0.3], 544, 0),
    }
    got = prefix_reuse.summary(rows)
    assert got["ttft_ms"] == {"reuse": 20.0, "off": 100.0}
    assert got["ttft_ratio_off_over_reuse"] == 5.0 and got["total_ratio_reuse_over_off"] == 0.667
    assert got["prefilled_tokens"] == {"reuse": 32, "off": 544} and got["reused_tokens"] == 512
    assert got["same_tokens"]
    rows["off"][1]["token_ids"] = [9]
    assert not prefix_reuse.summary(rows)["same_tokens"]
