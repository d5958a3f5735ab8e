"""Tensor-parallel attention (``--attention tp``): each of G ranks keeps 1/G of every attention layer's heads.

    q_proj rows of its query heads, k_proj / v_proj rows of the key-value heads those queries read (GQA: when
    G exceeds the key-value heads, each key-value head is replicated on G / Hkv ranks, as other engines do),
    o_proj columns of its query heads --> a rank's attention output is a PARTIAL sum over its heads of the
    layer's output; the partials of the G ranks add up to the one-process output (the runner reduce-scatters
    them, epserve/engine/runner_tp.py). The o_proj bias, if any, stays on rank 0 only.

    q/k norm over the whole projection (OLMoE's ``QKNorm.FULL``) needs every head's values: those layers keep
    the full q_proj / k_proj, normalise, then take their heads (exact; the projection is computed on every
    rank). Per-head norms shard with their heads.

MLA (DeepSeek) caches one latent row per token for all heads: sharding it needs the absorbed MLA path split by
heads, which is not built: ``check_tp`` refuses it by name.

Legend: H query heads, Hkv key-value heads, d head_dim, D hidden, G ranks, r this rank.
"""

from __future__ import annotations

import torch
from torch import nn

from epserve.model.config import AttentionKind, ModelConfig, QKNorm
from epserve.model.layers import Attention
from placement.errors import InputError


def check_tp(config: ModelConfig, world_size: int) -> None:
    """InputError naming the field when the attention heads cannot be split over ``world_size`` ranks."""
    G, H, Hkv = world_size, config.num_heads, config.num_kv_heads
    if config.attention is not AttentionKind.GQA:
        raise InputError(f"--attention tp: {config.model_type} uses multi-head latent attention (one latent K/V row "
                         f"shared by all heads); tensor-parallel MLA is not supported: use --attention dp")
    if H % G:
        raise InputError(f"--attention tp: num_attention_heads {H} cannot be split over {G} ranks")
    if Hkv % G and G % Hkv:
        raise InputError(f"--attention tp: num_key_value_heads {Hkv} can neither be split over {G} ranks nor "
                         f"replicated evenly on them")


def local_kv_heads(config: ModelConfig, world_size: int) -> int:
    """Key-value heads one rank caches: Hkv / G, or 1 when they are replicated (G > Hkv)."""
    return max(1, config.num_kv_heads // world_size)


def shard_attention(attn: Attention, config: ModelConfig, rank: int, world_size: int) -> None:
    """Keep only rank ``rank``'s heads of ``attn`` (in place; the dropped weights are freed)."""
    G, H, Hkv, d = world_size, config.num_heads, config.num_kv_heads, config.head_dim
    h0, hn = rank * H // G, H // G
    kv0 = h0 // (H // Hkv)                       # the key-value head of this rank's first query head
    kvn = local_kv_heads(config, G)
    q_rows, kv_rows = slice(h0 * d, (h0 + hn) * d), slice(kv0 * d, (kv0 + kvn) * d)
    if attn.qk_norm is QKNorm.FULL:              # project everything, normalise, then take the heads
        attn.tp_slices = (q_rows, kv_rows)
    else:
        _keep_rows(attn.q_proj, q_rows)
        _keep_rows(attn.k_proj, kv_rows)
    _keep_rows(attn.v_proj, kv_rows)
    out = attn.o_proj
    out.weight = nn.Parameter(out.weight[:, q_rows].contiguous(), requires_grad=False)
    if out.bias is not None and rank != 0:
        out.bias = nn.Parameter(torch.zeros_like(out.bias), requires_grad=False)
    attn.num_heads, attn.num_kv_heads = hn, kvn


def _keep_rows(linear: nn.Linear, rows: slice) -> None:
    linear.weight = nn.Parameter(linear.weight[rows].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias[rows].contiguous(), requires_grad=False)


def partial_output(attn: Attention, o_THd: torch.Tensor) -> torch.Tensor:
    """This rank's partial of the layer's output, in float32 when the model is 16-bit (the G partials are summed
    in float32 and rounded once, as the one-process output projection accumulates: lossless in bf16)."""
    o_TX = o_THd.reshape(o_THd.shape[0], -1)
    w = attn.o_proj.weight
    if w.dtype in (torch.bfloat16, torch.float16):
        y = o_TX.float() @ w.float().t()
        return y if attn.o_proj.bias is None else y + attn.o_proj.bias.float()
    return attn.o_proj(o_TX)
