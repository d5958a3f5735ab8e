"""Paged attention (epserve/engine/paged_attention.py) against the dense reference ``attend``: mixed decode +
prefill-chunk batches, GQA / MHA, ragged contexts, blocks scattered in the cache, a cache without V (MLA's
latent rows), a custom scale, both ways of sharing kv heads, bfloat16 (eager rounding by default, SDPA on
request), the per-step context cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epserve.engine.kv_cache import KVCacheConfig, PagedKVCache
from epserve.engine.paged_attention import GatherScratch, StepAttention, build_context, paged_attention
from epserve.model.layers import attend

BS = 4
LENGTHS = {3: 9, 5: 1, 8: 17, 11: 6, 12: 4, 20: 13}   # tokens each sequence holds (ragged, some < one block)


def _scattered_cache(k_dim: int, v_dim: int, Hkv: int, dtype=torch.float32, seed=0) -> PagedKVCache:
    """Every sequence of LENGTHS reserved a block at a time in turns (so its blocks are interleaved with the
    others'), after a sequence that is freed again (so the free list is out of order); random K/V."""
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=Hkv, k_dim=k_dim, v_dim=v_dim, capacity_tokens=160,
                        block_size=BS, dtype=dtype)
    cache = PagedKVCache(cfg)
    cache.ledger.reserve({99: 3 * BS}, where="r")
    grown = dict.fromkeys(LENGTHS, 0)
    while grown != LENGTHS:
        for s, n in LENGTHS.items():
            if grown[s] < n:
                grown[s] = min(n, grown[s] + BS)
                cache.ledger.reserve({s: grown[s]}, where="r")
        if cache.ledger.holds(99):   # after the first round: its blocks go to the second round's sequences
            cache.ledger.free(99)
    gen = torch.Generator().manual_seed(seed)
    cache.k_LPHd.copy_(torch.randn(cache.k_LPHd.shape, generator=gen).to(dtype))
    if cache.v_LPHd is not None:
        cache.v_LPHd.copy_(torch.randn(cache.v_LPHd.shape, generator=gen).to(dtype))
    return cache


def _held(queries: dict[int, int], seed=1):
    """Held tokens: the last ``queries[s]`` positions of each sequence, in a shuffled order."""
    seq = np.array([s for s, q in queries.items() for _ in range(q)], dtype=np.int64)
    pos = np.array([p for s, q in queries.items() for p in range(LENGTHS[s] - q, LENGTHS[s])], dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(seq))
    return seq[perm], pos[perm]


def _dense(cache: PagedKVCache, layer: int, seq_N, pos_N, q_NHd, *, scale=None, value_dim=None):
    """The previous runtime path: every key of every held sequence gathered, then ``attend``."""
    seqs = sorted(set(seq_N.tolist()))
    upto = {s: int(pos_N[seq_N == s].max()) + 1 for s in seqs}
    kseq = torch.tensor([s for s in seqs for _ in range(upto[s])])
    kpos = torch.tensor([p for s in seqs for p in range(upto[s])])
    slots = torch.cat([cache.ledger.slots(s, torch.arange(upto[s])) for s in seqs])
    k_SHd, v_SHd = cache.read(layer, slots)
    if v_SHd is None:
        v_SHd = k_SHd[..., :value_dim]
    if scale is not None:   # attend's scale is d^-0.5: put the ratio into q
        q_NHd = q_NHd * (scale * q_NHd.shape[-1] ** 0.5)
    return attend(q_NHd, k_SHd, v_SHd, torch.as_tensor(pos_N), kpos, torch.as_tensor(seq_N), kseq)


MIXED = {3: 1, 5: 1, 8: 5, 11: 1, 12: 4, 20: 3}   # decode, a one-token sequence, prefill chunks (one from 0)


@pytest.mark.parametrize("H,Hkv,d", [(4, 2, 8), (6, 1, 8), (3, 3, 4)])
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("chunk_bytes", [-1, None, 1, 600])   # default, one gather, one sequence, a few
def test_mixed_batch_equals_dense_reference(H, Hkv, d, fold, chunk_bytes):
    cache = _scattered_cache(d, d, Hkv)
    seq_N, pos_N = _held(MIXED)
    slot_N = np.array([int(cache.ledger.slots(int(s), torch.tensor([int(p)]))) for s, p in zip(seq_N, pos_N)])
    ctx = build_context(cache.ledger, seq_N, pos_N, slot_N)
    assert [g.num_queries for g in ctx.groups] == [1, 5]
    assert ctx.upto_U.tolist() == [LENGTHS[s] for s in sorted(LENGTHS)]
    q_NHd = torch.randn(len(seq_N), H, d, generator=torch.Generator().manual_seed(2))
    for layer in (0, 1):
        got = paged_attention(q_NHd, *cache.layer(layer), ctx, fold_heads=fold, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(got, _dense(cache, layer, seq_N, pos_N, q_NHd), atol=1e-5, rtol=0)


@pytest.mark.parametrize("queries", [{3: 1, 8: 1, 20: 1}, {8: 17}, {12: 2, 20: 13}])
def test_decode_only_and_prefill_only(queries):
    cache = _scattered_cache(8, 8, 2)
    seq_N, pos_N = _held(queries)
    ctx = build_context(cache.ledger, seq_N, pos_N, np.zeros(len(seq_N), dtype=np.int64))
    assert len(ctx.groups) == 1
    q_NHd = torch.randn(len(seq_N), 4, 8)
    torch.testing.assert_close(paged_attention(q_NHd, *cache.layer(1), ctx),
                               _dense(cache, 1, seq_N, pos_N, q_NHd), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fold", [True, False])
def test_latent_cache_without_v_and_custom_scale(fold):
    """MLA's layout: one kv head of rows [latent C | rope r], values = the first C columns, scale != d^-0.5."""
    C, r, H = 12, 4, 8
    cache = _scattered_cache(C + r, 0, 1)
    assert cache.v_LPHd is None
    seq_N, pos_N = _held(MIXED)
    ctx = build_context(cache.ledger, seq_N, pos_N, np.zeros(len(seq_N), dtype=np.int64))
    q_NHd = torch.randn(len(seq_N), H, C + r)
    got = paged_attention(q_NHd, *cache.layer(0), ctx, scale=0.37, value_dim=C, fold_heads=fold, chunk_bytes=900)
    assert got.shape == (len(seq_N), H, C)
    torch.testing.assert_close(got, _dense(cache, 0, seq_N, pos_N, q_NHd, scale=0.37, value_dim=C),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs value_dim"):
        paged_attention(q_NHd, *cache.layer(0), ctx)


def test_value_width_differs_from_key_width():
    cache = _scattered_cache(8, 6, 2)
    seq_N, pos_N = _held(MIXED)
    ctx = build_context(cache.ledger, seq_N, pos_N, np.zeros(len(seq_N), dtype=np.int64))
    q_NHd = torch.randn(len(seq_N), 4, 8)
    got = paged_attention(q_NHd, *cache.layer(0), ctx, scale=0.2)
    assert got.shape == (len(seq_N), 4, 6)
    torch.testing.assert_close(got, _dense(cache, 0, seq_N, pos_N, q_NHd, scale=0.2), atol=1e-5, rtol=0)


def test_scratch_is_reused_across_contexts_and_widths():
    scratch = GatherScratch()
    cache = _scattered_cache(8, 8, 2)
    latent = _scattered_cache(16, 0, 1, seed=3)
    for queries in (MIXED, {8: 1}, {8: 17, 3: 1}):
        seq_N, pos_N = _held(queries)
        zeros = np.zeros(len(seq_N), dtype=np.int64)
        q_NHd = torch.randn(len(seq_N), 4, 8)
        got = paged_attention(q_NHd, *cache.layer(0), build_context(cache.ledger, seq_N, pos_N, zeros),
                              scratch=scratch)
        torch.testing.assert_close(got, _dense(cache, 0, seq_N, pos_N, q_NHd), atol=1e-5, rtol=0)
        q_NHx = torch.randn(len(seq_N), 4, 16)
        got = paged_attention(q_NHx, *latent.layer(1), build_context(latent.ledger, seq_N, pos_N, zeros),
                              value_dim=10, scratch=scratch)
        torch.testing.assert_close(got, _dense(latent, 1, seq_N, pos_N, q_NHx, value_dim=10), atol=1e-5, rtol=0)


def _bf16_case(H=4, Hkv=2, d=32):
    cache16 = _scattered_cache(d, d, Hkv, dtype=torch.bfloat16)
    seq_N, pos_N = _held(MIXED)
    ctx = build_context(cache16.ledger, seq_N, pos_N, np.zeros(len(seq_N), dtype=np.int64))
    q16 = (torch.randn(len(seq_N), H, d, generator=torch.Generator().manual_seed(4)) * 2).to(torch.bfloat16)
    return cache16, seq_N, pos_N, ctx, q16


@pytest.mark.parametrize("H,Hkv,d", [(4, 2, 32), (8, 1, 16), (4, 4, 8)])
def test_bfloat16_default_rounds_like_eager(H, Hkv, d):
    """In reduced precision the default follows the eager rule of ``attend`` (what the one-process forward and
    transformers' eager attention do): bit for bit here."""
    cache16, seq_N, pos_N, ctx, q16 = _bf16_case(H, Hkv, d)
    for chunk_bytes in (-1, 1):
        got = paged_attention(q16, *cache16.layer(0), ctx, chunk_bytes=chunk_bytes)
        assert torch.equal(got, _dense(cache16, 0, seq_N, pos_N, q16))


def test_bfloat16_sdpa_is_at_least_as_close_to_float32_as_eager():
    """eager_rounding=False: SDPA keeps scores and sums in float32 where eager rounds the scores to bfloat16.
    Both are compared with the float32 result of the same (bfloat16-valued) inputs."""
    cache16, seq_N, pos_N, ctx, q16 = _bf16_case()
    cache32 = PagedKVCache(KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=32, capacity_tokens=160,
                                         block_size=BS))
    cache32.ledger = cache16.ledger
    cache32.k_LPHd.copy_(cache16.k_LPHd.float())
    cache32.v_LPHd.copy_(cache16.v_LPHd.float())
    truth = _dense(cache32, 0, seq_N, pos_N, q16.float())
    sdpa = paged_attention(q16, *cache16.layer(0), ctx, eager_rounding=False)
    paged_err = (sdpa.float() - truth).abs().max().item()
    eager_err = (_dense(cache16, 0, seq_N, pos_N, q16).float() - truth).abs().max().item()
    assert paged_err <= eager_err and paged_err < 1e-2, (paged_err, eager_err)


def test_step_attention_caches_by_held_set():
    cache = _scattered_cache(8, 8, 2)
    seq_T, pos_T = _held(MIXED, seed=0)
    slot_T = torch.arange(len(seq_T))
    step = StepAttention(cache.ledger, seq_T, pos_T, slot_T, "cpu")
    a, b = torch.tensor([0, 2, 5]), torch.tensor([1, 2])
    ctx = step.context(a)
    assert step.context(torch.tensor([0, 2, 5])) is ctx and step.context(b) is not ctx
    assert ctx.pos_N.tolist() == pos_T[[0, 2, 5]].tolist() and ctx.slot_N.tolist() == [0, 2, 5]


def test_keys_beyond_the_ledger_are_refused():
    cache = _scattered_cache(8, 8, 2)
    with pytest.raises(ValueError, match="seq 5: keys up to position 6 but the ledger holds 1 blocks of 4"):
        build_context(cache.ledger, np.array([5]), np.array([5]), np.array([0]))


def test_no_host_syncs():
    """The context is built from host metadata (copied to the device once); the attention reads no device value
    on the host (tests/sync_counter.py: device data = everything not made on the host inside the counter)."""
    from tests.sync_counter import SyncCounter

    cache = _scattered_cache(8, 8, 2)
    seq_N, pos_N = _held(MIXED)
    q_NHd = torch.randn(len(seq_N), 4, 8)
    with SyncCounter() as counter:
        ctx = build_context(cache.ledger, seq_N, pos_N, np.zeros(len(seq_N), dtype=np.int64), device="cpu")
        paged_attention(q_NHd, *cache.layer(0), ctx, scratch=GatherScratch())
        paged_attention(q_NHd.to(torch.bfloat16), *(t.to(torch.bfloat16) for t in cache.layer(1)), ctx)
    assert counter.count == 0, counter.ops
