"""Goals, markdown tables and the chart of a side_by_side.py results document.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/report.py benchmarks/results/side_by_side.json

re-renders the .md and .png of an existing results file (e.g. after editing the goal list).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MIB = 2**20
# The goals name these shapes for the decode and runtime-memory ratios.
DECODE_GOAL_MODELS = ("qwen2.5-0.5b", "qwen3-0.6b")
RSS_GOAL_MODELS = ("qwen3-0.6b",)


def best_bandwidth(doc: dict) -> float:
    """The best read bandwidth of the run (before and after the models)."""
    values = [doc["bandwidth"]["best_bytes_per_s"]]
    if doc.get("bandwidth_after"):
        values.append(doc["bandwidth_after"]["best_bytes_per_s"])
    return max(values)


def _median(model: dict, contender: str, prompt_len, metric: str) -> float | None:
    try:
        return model["speed"][contender][str(prompt_len)]["median"][metric]
    except KeyError:
        return None


def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def roofline_fraction(doc: dict, model: dict, contender: str = "edgepipe") -> float | None:
    """Median decode (after the shortest prompt) / bandwidth-bound decode of its artifact."""
    prompt = min(doc["settings"]["prompt_lens"])
    decode = _median(model, contender, prompt, "decode_tokens_per_s")
    line = model.get("roofline", {}).get(contender)
    if decode is None or line is None:
        return None
    return decode / (best_bandwidth(doc) / line["bytes_per_token"])


def _peak(model: dict, key: str) -> float | None:
    row = model.get("memory", {}).get(key) or {}
    return row.get("peak_rss_mib")


def goals(doc: dict) -> list[dict]:
    """Each goal of the issue per model: value, target, met."""
    short, long = min(doc["settings"]["prompt_lens"]), max(doc["settings"]["prompt_lens"])
    rows = []

    def add(goal, model, value, target, at_least=True):
        met = None if value is None else (value >= target if at_least else value <= target)
        rows.append({"goal": goal, "model": model, "value": value, "target": target, "met": met})

    def vs(m, other, prompt_len, metric):
        ours, theirs = (_median(m, c, prompt_len, metric) for c in ("edgepipe", other))
        return _ratio(ours, theirs)

    decode, prefill = "decode_tokens_per_s", "prefill_tokens_per_s"
    for m in doc["models"]:
        name = m["model"]
        if name in DECODE_GOAL_MODELS:
            add("decode tok/s, edgepipe / genai", name, vs(m, "genai", short, decode), 1.10)
        add(f"prefill tok/s at {long}, edgepipe / genai", name, vs(m, "genai", long, prefill), 1.3)
        add("decode / bandwidth roofline", name, roofline_fraction(doc, m), 0.85)
        if name in RSS_GOAL_MODELS:
            rss = _ratio(_peak(m, "edgepipe/default"), _peak(m, "genai/default"))
            add("runtime peak RSS at defaults, edgepipe / genai", name, rss, 0.25, at_least=False)
        builds = m.get("builds", {})
        if "genai" in builds:
            rss = _ratio(builds["edgepipe"]["peak_rss_mib"], builds["genai"]["peak_rss_mib"])
            add("build peak RSS, edgepipe / genai builder", name, rss, 0.4, at_least=False)
        if "llama.cpp" in m.get("speed", {}):
            add(
                "stretch: decode tok/s, edgepipe / llama.cpp",
                name,
                vs(m, "llama.cpp", short, decode),
                1.0,
            )
            add(
                f"stretch: prefill tok/s at {long}, edgepipe / llama.cpp",
                name,
                vs(m, "llama.cpp", long, prefill),
                1.0,
            )
    return rows


def _fmt(value, digits=1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _model_table(doc: dict, m: dict) -> list[str]:
    contenders = list(m.get("speed", {}))
    settings = doc["settings"]
    gen = settings["gen_len"]
    lines = [
        f"### {m['model']}",
        "",
        "| metric | " + " | ".join(contenders) + " | edgepipe / genai |",
        "|---|" + "---:|" * (len(contenders) + 1),
    ]

    def row(label, values, digits=1, ratio=True):
        ratio_text = ""
        if ratio and "genai" in contenders:
            ratio_text = _fmt(_ratio(values.get("edgepipe"), values.get("genai")), 2)
        cells = " | ".join(_fmt(values.get(c), digits) for c in contenders)
        lines.append(f"| {label} | {cells} | {ratio_text} |")

    for p in settings["prompt_lens"]:
        row(
            f"prefill tok/s, {p}-token prompt",
            {c: _median(m, c, p, "prefill_tokens_per_s") for c in contenders},
        )
        row(
            f"time to first token ms, {p}-token prompt",
            {
                c: (_median(m, c, p, "time_to_first_token_s") or 0) * 1000 or None
                for c in contenders
            },
        )
        row(
            f"decode tok/s, {gen} tokens after {p}",
            {c: _median(m, c, p, "decode_tokens_per_s") for c in contenders},
        )
    bw = best_bandwidth(doc)
    roof = m.get("roofline", {})
    lines_roof = {c: bw / roof[c]["bytes_per_token"] for c in contenders if c in roof}
    row("decode roofline tok/s (bandwidth / bytes per token)", lines_roof)
    row(
        "decode / roofline",
        {c: roofline_fraction(doc, m, c) for c in contenders if c in m.get("roofline", {})},
        2,
        ratio=False,
    )
    row(
        "bytes read per token MiB",
        {c: m["roofline"][c]["bytes_per_token"] / MIB for c in lines_roof},
    )
    for key, label in (("default", "defaults"), ("matched", "matched max_length")):
        row(
            f"runtime peak RSS MiB, {label}",
            {c: _peak(m, f"{c}/{key}") for c in contenders},
            0,
        )
    workers = m.get("workers", {})
    if any("busy_threads" in w for w in workers.values()):
        row(
            "busy threads (CPU time > 10% of the busiest)",
            {c: workers.get(c, {}).get("busy_threads") for c in contenders},
            0,
            ratio=False,
        )
    builds = {c: b for c, b in m.get("builds", {}).items() if c in contenders}
    row("artifact MiB", {c: b.get("artifact_bytes", 0) / MIB or None for c, b in builds.items()}, 0)
    row("build wall s", {c: b.get("wall_s") for c, b in builds.items()})
    row("build peak RSS MiB", {c: b.get("peak_rss_mib") for c, b in builds.items()}, 0)
    loads = [
        r["load"][0]
        for c in contenders
        for p in settings["prompt_lens"]
        for r in m["speed"][c][str(p)]["rounds"]
    ]
    if loads:
        lines += ["", f"1-minute load average during the rounds: {min(loads)}–{max(loads)}."]
    skipped = {k: v["skipped"] for k, v in m.get("memory", {}).items() if "skipped" in v}
    for key, why in skipped.items():
        lines.append(f"`{key}` RSS run skipped: {why}.")
    return lines + [""]


def markdown(doc: dict) -> str:
    """The results as markdown: machine, settings, one table per model, then the goals."""
    f, s = doc["machine"], doc["settings"]
    bw = doc["bandwidth"]
    lines = [
        "# edgepipe vs onnxruntime-genai: shape-exact random models, int4, CPU",
        "",
        f"`{s['command']}` — {f['cpu']}, {f['cores']} cores, "
        f"{f['memory_bytes'] / 2**30:.0f} GiB; onnxruntime {f['versions']['onnxruntime']}, "
        f"onnxruntime-genai {f['versions']['onnxruntime-genai']}; edgepipe {f['edgepipe_git']}.",
        "",
        f"{s['rounds']} alternating rounds (ABBA), medians; greedy, exactly {s['gen_len']} "
        f"generated tokens; profile `{s['profile']}`. Read bandwidth "
        f"{best_bandwidth(doc) / 1e9:.1f} GB/s (best pass, {bw['method']}, "
        f"{bw['threads']} threads, {bw['buffer_bytes'] / 2**30:.0f} GiB buffer). "
        f"Load at start {f['load']}.",
        "",
    ]
    kernels = f.get("cpu_kernels") or {}
    if kernels:
        listed = ", ".join(f"{op} {'yes' if ok else 'no'}" for op, ok in kernels.items())
        lines += [f"CPU kernels registered in this onnxruntime (com.microsoft): {listed}.", ""]
    for m in doc["models"]:
        lines += _model_table(doc, m)
    lines += ["## Goals", "", "| goal | model | value | target | met |", "|---|---|---:|---:|---|"]
    for g in doc.get("goals") or goals(doc):
        met = {True: "yes", False: "**no**", None: "–"}[g["met"]]
        lines.append(
            f"| {g['goal']} | {g['model']} | {_fmt(g['value'], 2)} | {g['target']} | {met} |"
        )
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: Path) -> None:
    """Four panels per model: decode (with the roofline), prefill, runtime RSS, build RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = [m["model"] for m in doc["models"]]
    contenders: list[str] = []
    for m in doc["models"]:
        contenders += [c for c in m.get("speed", {}) if c not in contenders]
    short, long = min(doc["settings"]["prompt_lens"]), max(doc["settings"]["prompt_lens"])
    x = np.arange(len(models))
    width = 0.8 / max(1, len(contenders))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    panels = [
        (axes[0, 0], f"decode tok/s ({doc['settings']['gen_len']} after {short}); – roofline",
         lambda m, c: _median(m, c, short, "decode_tokens_per_s")),
        (axes[0, 1], f"prefill tok/s, {long}-token prompt",
         lambda m, c: _median(m, c, long, "prefill_tokens_per_s")),
        (axes[1, 0], "runtime peak RSS MiB at defaults (hatched: matched max_length)",
         lambda m, c: _peak(m, f"{c}/default")),
        (axes[1, 1], "build peak RSS MiB",
         lambda m, c: (m.get("builds", {}).get(c) or {}).get("peak_rss_mib")),
    ]  # fmt: skip
    for ax, title, value in panels:
        for i, c in enumerate(contenders):
            heights = [value(m, c) or 0 for m in doc["models"]]
            bars = ax.bar(x + (i - (len(contenders) - 1) / 2) * width, heights, width, label=c)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, models, fontsize=8)
    bw = best_bandwidth(doc)
    for i, c in enumerate(contenders):
        offset = (i - (len(contenders) - 1) / 2) * width
        for j, m in enumerate(doc["models"]):
            line = m.get("roofline", {}).get(c)
            if line:
                axes[0, 0].hlines(
                    bw / line["bytes_per_token"],
                    j + offset - width / 2,
                    j + offset + width / 2,
                    colors="black",
                )
            matched = _peak(m, f"{c}/matched")
            if matched:
                axes[1, 0].bar(j + offset, matched, width * 0.5, fill=False, hatch="//")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"shape-exact random Qwen, int4, {doc['machine']['cores']}-core "
        f"{doc['machine']['cpu']}, {bw / 1e9:.0f} GB/s read",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        raise SystemExit("usage: report.py RESULTS.json")
    path = Path(args[0])
    doc = json.loads(path.read_text())
    doc["goals"] = goals(doc)
    stem = str(path)[: -len(".json")] if path.name.endswith(".json") else str(path)
    Path(f"{stem}.md").write_text(markdown(doc))
    chart(doc, Path(f"{stem}.png"))
    print(Path(f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
