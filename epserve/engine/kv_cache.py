"""Paged KV cache: fixed-size blocks, a free list, a block table per sequence, accounting in bytes and tokens.

    BlockLedger (metadata only, deterministic)      PagedKVCache (one rank's tensors)
      reserve(step needs) -> all-or-nothing            ledger + k [layers, blocks*block_size, Hkv, k_dim]
      free(seq)                                               + v [layers, blocks*block_size, Hkv, v_dim] (v_dim > 0)
      slots(seq, positions), table(seq)                write(layer, slots, k, v) / read(layer, slots) / layer(l)

The ledger is pure bookkeeping, so every rank can keep the ledger of every other rank (two_a2a: a sequence's
KV lives on its home rank only) and every rank refuses a step that does not fit in the same way, before any
collective runs. Under coherent EP every rank holds every sequence and all ledgers are the same.

A cache without a V tensor (``v_dim == 0``) holds one row per token and head whose first columns serve as the
values (MLA: one latent row [kv_lora_rank + rope_dim] per token, values = its first kv_lora_rank columns).
Attention reads the cache through block tables: epserve/engine/paged_attention.py.

Legend: L attention layers, P slots (= blocks x block_size), S slots read, T tokens, Hkv kv heads,
d k_dim (K) or v_dim (V).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


class KVCacheFullError(RuntimeError):
    """A step needs more KV blocks than a rank has free (the scheduler should have checked kv_stats)."""


@dataclass(frozen=True, kw_only=True, init=False)
class KVCacheConfig:
    """Shape of one rank's cache: ``num_layers`` x slots x ``num_kv_heads`` x (``k_dim`` for K, ``v_dim`` for V).
    ``v_dim == 0``: no V tensor (the values are the first columns of K). ``head_dim=d`` (the GQA case) is short
    for ``k_dim=d, v_dim=d``."""

    num_layers: int
    num_kv_heads: int
    k_dim: int
    v_dim: int
    capacity_tokens: int
    block_size: int = 16
    dtype: torch.dtype = torch.float32

    def __init__(self, *, num_layers: int, num_kv_heads: int, capacity_tokens: int, k_dim: int | None = None,
                 v_dim: int | None = None, head_dim: int | None = None, block_size: int = 16,
                 dtype: torch.dtype = torch.float32) -> None:
        if head_dim is not None and (k_dim is not None or v_dim is not None):
            raise ValueError("kv cache: give head_dim, or k_dim (and v_dim), not both")
        if head_dim is not None:
            k_dim = v_dim = head_dim
        if k_dim is None:
            raise ValueError("kv cache: k_dim (or head_dim) is required")
        values = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, k_dim=k_dim,
                      v_dim=k_dim if v_dim is None else v_dim, capacity_tokens=capacity_tokens,
                      block_size=block_size, dtype=dtype)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        for name in ("num_layers", "num_kv_heads", "k_dim", "v_dim", "capacity_tokens", "block_size"):
            value = getattr(self, name)
            low = 0 if name == "v_dim" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "non-negative" if low == 0 else "positive"
                raise ValueError(f"kv cache {name} must be a {kind} integer, got {value!r}")

    @property
    def num_blocks(self) -> int:
        return -(-self.capacity_tokens // self.block_size)

    @property
    def has_v(self) -> bool:
        return self.v_dim > 0

    @property
    def entry_elems(self) -> int:
        """K and V elements of one token at one layer."""
        return self.num_kv_heads * (self.k_dim + self.v_dim)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token at every attention layer."""
        return self.num_layers * self.entry_elems * torch.empty((), dtype=self.dtype).element_size()


class BlockLedger:
    """Which blocks each sequence owns on one rank. Blocks are handed out lowest id first."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest id
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._table_tensors: dict[int, torch.Tensor] = {}   # cache of _tables as tensors

    def length(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def blocks_needed(self, seq_id: int, new_length: int) -> int:
        have = len(self._tables.get(seq_id, ()))
        return max(0, -(-new_length // self.block_size) - have)

    def check(self, lengths: Mapping[int, int], *, where: str) -> None:
        """Raise KVCacheFullError unless every sequence can grow to ``lengths[seq_id]`` tokens."""
        need = sum(self.blocks_needed(s, n) for s, n in lengths.items())
        if need > len(self._free):
            raise KVCacheFullError(f"KV cache full on {where}: the step needs {need} more blocks of "
                                   f"{self.block_size} tokens, {len(self._free)} of {self.num_blocks} are free")

    def reserve(self, lengths: Mapping[int, int], *, where: str) -> None:
        """Grow each sequence to hold ``lengths[seq_id]`` tokens; all or nothing."""
        self.check(lengths, where=where)
        for s, n in lengths.items():
            table = self._tables.setdefault(s, [])
            for _ in range(self.blocks_needed(s, n)):
                table.append(self._free.pop())
            self._table_tensors.pop(s, None)
            self._lengths[s] = max(self._lengths.get(s, 0), n)

    def free(self, seq_id: int) -> None:
        for block in reversed(self._tables.pop(seq_id, [])):
            self._free.append(block)
        self._table_tensors.pop(seq_id, None)
        self._free.sort(reverse=True)
        self._lengths.pop(seq_id, None)

    def blocks(self, seq_id: int) -> tuple[int, ...]:
        """The sequence's block table (host metadata)."""
        return tuple(self._tables[seq_id])

    def table(self, seq_id: int) -> torch.Tensor:
        if seq_id not in self._table_tensors:
            self._table_tensors[seq_id] = torch.tensor(self._tables[seq_id], dtype=torch.long)
        return self._table_tensors[seq_id]

    def slots(self, seq_id: int, positions: torch.Tensor) -> torch.Tensor:
        """Flat slot index of each position of a sequence (positions must be reserved)."""
        positions = positions.to(torch.long).cpu()
        return self.table(seq_id)[positions // self.block_size] * self.block_size + positions % self.block_size

    def slot_range(self, seq_id: int, start: int, n: int) -> np.ndarray:
        """Slots of positions [start, start + n) of a sequence (reserved), as host int64: plain integer math for
        one decode position, one numpy gather for a prefill chunk (no torch call per sequence and step)."""
        table, bs = self._tables[seq_id], self.block_size
        if n == 1:
            return np.array([table[start // bs] * bs + start % bs], dtype=np.int64)
        pos = np.arange(start, start + n, dtype=np.int64)
        return np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def used_tokens(self) -> int:
        return sum(self._lengths.values())

    @property
    def num_sequences(self) -> int:
        return len(self._tables)


class PagedKVCache:
    """One rank's K/V tensors for every attention layer, addressed by slot (``v_LPHd`` is None when v_dim == 0)."""

    def __init__(self, config: KVCacheConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.ledger = BlockLedger(config.num_blocks, config.block_size)
        P = config.num_blocks * config.block_size
        self.k_LPHd = torch.zeros((config.num_layers, P, config.num_kv_heads, config.k_dim), dtype=config.dtype,
                                  device=device)
        self.v_LPHd = None if not config.has_v else torch.zeros(
            (config.num_layers, P, config.num_kv_heads, config.v_dim), dtype=config.dtype, device=device)

    def write(self, layer: int, slots_T: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor | None) -> None:
        if (v_THd is None) == self.config.has_v:
            raise ValueError(f"kv cache with v_dim={self.config.v_dim}: "
                             f"{'a V tensor is required' if self.config.has_v else 'it holds no V tensor'}")
        slots_T = slots_T.to(self.k_LPHd.device)
        self.k_LPHd[layer, slots_T] = k_THd.to(self.config.dtype)
        if v_THd is not None:
            self.v_LPHd[layer, slots_T] = v_THd.to(self.config.dtype)

    def read(self, layer: int, slots_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        slots_S = slots_S.to(self.k_LPHd.device)
        return self.k_LPHd[layer, slots_S], None if self.v_LPHd is None else self.v_LPHd[layer, slots_S]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k_PHd, v_PHd or None) of one layer: views, for paged attention."""
        return self.k_LPHd[layer], None if self.v_LPHd is None else self.v_LPHd[layer]

    @property
    def capacity_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_LPHd, self.v_LPHd) if t is not None)

    @property
    def used_bytes(self) -> int:
        return self.ledger.used_blocks * self.config.block_size * self.config.bytes_per_token


@dataclass(frozen=True, kw_only=True)
class RankKVStats:
    rank: int
    num_blocks: int
    used_blocks: int
    capacity_tokens: int
    used_tokens: int
    capacity_bytes: int
    used_bytes: int
    sequences: int

    @property
    def free_tokens(self) -> int:
        """Tokens that still fit in whole free blocks."""
        return (self.num_blocks - self.used_blocks) * (self.capacity_tokens // self.num_blocks)


@dataclass(frozen=True, kw_only=True)
class KVStats:
    replicated: bool        # coherent EP: every rank holds the KV of every sequence
    block_size: int
    bytes_per_token: int    # K and V of one token at every attention layer
    per_rank: tuple[RankKVStats, ...]


class KVStore:
    """This rank's cache plus the block ledgers of every rank of the group (metadata), so every rank can
    answer for every other and refuse an oversized step identically."""

    def __init__(self, config: KVCacheConfig, *, rank: int, world_size: int, replicated: bool,
                 device: torch.device | str = "cpu") -> None:
        self.config, self.rank, self.replicated = config, rank, replicated
        self.cache = PagedKVCache(config, device)
        self.ledgers = [self.cache.ledger if (replicated or g == rank) else
                        BlockLedger(config.num_blocks, config.block_size) for g in range(world_size)]

    def _ledger(self, home_rank: int) -> BlockLedger:
        return self.cache.ledger if self.replicated else self.ledgers[home_rank]

    def release(self, seq_ids) -> None:
        for ledger in {id(x): x for x in self.ledgers}.values():
            for s in seq_ids:
                ledger.free(s)

    def reserve_step(self, works) -> dict[int, np.ndarray]:
        """Reserve room for the tokens of every SeqWork (all or nothing, on every ledger); returns the slots of
        the sequences whose KV this rank holds: seq_id -> [n] slots of the step's new positions."""
        grow: dict[int, dict[int, int]] = {}
        for w in works:
            owner = 0 if self.replicated else w.home_rank
            ledger = self._ledger(w.home_rank)
            if not self.replicated and any(g != owner and x.holds(w.seq_id) for g, x in enumerate(self.ledgers)):
                raise ValueError(f"seq {w.seq_id}: home rank changed to {owner} while its KV lives elsewhere")
            if ledger.length(w.seq_id) != w.start_pos:
                raise ValueError(f"seq {w.seq_id}: the plan feeds positions from {w.start_pos}, but the KV cache "
                                 f"of rank {owner} holds {ledger.length(w.seq_id)} of them")
            grow.setdefault(owner, {})[w.seq_id] = w.start_pos + len(w.token_ids)
        for owner, lengths in grow.items():
            self._ledger(owner).check(lengths, where="every rank" if self.replicated else f"rank {owner}")
        for owner, lengths in grow.items():
            self._ledger(owner).reserve(lengths, where=f"rank {owner}")
        mine = self.cache.ledger
        return {w.seq_id: mine.slot_range(w.seq_id, w.start_pos, len(w.token_ids))
                for w in works if self.replicated or w.home_rank == self.rank}

    def stats(self) -> KVStats:
        c = self.config
        per_rank = tuple(RankKVStats(rank=g, num_blocks=x.num_blocks, used_blocks=x.used_blocks,
                                     capacity_tokens=x.num_blocks * x.block_size, used_tokens=x.used_tokens,
                                     capacity_bytes=x.num_blocks * x.block_size * c.bytes_per_token,
                                     used_bytes=x.used_blocks * x.block_size * c.bytes_per_token,
                                     sequences=x.num_sequences) for g, x in enumerate(self.ledgers))
        return KVStats(replicated=self.replicated, block_size=c.block_size, bytes_per_token=c.bytes_per_token,
                       per_rank=per_rank)
