"""K/V coherence for coherent EP: every rank holds the KV of every sequence, so the K/V rows a rank computes
are copied to all other ranks, ONCE per step, asynchronously, on the topology's K/V communicator.

    group = attention layers during which no token moves: up to and including a MoE layer, or the layers
            after the last MoE layer. Every row of a group is computed on the same rank.
    during the step:   note(group, tokens held here)       (host metadata: which K/V this rank computed)
    end of the step:   the sampled-id gather carries every rank's row count per group
                       --> launch: pack [token | group | K and V of the group's layers] for every noted row
                       --> all_to_all_single(async) on the K/V group: the same bytes to every other rank
                           (node_dedup: to the ranks of this node and to ONE rank of each other node, the one
                           with this rank's local index; that rank forwards them inside its node, so a row
                           crosses to each other node once)
    next step's start (or before freeing KV): wait [--> forward inside the node --> wait] --> write the rows

A token attends to its own new K/V at once (the computing rank wrote them before attending); only the copies
travel, overlapped with what happens between steps (scheduling, the plan broadcast, embedding).

A row carries, per layer of its group, the token's K (Hkv x k_dim) and, when the cache has a V tensor, its V
(Hkv x v_dim); a cache without V (MLA's latent row) sends K only.

Legend: R rows received, B bytes per row, Y groups, G ranks, P ranks per node, Hkv kv heads, E K and V
elements of one token-layer.
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
    sources: list[int]          # the ranks whose rows arrive, in arrival order
    counts_GY: np.ndarray       # rows each rank sent, per group
    slot_T: torch.Tensor        # slot of every step token in this rank's cache
    relayed: list[int]          # node_dedup: the sources of stage 1 whose rows go on inside this node


class KVCoherence:
    def __init__(self, coll: Collectives, cache: PagedKVCache, groups: list[tuple[int, ...]],
                 moe_layer_of_group: list[int | None], *, node_dedup: bool = False) -> None:
        self.coll, self.cache, self.groups = coll, cache, groups
        self.moe_layer_of_group = moe_layer_of_group   # the counters attribute a group's copies to its MoE layer
        topo = coll.topology
        self.node_dedup = node_dedup and topo.nodes > 1
        c = cache.config
        self._entry = c.entry_elems                               # K (+ V) of one token-layer
        width = max(len(g) for g in groups) * self._entry         # rows padded to the widest group
        self._codec = RowCodec((Field("token", torch.int32, 1), Field("group", torch.int32, 1),
                                Field("kv", c.dtype, width)))
        self._entry_bytes = self._entry * torch.empty((), dtype=c.dtype).element_size()
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

    # ---- sending ------------------------------------------------------------------------------------------
    def launch(self, counts_GY: np.ndarray, slot_T: torch.Tensor) -> None:
        """Send every noted row to every other rank; ``counts_GY[g, y]`` rows of group y come from rank g."""
        if self._pending is not None:
            raise RuntimeError("K/V copies launched twice without a wait")
        topo, me, G = self.coll.topology, self.coll.rank, self.coll.world_size
        rows, entries_Y = [], {}
        for y, token_N in sorted(self._noted.items()):
            layers = self.groups[y]
            kv = [t.flatten(1) for l in layers for t in self.cache.read(l, slot_T[token_N])
                  if t is not None]
            kv_NX = torch.nn.functional.pad(torch.cat(kv, dim=1), (0, self._codec.fields[2].width - len(layers)
                                                                     * self._entry))
            rows.append(self._codec.pack(self.cache.k_LPHd.device, token=token_N[:, None],
                                         group=torch.full((len(token_N), 1), y), kv=kv_NX))
            entries_Y[y] = len(token_N) * len(layers)
        self._noted.clear()
        dev = self.cache.k_LPHd.device
        payload = torch.cat(rows).reshape(-1) if rows else torch.empty(0, dtype=torch.uint8, device=dev)
        bytes_G = counts_GY.sum(axis=1) * self._codec.row_bytes
        if self.node_dedup:
            P, node = topo.gpus_per_node, topo.node
            dests = [g for g in range(G) if g != me and (g // P == node or g % P == me % P)]
        else:
            dests = [g for g in range(G) if g != me]
        send_counts = [payload.numel() if g in dests else 0 for g in range(G)]
        recv_counts = [int(bytes_G[g]) if g in dests else 0 for g in range(G)]   # the relation is symmetric
        cross = sum(1 for g in dests if g // topo.gpus_per_node != topo.node)
        parts = [(self.moe_layer_of_group[y], n * len(dests), n * cross, n * self._entry_bytes * len(dests))
                 for y, n in entries_Y.items()]
        send_B = payload.repeat(len(dests)) if dests else payload[:0]
        recv_B, work = self.coll.all_to_all_bytes(send_B, send_counts, recv_counts, kind=CollKind.KV_COHERENCE,
                                                  phase="kv", parts=parts)
        relayed = [g for g in dests if g // topo.gpus_per_node != topo.node] if self.node_dedup else []
        self._pending = _Pending(work, recv_B, dests, counts_GY, slot_T, relayed)

    def _forward(self, pending: _Pending) -> _Pending:
        """node_dedup, second stage: the rows that crossed into this node go on to its other ranks."""
        topo, me, G = self.coll.topology, self.coll.rank, self.coll.world_size
        P, node = topo.gpus_per_node, topo.node
        row_bytes = self._codec.row_bytes
        bytes_G = pending.counts_GY.sum(axis=1) * row_bytes
        offsets = np.concatenate([[0], np.cumsum([bytes_G[s] for s in pending.sources])])
        pieces = [pending.recv_B[offsets[i]:offsets[i + 1]] for i, s in enumerate(pending.sources)
                  if s in pending.relayed]
        forward_B = torch.cat(pieces) if pieces else pending.recv_B[:0]
        peers = [g for g in range(G) if g // P == node and g != me]
        # what peer q forwards to me: the rows of the other nodes' ranks with q's local index
        relayed_by = {q: [s for s in range(G) if s // P != node and s % P == q % P] for q in peers}
        send_counts = [forward_B.numel() if g in peers else 0 for g in range(G)]
        recv_counts = [int(sum(bytes_G[s] for s in relayed_by[g])) if g in peers else 0 for g in range(G)]
        counts_Y = pending.counts_GY[pending.relayed].sum(axis=0) if pending.relayed else \
            np.zeros(self.num_groups, dtype=np.int64)
        parts = [(self.moe_layer_of_group[y], int(n) * len(self.groups[y]) * len(peers), 0,
                  int(n) * len(self.groups[y]) * self._entry_bytes * len(peers))
                 for y, n in enumerate(counts_Y) if n]
        send_B = forward_B.repeat(len(peers)) if peers else forward_B[:0]
        recv_B, work = self.coll.all_to_all_bytes(send_B, send_counts, recv_counts, kind=CollKind.KV_COHERENCE,
                                                  phase="kv_intra", parts=parts, intra_node=True)
        self._apply(pending.recv_B, pending.sources, pending)
        return _Pending(work, recv_B, [s for q in peers for s in relayed_by[q]], pending.counts_GY,
                        pending.slot_T, [])

    # ---- receiving ----------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Apply the copies in flight (no-op when there are none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.work is not None:
            pending.work.wait()
        if self.node_dedup:
            pending = self._forward(pending)
            if pending.work is not None:
                pending.work.wait()
        self._apply(pending.recv_B, pending.sources, pending)

    def _apply(self, recv_B: torch.Tensor, sources: list[int], pending: _Pending) -> None:
        """Write received rows into the cache. Rows arrive by source (in ``sources`` order), each source's by
        group: the groups are known on the host from the counts, without reading the rows."""
        if not sources or recv_B.numel() == 0:
            return
        got = self._codec.unpack(recv_B.view(-1, self._codec.row_bytes))
        group_R = np.concatenate([np.repeat(np.arange(self.num_groups), pending.counts_GY[s]) for s in sources])
        dev = got["kv"].device
        slot_R = pending.slot_T.to(dev)[got["token"][:, 0].long()]
        for y in np.unique(group_R).tolist():
            rows = torch.as_tensor(np.flatnonzero(group_R == y), device=dev)
            layers = self.groups[y]
            c = self.cache.config
            kv_RLE = got["kv"][rows, :len(layers) * self._entry].reshape(len(rows), len(layers), self._entry)
            k_RLHd = kv_RLE[..., :c.num_kv_heads * c.k_dim].unflatten(-1, (c.num_kv_heads, c.k_dim))
            v_RLHd = kv_RLE[..., c.num_kv_heads * c.k_dim:].unflatten(-1, (c.num_kv_heads, c.v_dim)) \
                if c.has_v else None
            slots_R = slot_R[rows]
            for i, layer in enumerate(layers):
                self.cache.write(layer, slots_R, k_RLHd[:, i], None if v_RLHd is None else v_RLHd[:, i])

    @property
    def in_flight(self) -> int:
        return int(self._pending is not None)
