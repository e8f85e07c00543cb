"""Calibration activations for GPTQ, one decoder layer at a time.

GPTQ needs, for every linear layer, the inputs it sees on calibration text. The builder streams
weights layer by layer, so it cannot run the whole model first. Instead it embeds the
calibration tokens once, then for each layer: loads that layer's weights, calls
`layer_forward(hidden, weights, config)`, quantizes the layer's linears with
`LayerActivations.for_weight(name)` as calibration, and feeds `hidden_out` to the next layer.
Peak memory is one layer's weights plus `[tokens, intermediate]` activations.

The layer forward is the numpy reference of the architecture (`edgepipe.arch.reference`). The
activations come from the float model (not from already-quantized earlier layers), which is the
simpler of GPTQ's two usual choices.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgepipe.arch.reference import LayerActivations, LayerConfig, layer_forward
from edgepipe.errors import InvalidInput


class LayerCalibrator:
    """Carries calibration hidden states through the model while the builder streams layers.

    Usage in the builder::

        cal = LayerCalibrator(config_json, embed_table, calibration_ids)
        for i in range(num_layers):
            layer_weights = {...}            # this layer's tensors, HF names
            acts = cal.advance(layer_weights)
            for name in linear_names:
                quantize_weight(w, spec, name=name, calibration=acts.for_weight(name))

    Memory: the hidden states `[sequences, seq, hidden]` plus one layer's activations.
    """

    def __init__(
        self,
        config: Mapping,
        embed_table: np.ndarray,
        token_ids: np.ndarray,
        *,
        max_tokens_per_sequence: int = 512,
    ):
        """Embed the calibration tokens.

        Args:
            config: The model's `config.json` dict.
            embed_table: `model.embed_tokens.weight` `[vocab, hidden]`.
            token_ids: Calibration token ids, 1-D; cut into independent sequences of at most
                `max_tokens_per_sequence` (attention cost is quadratic in sequence length).
            max_tokens_per_sequence: Sequence length for the calibration forward.
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.shape[0] < 2:
            raise InvalidInput("calibration text: needs at least 2 tokens; add calibration text")
        n = max_tokens_per_sequence
        usable = ids.shape[0] // n * n if ids.shape[0] >= n else ids.shape[0]
        ids = ids[:usable].reshape(-1, min(n, usable))
        self.config = LayerConfig.from_hf_config(config)
        self.hidden = np.asarray(embed_table)[ids].astype(np.float32)
        self.layers_done = 0

    @property
    def tokens(self) -> int:
        """Calibration tokens carried (sequences × length)."""
        return self.hidden.shape[0] * self.hidden.shape[1]

    def advance(self, layer_weights: Mapping[str, np.ndarray]) -> LayerActivations:
        """Run the next layer on the carried hidden states; return what its linears saw."""
        acts = layer_forward(self.hidden, layer_weights, self.config)
        self.hidden = acts.hidden_out
        self.layers_done += 1
        return acts
