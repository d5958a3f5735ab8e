"""Attention over the paged KV cache, with torch's scaled_dot_product_attention (SDPA).

    once per held-token set (host metadata; StepAttention caches it for the step):
      held tokens (seq, pos) --group by sequence--> decode group (one query per sequence: the hot case)
                                                    + multi-query group (prefill chunks: Q queries per sequence)
      per group: block tables [U, B] (padded with block 0), query rows [U, Q] and positions (padded by repeating
      a real query), where each real query's output goes --> ONE host-to-device copy (pinned on CUDA)
      --> key mask [U, 1, Q, S] = k_pos <= q_pos, built on the device
    per layer (paged_attention), per chunk of a group's sequences (CPU: ~4 MiB of K + V, so the copy is still in
    cache when SDPA reads it):
      k/v of the chunk's sequences gathered through the block tables: [U, Hkv, S = B x block_size, d]
      --SDPA (query heads folded onto their kv head: [U, Hkv, G x Q, d], G = H / Hkv; no K/V copies)-->
      o_NHv in the held tokens' order

No [H, T, sum S] score tensor across sequences: a sequence's queries only meet its own keys, so decode costs
time linear in its context. A cache without V (``v_PHd is None``: MLA's latent rows) uses the first
``value_dim`` columns of K as the values (a view, no copy); ``scale`` defaults to 1 / sqrt(k_dim).

Numerics. float32: SDPA (it accumulates q.k and p.v in float32, softmax in float32); equals the dense reference
``attend`` to ~1e-7. bfloat16 / float16: SDPA does NOT round like transformers' eager attention (eager rounds
the scores to bfloat16 before its float32 softmax, and the probabilities again before p.v): it is more precise,
but a near-tie in a greedy argmax then flips (measured: a top-8 Qwen3-MoE tiny model's 5th bf16 token differed
from the one-process forward's). So in reduced precision the default (``eager_rounding=None``) runs eager's
rule on the same gathered, per-sequence tensors: q.k matmul in the input dtype, x scale, mask, softmax in
float32 cast back, p.v matmul; still no cross-sequence scores, still linear in context, and the runtime's tokens
equal the one-process forward's (tests/dist/test_runner_lossless.py, bf16 cases). ``eager_rounding=False``
forces SDPA (faster kernels on GPU; at least as close to the float32 result as eager, tests/unit/
test_paged_attention.py). ``attend`` stays the bit-exact eager reference of the one-process forward.

Host syncs: none; every index is host metadata (step plan + ledger) copied to the device once per context.

Legend: N held tokens (queries), H query heads, Hkv kv heads, G = H / Hkv, U sequences of a group, Q query slots
per sequence, B blocks per sequence (padded), S = B x block_size key slots, P cache slots, R real queries of a
group, dk key width, dv value width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from epserve.engine.kv_cache import BlockLedger


@dataclass(frozen=True, eq=False)
class QueryGroup:
    """Sequences attended together in one SDPA call (device index tensors)."""

    rows_UQ: torch.Tensor      # held-token row of each query slot (padding slots repeat their sequence's last)
    blocks_UB: torch.Tensor    # cache blocks of each sequence, padded with block 0 (masked out)
    mask_U1QS: torch.Tensor    # bool: key slot s is visible to query slot q (k_pos <= q_pos)
    real_R: torch.Tensor       # flat index (u * Q + q) of every real query slot
    dest_R: torch.Tensor       # its held-token row

    @property
    def num_queries(self) -> int:
        return self.rows_UQ.shape[1]


@dataclass(frozen=True, eq=False)
class AttentionContext:
    """Everything the attention of one held-token set needs, built once and shared by every layer that sees
    the same held tokens. Host fields are numpy; the rest live on the device."""

    num_tokens: int             # N
    block_size: int
    pos_N: torch.Tensor         # device long: query positions (rotary)
    slot_N: torch.Tensor        # device long: cache slot where each held token's own K/V goes
    groups: tuple[QueryGroup, ...]
    seq_U: np.ndarray           # host: the sequences among the held tokens (ascending id)
    upto_U: np.ndarray          # host: positions [0, upto) of each that the keys span


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy to the device; pinned + non_blocking on CUDA (the source is a fresh host tensor that stays
    referenced by the copy until it completes)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def build_context(ledger: BlockLedger, seq_N: np.ndarray, pos_N: np.ndarray, slot_N: np.ndarray,
                  device: torch.device | str = "cpu") -> AttentionContext:
    """The attention context of held tokens (sequence, position and cache slot of each, host arrays). Each
    sequence's keys span positions [0, max held position + 1), which must all be in ``ledger``."""
    device = torch.device(device)
    seq_N, pos_N = np.asarray(seq_N, dtype=np.int64), np.asarray(pos_N, dtype=np.int64)
    N, bs = len(seq_N), ledger.block_size
    seq_U, inverse_N, n_U = np.unique(seq_N, return_inverse=True, return_counts=True)
    upto_U = np.zeros(len(seq_U), dtype=np.int64)
    np.maximum.at(upto_U, inverse_N, pos_N + 1)
    order = np.lexsort((pos_N, inverse_N))               # held rows by (sequence, position)
    start_U = np.concatenate([[0], np.cumsum(n_U)[:-1]])
    parts, plans = [np.asarray(pos_N), np.asarray(slot_N, dtype=np.int64)], []
    for members in (np.flatnonzero(n_U == 1), np.flatnonzero(n_U > 1)):   # decode, then multi-query
        if len(members) == 0:
            continue
        U, Q = len(members), int(n_U[members].max())
        B = int(-(-upto_U[members].max() // bs))
        j_UQ = np.minimum(np.arange(Q)[None, :], n_U[members][:, None] - 1)   # padding repeats the last query
        rows_UQ = order[start_U[members][:, None] + j_UQ]
        real_UQ = np.arange(Q)[None, :] < n_U[members][:, None]
        real_R = np.flatnonzero(real_UQ)
        blocks_UB = np.zeros((U, B), dtype=np.int64)
        for i, u in enumerate(members.tolist()):
            table = ledger.blocks(int(seq_U[u]))
            need = -(-int(upto_U[u]) // bs)
            if len(table) < need:
                raise ValueError(f"seq {int(seq_U[u])}: keys up to position {int(upto_U[u])} but the ledger "
                                 f"holds {len(table)} blocks of {bs}")
            blocks_UB[i, :need] = table[:need]
        parts += [rows_UQ.reshape(-1), pos_N[rows_UQ].reshape(-1), blocks_UB.reshape(-1), real_R,
                  rows_UQ.reshape(-1)[real_R]]
        plans.append((U, Q, B, len(real_R)))
    flat = _to_device(torch.from_numpy(np.concatenate(parts)), device)   # the one copy of this context
    pos_d, slot_d = flat[:N], flat[N:2 * N]
    at, groups = 2 * N, []
    for U, Q, B, R in plans:
        sizes = (U * Q, U * Q, U * B, R, R)
        rows, qpos, blocks, real, dest = torch.split(flat[at:at + sum(sizes)], sizes)
        at += sum(sizes)
        k_pos_S = torch.arange(B * bs, device=device)
        mask = k_pos_S[None, None, None, :] <= qpos.view(U, 1, Q, 1)
        groups.append(QueryGroup(rows_UQ=rows.view(U, Q), blocks_UB=blocks.view(U, B), mask_U1QS=mask,
                                 real_R=real, dest_R=dest))
    return AttentionContext(num_tokens=N, block_size=bs, pos_N=pos_d, slot_N=slot_d, groups=tuple(groups),
                            seq_U=seq_U, upto_U=upto_U)


@dataclass
class GatherScratch:
    """Reusable buffers for the gathered K/V (one per role), grown as needed. Fresh multi-MB host allocations
    page-fault on every layer (measured 6x slower gathers on CPU); CUDA's caching allocator makes this a no-op
    there. Not shared between threads."""

    buffers: dict = field(default_factory=dict)

    def take(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = int(np.prod(shape))
        buf = self.buffers.get(role)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self.buffers[role] = buf
        return buf[:numel].view(shape)


def _gather(cache_PHd: torch.Tensor, blocks_UB: torch.Tensor, block_size: int, scratch: GatherScratch | None,
            role: str) -> torch.Tensor:
    """[U, Hkv, S, d] view of the cache rows of every sequence's blocks (one copy, through the block table)."""
    U, B = blocks_UB.shape
    _, Hkv, d = cache_PHd.shape
    blocks_Nbhd = cache_PHd.view(-1, block_size, Hkv, d)
    flat_B = blocks_UB.reshape(-1)
    if scratch is None:
        got = blocks_Nbhd.index_select(0, flat_B)
    else:
        got = torch.index_select(blocks_Nbhd, 0, flat_B, out=scratch.take(role, (U * B, block_size, Hkv, d),
                                                                         cache_PHd))
    return got.view(U, B * block_size, Hkv, d).transpose(1, 2)


CPU_CHUNK_BYTES = 4 << 20   # gathered K + V per chunk of sequences on CPU: stays in cache for SDPA to read


def paged_attention(q_NHd: torch.Tensor, k_PHd: torch.Tensor, v_PHd: torch.Tensor | None, ctx: AttentionContext,
                    *, scale: float | None = None, value_dim: int | None = None,
                    scratch: GatherScratch | None = None, fold_heads: bool = True,
                    eager_rounding: bool | None = None, chunk_bytes: int | None = -1) -> torch.Tensor:
    """Causal attention of the held tokens over one layer's paged cache: query n sees the keys of its own
    sequence at positions <= its own. ``v_PHd`` None: values are the first ``value_dim`` columns of K.
    ``fold_heads`` False: SDPA's own ``enable_gqa`` instead of folding the query heads (measured slower on CPU,
    bench/attention_bench.py; on CUDA enable_gqa rules out the masked memory-efficient kernel).
    ``eager_rounding``: round like transformers' eager attention instead of SDPA (None: in bfloat16 / float16
    only; see the module's notes). ``chunk_bytes``: sequences are gathered and attended in chunks of at most
    this many bytes of K + V (at least one sequence), so the copy is still in cache when SDPA reads it (measured
    1.6x at 4k context on CPU); -1: CPU_CHUNK_BYTES on CPU, no chunks on CUDA; None: no chunks.
    Returns o_NHv (v = value width) in q's dtype."""
    N, H, dk = q_NHd.shape
    Hkv = k_PHd.shape[1]
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} kv heads")
    if N != ctx.num_tokens:
        raise ValueError(f"{N} queries for an attention context of {ctx.num_tokens} tokens")
    if v_PHd is None and value_dim is None:
        raise ValueError("a cache without V needs value_dim (the values are K's first value_dim columns)")
    dv = value_dim if v_PHd is None else v_PHd.shape[-1]
    if eager_rounding is None:
        eager_rounding = q_NHd.dtype in (torch.bfloat16, torch.float16)
    if chunk_bytes == -1:
        chunk_bytes = None if q_NHd.device.type == "cuda" else CPU_CHUNK_BYTES
    row_bytes = Hkv * (dk + (0 if v_PHd is None else dv)) * k_PHd.element_size()   # one key slot's K + V
    out_NHv = q_NHd.new_empty((N, H, dv))
    for g in ctx.groups:
        U, Q = g.rows_UQ.shape
        S = g.mask_U1QS.shape[-1]
        step = U if chunk_bytes is None else max(1, min(U, chunk_bytes // (S * row_bytes)))
        o_XHv = q_NHd.new_empty((U * Q, H, dv))
        for a in range(0, U, step):   # host arithmetic on shapes: no sync
            b = min(U, a + step)
            o_XHv[a * Q:b * Q] = _attend_chunk(q_NHd, k_PHd, v_PHd, g.rows_UQ[a:b], g.blocks_UB[a:b],
                                               g.mask_U1QS[a:b], ctx.block_size, dv, scale, scratch, fold_heads,
                                               eager_rounding)
        out_NHv.index_copy_(0, g.dest_R, o_XHv.index_select(0, g.real_R))
    return out_NHv


def _attend_chunk(q_NHd, k_PHd, v_PHd, rows_UQ, blocks_UB, mask_U1QS, block_size: int, dv: int, scale, scratch,
                  fold_heads: bool, eager_rounding: bool) -> torch.Tensor:
    """o_XHv (X = U x Q query slots) of some sequences of one group."""
    (U, Q), (_, H, dk), Hkv = rows_UQ.shape, q_NHd.shape, k_PHd.shape[1]
    G = H // Hkv
    k_UHSd = _gather(k_PHd, blocks_UB, block_size, scratch, "k")
    v_UHSd = k_UHSd[..., :dv] if v_PHd is None else _gather(v_PHd, blocks_UB, block_size, scratch, "v")
    if k_UHSd.dtype != q_NHd.dtype:
        k_UHSd, v_UHSd = k_UHSd.to(q_NHd.dtype), v_UHSd.to(q_NHd.dtype)
    q_UQHd = q_NHd.index_select(0, rows_UQ.reshape(-1)).view(U, Q, H, dk)
    if not (fold_heads or eager_rounding):
        o_UHQv = _sdpa_gqa(q_UQHd.transpose(1, 2), k_UHSd, v_UHSd, mask_U1QS, scale)
        return o_UHQv.transpose(1, 2).reshape(U * Q, H, dv)
    # the G query heads of each kv head on the query axis: [U, Hkv, G x Q, dk], row g Q + q
    q_UKXd = q_UQHd.view(U, Q, Hkv, G, dk).permute(0, 2, 3, 1, 4).reshape(U, Hkv, G * Q, dk)
    mask = mask_U1QS if Q == 1 else \
        mask_U1QS[:, :, None].expand(U, 1, G, Q, -1).reshape(U, 1, G * Q, -1)   # decode: broadcasts
    if eager_rounding:
        o_UKXv = _eager(q_UKXd, k_UHSd, v_UHSd, mask, dk ** -0.5 if scale is None else scale)
    else:
        o_UKXv = F.scaled_dot_product_attention(q_UKXd, k_UHSd, v_UHSd, attn_mask=mask, scale=scale)
    return o_UKXv.view(U, Hkv, G, Q, dv).permute(0, 3, 1, 2, 4).reshape(U * Q, H, dv)


def _eager(q_UKXd, k_UKSd, v_UKSv, mask, scale: float) -> torch.Tensor:
    """transformers' eager rule (as ``attend``): scores in the input dtype, softmax in float32, cast back."""
    scores_UKXS = torch.matmul(q_UKXd, k_UKSd.transpose(-1, -2)) * scale
    scores_UKXS = scores_UKXS.masked_fill(~mask, float("-inf"))
    probs_UKXS = torch.softmax(scores_UKXS, dim=-1, dtype=torch.float32).to(q_UKXd.dtype)
    return torch.matmul(probs_UKXS, v_UKSv)


def _sdpa_gqa(q_UHQd, k_UKSd, v_UKSv, mask, scale) -> torch.Tensor:
    try:
        return F.scaled_dot_product_attention(q_UHQd, k_UKSd, v_UKSv, attn_mask=mask, scale=scale, enable_gqa=True)
    except TypeError:   # torch < 2.5: broadcast views of the kv heads (expand; the reshape copies)
        U, Hkv, S, _ = k_UKSd.shape
        G = q_UHQd.shape[1] // Hkv
        k_UHSd = k_UKSd[:, :, None].expand(U, Hkv, G, S, -1).reshape(U, Hkv * G, S, -1)
        v_UHSv = v_UKSv[:, :, None].expand(U, Hkv, G, S, -1).reshape(U, Hkv * G, S, -1)
        return F.scaled_dot_product_attention(q_UHQd, k_UHSd, v_UHSv, attn_mask=mask, scale=scale)


class StepAttention:
    """The attention contexts of one step, keyed by the held-token set (under coherent EP the tokens held here
    change at every MoE layer; a set seen before reuses its context). Host metadata only."""

    def __init__(self, ledger: BlockLedger, seq_T: np.ndarray, pos_T: np.ndarray, slot_T: torch.Tensor,
                 device: torch.device | str) -> None:
        self.ledger, self.seq_T, self.pos_T, self.device = ledger, seq_T, pos_T, device
        self.slot_T = slot_T.numpy()
        self._contexts: dict[bytes, AttentionContext] = {}

    def context(self, token_N: torch.Tensor) -> AttentionContext:
        """``token_N``: step-local indices of the held tokens (a host tensor)."""
        t_N = token_N.numpy()
        key = t_N.tobytes()
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = build_context(self.ledger, self.seq_T[t_N], self.pos_T[t_N], self.slot_T[t_N], self.device)
            self._contexts[key] = ctx
        return ctx
