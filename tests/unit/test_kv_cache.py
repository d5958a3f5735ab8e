"""Paged KV cache: block tables, free list, accounting, all-or-nothing reservation, per-rank ledgers."""

from __future__ import annotations

import pytest
import torch

from epserve.engine.kv_cache import BlockLedger, KVCacheConfig, KVCacheFullError, KVStore, PagedKVCache
from epserve.engine.plan import SeqWork

CFG = KVCacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, capacity_tokens=16, block_size=4)


def test_config_accounting():
    assert CFG.num_blocks == 4
    assert CFG.bytes_per_token == 2 * 2 * 2 * 4 * 4   # K and V x layers x kv heads x head_dim x float32
    with pytest.raises(ValueError, match="block_size"):
        KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, capacity_tokens=4, block_size=0)


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
    slots_S, pos_S, seq_S = rep.key_index([], [])
    assert slots_S.numel() == pos_S.numel() == seq_S.numel() == 0
