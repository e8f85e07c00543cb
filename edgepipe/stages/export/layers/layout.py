"""The layout choices of one dynamic export, each naming the piece it selects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """How each decoder layer is laid out.

    Attributes:
        packed_qkv: q, k and v as one MatMul (True) or three (False: no Split; DirectML's
            GroupQueryAttention takes q, k and v apart). See `attention.project_qkv`.
        rotary_in_attention: rotary inside GroupQueryAttention (True) or
            com.microsoft.RotaryEmbedding nodes before it (False: EPs without GQA rotary).
            See `rotary`.
        fused_bias: Qwen2's q/k/v bias as MatMulNBits' bias input (True) or an Add after a
            four-input MatMulNBits (False: DirectML's kernel takes no bias). See `linear`.
        qk_norm: Qwen3's per-head RMSNorm on q and k (the family's, not a device choice). See
            `qk_norm`.
        branchwise_norm: that norm as one com.microsoft.BranchwiseRMSNorm on q and one on k
            (True: no Reshape) or Reshape -> SimplifiedLayerNormalization -> Reshape on each
            (False: EPs without the kernel). See `qk_norm`.
    """

    packed_qkv: bool = True
    rotary_in_attention: bool = True
    fused_bias: bool = True
    qk_norm: bool = False
    branchwise_norm: bool = True

    @property
    def separate_qkv(self) -> bool:
        """q, k and v reach attention as three tensors: something runs on q and k between the
        projection and attention (head norms, rotary nodes), or they were projected apart."""
        return self.qk_norm or not self.rotary_in_attention or not self.packed_qkv
