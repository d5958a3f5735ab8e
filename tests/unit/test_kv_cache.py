"""Paged KV cache: block tables, free list, accounting, all-or-nothing reservation, per-rank ledgers, K/V widths
(a cache without V: MLA's latent rows)."""

from __future__ import annotations

import pytest
import torch

from epserve.engine.kv_cache import BlockLedger, KVCacheConfig, KVCacheFullError, KVStore, PagedKVCache
from epserve.engine.plan import SeqWork

CFG = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, capacity_tokens=16, block_size=4)


def test_config_accounting():
    assert CFG.num_blocks == 4
    assert (CFG.k_dim, CFG.v_dim) == (4, 4)            # head_dim=d is short for k_dim=v_dim=d
    assert CFG == KVCacheConfig(num_layers=2, num_kv_heads=2, k_dim=4, capacity_tokens=16, block_size=4)
    assert CFG.bytes_per_token == 2 * 2 * 2 * 4 * 4   # K and V x layers x kv heads x head_dim x float32
    mla = KVCacheConfig(num_layers=3, num_kv_heads=1, k_dim=576, v_dim=0, capacity_tokens=8, dtype=torch.bfloat16)
    assert not mla.has_v and mla.bytes_per_token == 3 * 576 * 2
    wide = KVCacheConfig(num_layers=1, num_kv_heads=2, k_dim=8, v_dim=6, capacity_tokens=8)
    assert wide.bytes_per_token == 2 * (8 + 6) * 4
    with pytest.raises(ValueError, match="block_size"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, capacity_tokens=4, block_size=0)
    with pytest.raises(ValueError, match="v_dim must be a non-negative integer"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, k_dim=4, v_dim=-1, capacity_tokens=4)
    with pytest.raises(ValueError, match="not both"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, k_dim=4, head_dim=4, capacity_tokens=4)
    with pytest.raises(ValueError, match="k_dim .or head_dim. is required"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, capacity_tokens=4)


def test_ledger_hands_out_lowest_blocks_and_maps_positions_to_slots():
    ledger = BlockLedger(num_blocks=4, block_size=4)
    ledger.reserve({7: 6}, where="rank 0")            # 2 blocks: 0, 1
    ledger.reserve({9: 3}, where="rank 0")            # 1 block: 2
    assert ledger.slots(7, torch.arange(6)).tolist() == [0, 1, 2, 3, 4, 5]
    assert ledger.slots(9, torch.arange(3)).tolist() == [8, 9, 10]
    ledger.reserve({7: 9}, where="rank 0")            # grows into block 3
    assert ledger.slots(7, torch.tensor([8])).tolist() == [12]
    assert (ledger.used_blocks, ledger.used_tokens, ledger.num_sequences) == (4, 12, 2)
    with pytest.raises(KVCacheFullError, match="needs 1 more blocks of 4 tokens, 0 of 4 are free"):
        ledger.reserve({11: 1}, where="rank 0")
    ledger.free(9)
    ledger.reserve({11: 2}, where="rank 0")
    assert ledger.slots(11, torch.arange(2)).tolist() == [8, 9]   # block 2 reused


def test_reservation_is_all_or_nothing():
    ledger = BlockLedger(num_blocks=2, block_size=4)
    with pytest.raises(KVCacheFullError):
        ledger.reserve({1: 4, 2: 4, 3: 1}, where="rank 0")
    assert ledger.used_blocks == 0 and not ledger.holds(1)


def test_paged_cache_write_read():
    cache = PagedKVCache(CFG)
    cache.ledger.reserve({0: 3}, where="r")
    slots = cache.ledger.slots(0, torch.arange(3))
    k = torch.arange(24, dtype=torch.float32).view(3, 2, 4)
    cache.write(1, slots, k, -k)
    got_k, got_v = cache.read(1, slots[[2, 0]])
    assert torch.equal(got_k, k[[2, 0]]) and torch.equal(got_v, -k[[2, 0]])
    assert cache.capacity_bytes == CFG.num_blocks * CFG.block_size * CFG.bytes_per_token
    assert cache.used_bytes == 1 * 4 * CFG.bytes_per_token
    with pytest.raises(ValueError, match="a V tensor is required"):
        cache.write(0, slots, k, None)


def test_cache_without_v_holds_k_rows_only():
    cfg = KVCacheConfig(num_layers=2, num_kv_heads=1, k_dim=6, v_dim=0, capacity_tokens=8, block_size=4)
    cache = PagedKVCache(cfg)
    assert cache.v_LPHd is None and cache.k_LPHd.shape == (2, 8, 1, 6)
    cache.ledger.reserve({0: 2}, where="r")
    slots = cache.ledger.slots(0, torch.arange(2))
    k = torch.randn(2, 1, 6)
    cache.write(0, slots, k, None)
    got_k, got_v = cache.read(0, slots)
    assert torch.equal(got_k, k) and got_v is None
    k_PHd, v_PHd = cache.layer(0)
    assert v_PHd is None and torch.equal(k_PHd[slots], k)
    assert cache.capacity_bytes == 8 * cfg.bytes_per_token
    with pytest.raises(ValueError, match="it holds no V tensor"):
        cache.write(0, slots, k, k)


def test_store_keeps_every_ranks_ledger_and_checks_positions():
    works = [SeqWork(0, (1, 2, 3, 4, 5), 0, 1), SeqWork(1, (1,), 0, 0)]
    two = KVStore(CFG, rank=0, world_size=2, replicated=False)
    slots = two.reserve_step(works)
    assert list(slots) == [1]                           # only seq 1 lives on rank 0
    stats = two.stats()
    assert [r.used_blocks for r in stats.per_rank] == [1, 2] and not stats.replicated
    assert [r.free_tokens for r in stats.per_rank] == [12, 8]
    with pytest.raises(ValueError, match="feeds positions from 0, but the KV cache of rank 1 holds 5"):
        two.reserve_step([SeqWork(0, (1,), 0, 1)])
    with pytest.raises(ValueError, match="home rank changed"):
        two.reserve_step([SeqWork(0, (1,), 5, 0)])
    rep = KVStore(CFG, rank=0, world_size=2, replicated=True)
    assert sorted(rep.reserve_step(works)) == [0, 1]   # every rank holds every sequence
    assert [r.used_blocks for r in rep.stats().per_rank] == [3, 3]
    with pytest.raises(KVCacheFullError, match="KV cache full on every rank"):
        rep.reserve_step([SeqWork(2, tuple(range(8)), 0, 1)])
    rep.release([0, 1])
    assert rep.stats().per_rank[1].used_blocks == 0
