"""The dynamic decoder's graph pieces: one layout choice per module, each with its own test.

`layout.Layout` holds the choices of one export (from the device profile and the model family);
`edgepipe.stages.export.dynamic` walks the model and calls the pieces the layout selects:

* `linear`: float MatMul or MatMulNBits, the bias fused into MatMulNBits or an Add after it.
* `attention`: q/k/v packed in one MatMul or three; rotary inside GroupQueryAttention or
  `rotary` nodes before it.
* `qk_norm`: Qwen3's RMSNorm over each head of q and k.
* `norms`: the (skip) RMSNorms of the residual stream.
* `mlp`: the SwiGLU MLP.
* `dtypes`: the fp16 guard's float32 parts and the Casts at their edges.
* `logits`: the `logits_to_keep` input and the slice of the positions the lm_head computes.
"""
