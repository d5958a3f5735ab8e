"""MoE-CAP's sparsity-aware utilisation of one decode step: S-MBU and S-MFU (arXiv 2412.07067), counted right.

    ModelConfig + the step's routing (activated experts per MoE layer) + each sequence's context length
      --> decode_step_bytes: bytes the step must read from memory (weights it touches + the K/V it attends over)
      --> decode_step_flops: FLOPs the step must do (top-k experts per token, projections, attention over each
          sequence's OWN context: padding never counts)
      --> s_mbu = bytes / (step_s x peak_bytes_per_s),  s_mfu = flops / (step_s x peak_flops_per_s)

Counting rules (one decode token per sequence; B sequences):
  bytes, each weight read once per step, x dtype_bytes:
    experts      per MoE layer, the UNION over the batch's tokens of the experts they route to: 3 x D x I each
                 (gate, up, down); a model with fused experts reads the same bytes
    router       E x D per MoE layer (every logit is computed); shared expert 3 x D x I_s (+ D for its gate)
    dense MLP    3 x D x I_dense per dense layer
    attention    every projection's weight and bias, and the norms (input, post-attention, q/k norms); MLA:
                 q_a/q_b (or q), kv_a (with the rotary key), kv_b, o, and the q_a / kv_a norms
    final norm   D
    embedding    one row (D) per DISTINCT token id fed this step (only those rows are gathered); none when the
                 embedding is tied to lm_head (the whole matrix is read there anyway)
    lm_head      the whole V x D matrix (every sequence samples from all V logits)
    K/V          per sequence, context_len x per-token cache bytes x layers; GQA: 2 x Hkv x d; MLA: the latent
                 (kv_lora_rank + qk_rope_head_dim). ``context_len`` = the keys its new token attends to
                 (position + 1, the token's own K/V included). Cache writes are not reads: not counted.
  FLOPs (2 per multiply-add), per token unless said:
    experts      top_k x 2 x 3 x D x I per MoE layer (the k activations, not the union)
    router       2 x D x E; shared expert 2 x 3 x D x I_s (+ 2 x D gate); dense MLP 2 x 3 x D x I_dense
    projections  2 x (attention weight parameters) per layer (biases and norms not counted)
    scores       per layer and sequence: 2 x H x d x ctx (q.k) + 2 x H x d x ctx (p.v) for GQA; MLA in its
                 absorbed decode form (attention in the latent space the cache holds, as FlashMLA runs it):
                 2 x H x (kv_lora + rope) x ctx + 2 x H x kv_lora x ctx, its kv_b product once per token
                 (inside "projections")
    lm_head      2 x D x V
  Not counted: norms, rotary, softmax, activation functions, sampling (elementwise, negligible at these sizes).

Legend: T tokens, L MoE layers, K top-k, D hidden, I expert width, E experts, V vocab, H heads, d head_dim.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from epserve.model.config import AttentionKind, ModelConfig, QKNorm

# Published peaks (dense, no sparsity), one GPU.
H200_PEAK_BYTES_PER_S = 4.8e12        # HBM3e, NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200)
H200_PEAK_BF16_FLOPS = 989e12         # BF16 Tensor Core dense (the datasheet's 1,979 TFLOPS is with sparsity)


@dataclass(frozen=True, kw_only=True)
class StepCounts:
    """Bytes read and FLOPs of one decode step, by part (keys as in the module docstring)."""

    bytes_by_part: dict[str, int]
    flops_by_part: dict[str, int]

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_part.values())

    @property
    def flops(self) -> int:
        return sum(self.flops_by_part.values())


def activated_experts(topk_ids_TLK: np.ndarray) -> list[frozenset[int]]:
    """Per MoE layer, the experts at least one of the step's tokens routes to (the union over tokens)."""
    ids = np.asarray(topk_ids_TLK)
    if ids.ndim != 3:
        raise ValueError(f"topk_ids must be [tokens, MoE layers, top-k], got shape {ids.shape}")
    return [frozenset(np.unique(ids[:, m, :]).tolist()) for m in range(ids.shape[1])]


def attention_weight_params(c: ModelConfig) -> int:
    """Parameters of one layer's attention projections (weights only)."""
    if c.attention is AttentionKind.MLA:
        H, qk = c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
        q = c.hidden_size * H * qk if c.q_lora_rank is None else \
            c.hidden_size * c.q_lora_rank + c.q_lora_rank * H * qk
        kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + \
            c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        return q + kv + H * c.v_head_dim * c.hidden_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return c.hidden_size * (q + 2 * kv) + q * c.hidden_size


def _attention_extra_params(c: ModelConfig) -> int:
    """Biases and norms of one layer's attention block (input and post-attention norms included)."""
    n = 2 * c.hidden_size
    if c.attention is AttentionKind.MLA:
        return n + (c.q_lora_rank or 0) + c.kv_lora_rank
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    n += (q + 2 * kv) * c.qkv_bias + c.hidden_size * c.o_bias
    n += {QKNorm.NONE: 0, QKNorm.PER_HEAD: 2 * c.head_dim, QKNorm.FULL: q + kv}[c.qk_norm]
    return n


def kv_values_per_token_layer(c: ModelConfig) -> int:
    """Cached values per token and layer: K and V of the KV heads, or MLA's latent + rotary key."""
    if c.attention is AttentionKind.MLA:
        return c.kv_lora_rank + c.qk_rope_head_dim
    return 2 * c.num_kv_heads * c.head_dim


def _shared_params(c: ModelConfig) -> int:
    if not c.shared_expert_intermediate_size:
        return 0
    return 3 * c.hidden_size * c.shared_expert_intermediate_size + c.hidden_size * c.shared_expert_gated


def _check_step(c: ModelConfig, activated_L: Sequence[Iterable[int]], context_lens: Sequence[int]) -> None:
    if len(activated_L) != c.num_moe_layers:
        raise ValueError(f"activated experts: {len(activated_L)} layers given, the model has {c.num_moe_layers} "
                         f"MoE layers")
    for m, experts in enumerate(activated_L):
        bad = [e for e in experts if not 0 <= int(e) < c.num_experts]
        if bad:
            raise ValueError(f"activated experts: MoE layer {m} names expert {bad[0]}, not in [0, {c.num_experts})")
    if not len(context_lens) or any(int(n) < 1 for n in context_lens):
        raise ValueError(f"context_lens: one length >= 1 per sequence is needed, got {list(context_lens)}")


def decode_step_bytes(c: ModelConfig, activated_L: Sequence[Iterable[int]], context_lens: Sequence[int], *,
                      dtype_bytes: int, kv_dtype_bytes: int | None = None,
                      token_ids: Sequence[int] | None = None) -> dict[str, int]:
    """Bytes one decode step reads, by part. ``activated_L``: per MoE layer, the experts the batch routes to;
    ``context_lens``: per sequence, the keys its new token attends to; ``token_ids``: the ids fed (embedding
    rows; default: all distinct, one per sequence)."""
    _check_step(c, activated_L, context_lens)
    D, L_moe, L_dense = c.hidden_size, c.num_moe_layers, c.num_layers - c.num_moe_layers
    rows = len(set(token_ids)) if token_ids is not None else len(context_lens)
    kv_bytes = dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes
    params = {
        "experts": sum(len(set(int(e) for e in experts)) for experts in activated_L) * 3 * D * c.moe_intermediate_size,
        "router": L_moe * c.num_experts * D,
        "shared_expert": L_moe * _shared_params(c),
        "dense_mlp": L_dense * 3 * D * c.dense_intermediate_size,
        "attention": c.num_layers * (attention_weight_params(c) + _attention_extra_params(c)) + D,   # + final norm
        "embedding": 0 if c.tie_word_embeddings else rows * D,
        "lm_head": c.vocab_size * D,
    }
    out = {k: v * dtype_bytes for k, v in params.items()}
    out["kv"] = int(sum(int(n) for n in context_lens)) * c.num_layers * kv_values_per_token_layer(c) * kv_bytes
    return out


def decode_step_flops(c: ModelConfig, context_lens: Sequence[int]) -> dict[str, int]:
    """FLOPs of one decode step (one token per sequence), by part; attention over each sequence's own context."""
    if not len(context_lens) or any(int(n) < 1 for n in context_lens):
        raise ValueError(f"context_lens: one length >= 1 per sequence is needed, got {list(context_lens)}")
    B, ctx = len(context_lens), int(sum(int(n) for n in context_lens))
    D, L_moe, L_dense = c.hidden_size, c.num_moe_layers, c.num_layers - c.num_moe_layers
    if c.attention is AttentionKind.MLA:
        per_key = c.num_heads * (c.kv_lora_rank + c.qk_rope_head_dim) + c.num_heads * c.kv_lora_rank
    else:
        per_key = 2 * c.num_heads * c.head_dim
    return {
        "experts": B * L_moe * c.top_k * 2 * 3 * D * c.moe_intermediate_size,
        "router": B * L_moe * 2 * D * c.num_experts,
        "shared_expert": B * L_moe * 2 * _shared_params(c),
        "dense_mlp": B * L_dense * 2 * 3 * D * c.dense_intermediate_size,
        "projections": B * c.num_layers * 2 * attention_weight_params(c),
        "scores": c.num_layers * 2 * per_key * ctx,
        "lm_head": B * 2 * D * c.vocab_size,
    }


def decode_step_counts(c: ModelConfig, activated_L: Sequence[Iterable[int]], context_lens: Sequence[int], *,
                       dtype_bytes: int, kv_dtype_bytes: int | None = None,
                       token_ids: Sequence[int] | None = None) -> StepCounts:
    return StepCounts(bytes_by_part=decode_step_bytes(c, activated_L, context_lens, dtype_bytes=dtype_bytes,
                                                      kv_dtype_bytes=kv_dtype_bytes, token_ids=token_ids),
                      flops_by_part=decode_step_flops(c, context_lens))


def s_mbu(bytes_read: float, step_s: float, peak_bytes_per_s: float) -> float:
    """Sparsity-aware memory-bandwidth utilisation: bytes the step had to read / (time x peak bandwidth)."""
    _check_positive(step_s=step_s, peak_bytes_per_s=peak_bytes_per_s)
    return bytes_read / (step_s * peak_bytes_per_s)


def s_mfu(flops: float, step_s: float, peak_flops_per_s: float) -> float:
    """Sparsity-aware FLOP utilisation: FLOPs the step had to do / (time x peak FLOP rate)."""
    _check_positive(step_s=step_s, peak_flops_per_s=peak_flops_per_s)
    return flops / (step_s * peak_flops_per_s)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
