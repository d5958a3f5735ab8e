"""K/V coherence for coherent EP: every rank holds the KV of every sequence, so the K/V rows a rank computes
are copied to all other ranks, asynchronously, and applied just before the cache is read at that layer again.

    group = attention layers during which no token moves: up to and including a MoE layer, or the layers
            after the last MoE layer. Every row of a group is computed on the same rank.
    end of a group (its MoE layer's dispatch counts / the step's sampled-id gather tell every rank how many
    rows each other rank computed):
        pack [step-local token index | K and V of every layer of the group] for the tokens held here
        --> one all_to_all_single(async_op=True) sending the same rows to every other rank
    first layer of that group in the next step (or before freeing KV): wait --> write the rows into the cache

A token attends to its own new K/V at once (the computing rank wrote them before attending); only the copies
travel, overlapped with the layers that follow.

Legend: N rows held here, R rows received, B bytes per row, Hkv kv heads, d head_dim, T step tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comm.counters import CollKind
from comm.primitives import Collectives
from comm.wire import Field, RowCodec
from epserve.engine.kv_cache import PagedKVCache


@dataclass(frozen=True)
class _Pending:
    work: object | None         # the async collective (None at world size 1: nothing to wait for)
    recv_RB: torch.Tensor
    layers: tuple[int, ...]
    slot_T: torch.Tensor        # slot of every step token in this rank's cache


class KVCoherence:
    def __init__(self, coll: Collectives, cache: PagedKVCache, groups: list[tuple[int, ...]]) -> None:
        self.coll, self.cache, self.groups = coll, cache, groups
        c = cache.config
        self._entry = c.num_kv_heads * c.head_dim
        self._codecs = [RowCodec((Field("token", torch.int32, 1), Field("kv", c.dtype, 2 * len(g) * self._entry)))
                        for g in groups]
        self._entry_bytes = 2 * self._entry * torch.empty((), dtype=c.dtype).element_size()
        self._pending: dict[int, _Pending] = {}

    def launch(self, group: int, token_N: torch.Tensor, peer_rows: list[int], slot_T: torch.Tensor, *,
               moe_layer: int | None) -> None:
        """Send the K/V of ``group``'s layers for the tokens held here (already in the local cache) to every
        other rank; ``peer_rows[g]`` rows come back from rank g."""
        if group in self._pending:
            raise RuntimeError(f"K/V group {group} launched twice without a wait")
        G, me = self.coll.world_size, self.coll.rank
        layers = self.groups[group]
        slots_N = slot_T[token_N]
        kv = [t.reshape(len(token_N), self._entry) for l in layers for t in self.cache.read(l, slots_N)]
        rows_NB = self._codecs[group].pack(self.cache.k_LPHd.device, token=token_N[:, None], kv=torch.cat(kv, dim=1))
        send_counts = [0 if g == me else len(token_N) for g in range(G)]
        recv_counts = [0 if g == me else int(n) for g, n in enumerate(peer_rows)]
        send_SB = rows_NB.repeat(G - 1, 1) if G > 1 else rows_NB[:0]
        recv_RB, work = self.coll.all_to_all_rows(
            send_SB, send_counts, recv_counts, kind=CollKind.KV_COHERENCE, phase="kv", layer=moe_layer,
            payload_bytes_per_row=self._entry_bytes * len(layers), rows_per_send_row=len(layers), async_op=True)
        self._pending[group] = _Pending(work, recv_RB, layers, slot_T)

    def wait(self, group: int) -> None:
        pending = self._pending.pop(group, None)
        if pending is None:
            return
        if pending.work is not None:
            pending.work.wait()
        got = self._codecs[group].unpack(pending.recv_RB)
        slots_R = pending.slot_T[got["token"][:, 0].long().cpu()]
        kv_R2LX = got["kv"].reshape(len(slots_R), len(pending.layers), 2, self.cache.config.num_kv_heads,
                                    self.cache.config.head_dim)
        for i, layer in enumerate(pending.layers):
            self.cache.write(layer, slots_R, kv_R2LX[:, i, 0], kv_R2LX[:, i, 1])

    def flush(self) -> None:
        for group in sorted(self._pending):
            self.wait(group)

    @property
    def in_flight(self) -> int:
        return len(self._pending)
