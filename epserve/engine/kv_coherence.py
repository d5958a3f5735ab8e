"""K/V coherence for coherent EP: every rank holds the KV of every sequence, so the K/V rows a rank computes
are copied to all other ranks, ONCE per step, asynchronously, on the topology's K/V communicator.

    group = attention layers during which no token moves: up to and including a MoE layer, or the layers
            after the last MoE layer. Every row of a group is computed on the same rank.
    during the step:   note(group, tokens held here)       (host metadata: which K/V this rank computed)
    end of the step:   the sampled-id gather carries every rank's row count per group
                       --> launch: pack [token | group | K and V of the group's layers] for every noted row
                       --> one all_to_all_single(async) on the K/V group sending the same bytes to every rank
    next step's start (or before freeing KV): wait --> write the rows into the cache

A token attends to its own new K/V at once (the computing rank wrote them before attending); only the copies
travel, overlapped with what happens between steps (scheduling, the plan broadcast, embedding).

Legend: N rows held here, R rows received, B bytes per row, Y groups, G ranks, Hkv kv heads, d head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from comm.counters import CollKind
from comm.primitives import Collectives
from comm.wire import Field, RowCodec
from epserve.engine.kv_cache import PagedKVCache


@dataclass(frozen=True)
class _Pending:
    work: object | None         # the async collective (None at world size 1: nothing to wait for)
    recv_B: torch.Tensor
    counts_GY: np.ndarray       # rows each rank sent, per group
    slot_T: torch.Tensor        # slot of every step token in this rank's cache


class KVCoherence:
    def __init__(self, coll: Collectives, cache: PagedKVCache, groups: list[tuple[int, ...]]) -> None:
        self.coll, self.cache, self.groups = coll, cache, groups
        c = cache.config
        self._entry = c.num_kv_heads * c.head_dim
        width = 2 * max(len(g) for g in groups) * self._entry     # rows padded to the widest group
        self._codec = RowCodec((Field("token", torch.int32, 1), Field("group", torch.int32, 1),
                                Field("kv", c.dtype, width)))
        self._entry_bytes = 2 * self._entry * torch.empty((), dtype=c.dtype).element_size()
        self._noted: dict[int, torch.Tensor] = {}
        self._pending: _Pending | None = None

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def note(self, group: int, token_N: torch.Tensor) -> None:
        """This rank computed the K/V of ``group``'s layers for ``token_N`` (host tensor) in this step."""
        self._noted[group] = token_N

    def discard(self) -> None:
        """Forget the notes of a step that is run again."""
        self._noted.clear()

    def counts_Y(self) -> list[int]:
        """Rows noted per group (ride on the step's sampled-id gather)."""
        return [len(self._noted.get(y, ())) for y in range(self.num_groups)]

    def launch(self, counts_GY: np.ndarray, slot_T: torch.Tensor) -> None:
        """Send every noted row to every other rank; ``counts_GY[g, y]`` rows of group y come from rank g."""
        if self._pending is not None:
            raise RuntimeError("K/V copies launched twice without a wait")
        rows, entries = [], 0
        for y, token_N in sorted(self._noted.items()):
            layers = self.groups[y]
            kv = [t.reshape(len(token_N), self._entry) for l in layers for t in self.cache.read(l, slot_T[token_N])]
            kv_NX = torch.cat(kv, dim=1) if kv else torch.empty(0, 0, dtype=self.cache.config.dtype)
            pad = self._codec.fields[2].width - kv_NX.shape[1]
            kv_NX = torch.nn.functional.pad(kv_NX, (0, pad))
            rows.append(self._codec.pack(self.cache.k_LPHd.device, token=token_N[:, None],
                                         group=torch.full((len(token_N), 1), y), kv=kv_NX))
            entries += len(token_N) * len(layers)
        self._noted.clear()
        dev = self.cache.k_LPHd.device
        payload = torch.cat(rows).reshape(-1) if rows else torch.empty(0, dtype=torch.uint8, device=dev)
        recv_bytes = (counts_GY.sum(axis=1) * self._codec.row_bytes).tolist()
        recv_B, work = self.coll.copy_to_all(payload, recv_bytes, kind=CollKind.KV_COHERENCE, phase="kv",
                                             rows=entries, payload_bytes=entries * self._entry_bytes)
        self._pending = _Pending(work, recv_B, counts_GY, slot_T)

    def wait(self) -> None:
        """Apply the copies in flight (no-op when there are none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.work is not None:
            pending.work.wait()
        got = self._codec.unpack(pending.recv_B.view(-1, self._codec.row_bytes))
        counts_GY = pending.counts_GY.copy()
        counts_GY[self.coll.rank] = 0
        # rows arrive by source, each source's by group: the groups are known on the host without a read
        group_R = np.concatenate([np.repeat(np.arange(self.num_groups), row) for row in counts_GY])
        dev = got["kv"].device
        slot_R = pending.slot_T.to(dev)[got["token"][:, 0].long()]
        for y in np.unique(group_R).tolist():
            rows = torch.as_tensor(np.flatnonzero(group_R == y), device=dev)
            layers = self.groups[y]
            kv = got["kv"][rows, :2 * len(layers) * self._entry]
            kv_RL2X = kv.reshape(len(rows), len(layers), 2, self.cache.config.num_kv_heads,
                                 self.cache.config.head_dim)
            slots_R = slot_R[rows]
            for i, layer in enumerate(layers):
                self.cache.write(layer, slots_R, kv_RL2X[:, i, 0], kv_RL2X[:, i, 1])

    @property
    def in_flight(self) -> int:
        return int(self._pending is not None)
