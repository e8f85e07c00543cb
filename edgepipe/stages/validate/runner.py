"""The one runner of the dynamic decoder graph on the build side (validate, optimize, quality).

It feeds the graph of `docs/contracts.md` (dynamic variant) with plain `session.run`: an empty
past to begin with, each step's `present.*` as the next step's `past_key_values.*`, and gives
teacher-forced logits (one row per position) or a greedy continuation. The runtime's
`Generator` is the user-facing driver of the same graph; this one stays small and exact so the
build can measure what the graph computes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from edgepipe.errors import InvalidInput
from edgepipe.runtime.dtypes import ORT_NUMPY_DTYPES as ORT_DTYPES
from edgepipe.runtime.options import QUIET
from edgepipe.runtime.providers import CPU_PROVIDER as CPU


def quiet_options(options=None):
    """`options` (new `onnxruntime.SessionOptions` when None) logging errors only, unless the
    caller chose a level.

    The build's sessions over its own dynamic graphs would otherwise log onnxruntime's warning
    about the overridable `logits_to_keep` initializer ("appears in graph inputs ... Move it
    out of graph inputs") on every load: by design here (edgepipe.stages.export.layers.logits).
    """
    import onnxruntime as ort

    options = ort.SessionOptions() if options is None else options
    if options.log_severity_level == -1:  # -1: not chosen (onnxruntime's default, warnings)
        options.log_severity_level = QUIET
    return options


class DecoderRunner:
    """Runs a dynamic-variant decoder graph with plain `session.run`.

    Args:
        model_path: the `.onnx` file.
        provider: execution provider; CPU is always appended as fallback.
        provider_options: options for `provider`.
        session_options: an `onnxruntime.SessionOptions`, or None for defaults; sessions log
            errors only unless it sets a level (`quiet_options`).
    """

    def __init__(
        self,
        model_path: str | Path,
        provider: str = CPU,
        provider_options: Mapping | None = None,
        session_options=None,
    ):
        import onnxruntime as ort

        if not Path(model_path).is_file():
            raise InvalidInput(f"{model_path}: no such model; pass an export's model.onnx")
        providers = [(provider, dict(provider_options or {}))]
        if provider != CPU:
            providers.append((CPU, {}))
        self.session = ort.InferenceSession(
            str(model_path), sess_options=quiet_options(session_options), providers=providers
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = sorted(
            (n for n in self.inputs if n.startswith("past_key_values.")), key=_layer_order
        )
        # present.{i}.key feeds past_key_values.{i}.key on the next step.
        self.present_for = {p: "present." + p[len("past_key_values.") :] for p in self.past_names}

    def empty_past(self) -> dict[str, np.ndarray]:
        """The past feeds of a sequence's first call: every cache `[1, kv_heads, 0, head_dim]`.

        Raises:
            InvalidInput: the graph does not fix kv_heads and head_dim of its cache inputs.
        """
        feeds = {}
        for name in self.past_names:
            meta = self.inputs[name]
            kv_heads, head_dim = meta.shape[1], meta.shape[3]
            if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
                raise InvalidInput(f"{name}: expected fixed kv_heads and head_dim dims")
            dtype = ORT_DTYPES.get(meta.type, np.float32)
            feeds[name] = np.zeros((1, kv_heads, 0, head_dim), dtype=dtype)
        return feeds

    def step(self, ids: list[int], past: dict, total: int) -> tuple[np.ndarray, dict]:
        """Run `ids` after `total - len(ids)` cached positions.

        Args:
            ids: the new token ids.
            past: the cache feeds (`empty_past()` or the previous step's new past).
            total: cached plus new positions.

        Returns:
            (logits `[1, rows, vocab]` as float32, the new past). `rows` is 1 for a
            last-position export, `len(ids)` for an all-logits one.
        """
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64)}
        feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.inputs:
            start = total - len(ids)
            feeds["position_ids"] = np.arange(start, total, dtype=np.int64)[None, :]
        feeds.update(past)
        outputs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        new_past = {p: outputs[self.present_for[p]] for p in self.past_names}
        return outputs["logits"].astype(np.float32), new_past

    def teacher_forced(
        self, ids: list[int], progress: Callable[[str], None] | None = None
    ) -> np.ndarray:
        """Next-token logits after every prefix of `ids`: shape `[len(ids), vocab]`.

        An all-logits export answers in one call; a last-position export is fed one token at
        a time through its KV cache, which gives the same rows (and exercises the decode path).

        Args:
            ids: the token ids.
            progress: called with "t/T tokens" every 32 tokens.
        """
        ids = [int(i) for i in ids]
        shape = next(o.shape for o in self.session.get_outputs() if o.name == "logits")
        if shape[1] != 1:  # maybe an all-logits export: then one run answers
            logits, _ = self.step(ids, self.empty_past(), len(ids))
            if logits.shape[1] == len(ids):
                return logits[0]
        rows = []
        past = self.empty_past()
        for t, token in enumerate(ids):
            logits, past = self.step([token], past, t + 1)
            rows.append(logits[0, -1])
            if progress is not None and (t + 1) % 32 == 0:
                progress(f"{t + 1}/{len(ids)} tokens")
        return np.stack(rows)

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of `ids`: `new_tokens` ids, through the KV cache."""
        ids = [int(i) for i in ids]
        logits, past = self.step(ids, self.empty_past(), len(ids))
        out = []
        total = len(ids)
        for _ in range(new_tokens):
            token = int(np.argmax(logits[0, -1]))
            out.append(token)
            if len(out) == new_tokens:
                break
            total += 1
            logits, past = self.step([token], past, total)
        return out


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if parts[1].isdigit() else 0, parts[-1])
