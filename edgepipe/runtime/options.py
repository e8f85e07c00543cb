"""The onnxruntime `SessionOptions` every session of `edgepipe.runtime` starts from."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

# Session config entries of every session edgepipe creates (`session_config=` adds or
# overrides). Spinning off: idle intra-op threads sleep instead of busy-waiting, so they never
# steal a core from the other thread or from other processes. The build's sessions keep it;
# `Generator` sets its `spinning` mode over it (`DEFAULT_SPINNING`). Measured on a shared 2-core
# AVX-512 VM (load 5-8 from other jobs), shape-exact Qwen2.5-0.5B int4, 8 alternating rounds
# (benchmarks/side_by_side.py --variant): decode 17.5 vs 11.1 tok/s with spinning, prefill of
# 128 tokens 89.5 vs 79.1 tok/s; onnxruntime-genai on its own build: 16.6 decode.
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
# `Generator(spinning=...)` -> the session config entries it sets (over SESSION_CONFIG).
# onnxruntime reads spinning per session (no run option sets it, checked in 1.32: the run config
# keys are memory.*, gpu_graph_id and disable_synchronize_execution_providers), so the choice is
# made when the session opens; a second, spinning session per Generator would double the
# prepacked int4 weights (the Python API exposes no PrepackedWeightsContainer). "auto" spins
# only when every intra-op thread has a core of its own: the cores this process may use, less
# the cores other processes kept busy over `SAMPLE_S` (50 ms) just before the session opens
# (`busy_cores`, from /proc/stat; the 1-minute load average where that is missing), and then
# for at most `AUTO_SPIN_US` per wait, so a worker keeps its core between the kernels of a step
# but gives it back soon when there is no work. An instantaneous sample, not the load average:
# the average lags by a minute (a build that just ended reads as load), and it counts
# processes at nice 19 as full ones while they also break a spinning pool's barriers (seen:
# llama.cpp at 2.9 tok/s beside niced test runs). Measured on the shared 2-core VM, shape-exact
# Qwen2.5-0.5B int4, 8-token prompt, 64 tokens, 6 ABBA rounds (benchmarks/side_by_side.py
# --variant, load 7-15, no idle core ever): spinning on 0.61x of off (0.39x with one core kept
# busy), a 100 us bounded spin 0.93x (0.88x).
AUTO_SPIN_US = 100
# `Generator`'s mode when none is given. "auto", measured on a quiet 2-core AVX-512 VM
# (benchmarks/side_by_side.py --tag quiet-w3 / busy-w3, shape-exact Qwen2.5-0.5B int4, block
# 128 symmetric, 4 ABBA rounds): decode 83.5 vs 62.0 tok/s with spinning off (llama.cpp Q4_0:
# 76.6); with a busy loop on one core started after the session opened (so "auto" had chosen
# to spin) 31.5 vs 34.5 (llama.cpp: 25.5). When the machine is busy at open, "auto" is "off".
DEFAULT_SPINNING = "auto"
SPIN_KEY = "session.intra_op.allow_spinning"
# How long "auto" watches the CPUs before the session opens, and how much of a core other
# processes may use while it still counts as spare (/proc/stat counts in 10 ms ticks).
SAMPLE_S = 0.05
SPARE_SLACK = 0.3
SPINNING = ("auto", "on", "off")
# onnxruntime's log level for the sessions created here: warnings (1) and above by default;
# the QNN plug-in warns on every session about Windows-on-Arm-only features, so its sessions
# log errors (3) only.
QUIET = 3


def session_options(
    intra_op_num_threads: int | None = None,
    session_config: Mapping[str, str] | None = None,
    *,
    log_severity_level: int | None = None,
):
    """New `onnxruntime.SessionOptions` with `SESSION_CONFIG` and the caller's entries over it.

    Args:
        intra_op_num_threads: threads per session (None or 0: onnxruntime's default, one per
            physical core).
        session_config: config entries added over `SESSION_CONFIG`.
        log_severity_level: onnxruntime's log level (None: its default).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if intra_op_num_threads:
        options.intra_op_num_threads = int(intra_op_num_threads)
    if log_severity_level is not None:
        options.log_severity_level = int(log_severity_level)
    for key, value in {**SESSION_CONFIG, **(session_config or {})}.items():
        options.add_session_config_entry(key, str(value))
    return options


def spinning_config(spinning: str, threads: int | None = None) -> dict[str, str]:
    """Session config entries of a spinning mode ("auto", "on" or "off") for a session of
    `threads` intra-op threads (None: onnxruntime's default, one per core).

    Raises:
        ValueError: an unknown mode (the message lists the allowed ones).
    """
    if spinning == "off":
        return {"session.intra_op.allow_spinning": "0"}
    if spinning == "on":
        return {"session.intra_op.allow_spinning": "1"}
    if spinning == "auto":
        return spin_entries(spare_cores_for(threads))
    raise ValueError(f"spinning must be one of {SPINNING}, got {spinning!r}")


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def spare_cores_for(threads: int | None) -> bool:
    """Whether `threads` intra-op threads (None: one per usable core, onnxruntime's default)
    would each find a core that other processes leave free (within `SPARE_SLACK` of a core)."""
    cores = usable_cores()
    busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows): assume idle
            return True
    return busy + (threads or cores) <= cores + SPARE_SLACK


def busy_cores(sample_s: float | None = None) -> float | None:
    """Cores kept busy over a short sample, on the CPUs this process may use (None where
    /proc/stat is missing). The caller sleeps meanwhile, so the work is other processes'."""
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        before = cpu_ticks(cpus)
        time.sleep(SAMPLE_S if sample_s is None else sample_s)
        after = cpu_ticks(cpus)
    except (AttributeError, OSError, ValueError):
        return None
    busy = 0.0
    for cpu, (idle, total) in after.items():
        idle0, total0 = before.get(cpu, (idle, total))
        if total > total0:
            busy += 1.0 - (idle - idle0) / (total - total0)
    return busy


def busy_ticks() -> int | None:
    """Ticks the CPUs this process may use have been busy since boot (None without /proc)."""
    try:
        ticks = cpu_ticks({f"cpu{i}" for i in os.sched_getaffinity(0)})
    except (AttributeError, OSError, ValueError):
        return None
    return sum(total - idle for idle, total in ticks.values())


def own_ticks() -> int | None:
    """CPU ticks (user + system) this process has used, all threads (None without /proc)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def spin_entries(spin: bool) -> dict[str, str]:
    """The session config entries of "auto" once decided: a bounded spin, or none."""
    if not spin:
        return {"session.intra_op.allow_spinning": "0"}
    return {
        "session.intra_op.allow_spinning": "1",
        "session.intra_op.spin_duration_us": str(AUTO_SPIN_US),
    }


def cpu_ticks(cpus: set[str]) -> dict[str, tuple[int, int]]:
    """{cpu: (idle + iowait ticks, all ticks)} from /proc/stat."""
    ticks = {}
    with open("/proc/stat", encoding="ascii") as stat:
        for line in stat:
            name, *fields = line.split()
            if name in cpus:
                values = [int(v) for v in fields[:8]]
                ticks[name] = (values[3] + values[4], sum(values))
    return ticks
