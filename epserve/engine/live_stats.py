"""LiveStats: live traffic per MoE layer, counted on every rank, summed over the group on demand.

    Runner._moe (every rank, every MoE layer, on the tokens routed here):
        expert_load_LE[m] += count of each expert id  local_L[m] += #(expert's rank == this rank)
        (device tensors, no host sync on the hot path)
    a plan with ``stats=True`` (every rank, after the step; collective on the CPU group):
        vector_X = [per layer: a2a calls, a2a payload bytes, transfers, K/V copy bytes (CommCounters) | local
                    | load_E]
        --HostCollectives.all_gather_int64 (counted: CollKind.STATS, phase "live_stats", layer None)--> [G, X]
        --sum over ranks (calls: the same on every rank)--> LayerTraffic[L]

Legend: L MoE layers, E experts, G ranks, N tokens routed here, K top-k, X = L * (5 + E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comm.counters import CollKind, CommCounters
from comm.host_collectives import HostCollectives
from comm.topology import EPTopology
from epserve.engine.api import LayerTraffic

_COUNTER_COLS = 6   # calls, payload bytes, transfers, K/V copy bytes, local activations, cross-node bytes
STATS_PHASE = "live_stats"


@dataclass(frozen=True)
class GroupTraffic:
    layers: tuple[LayerTraffic, ...]
    gpu_load: tuple[tuple[int, ...], ...]     # [moe layer][gpu] activations


class LiveStats:
    def __init__(self, *, topology: EPTopology, expert_to_rank_LE: torch.Tensor) -> None:
        self.topology = topology
        self.expert_to_rank_LE = expert_to_rank_LE.to(device=topology.device, dtype=torch.long)
        L, E = self.expert_to_rank_LE.shape
        self.num_layers, self.num_experts = L, E
        self.expert_load_LE = torch.zeros(L, E, dtype=torch.int64, device=topology.device)
        self.local_L = torch.zeros(L, dtype=torch.int64, device=topology.device)

    def record(self, moe_layer: int, topk_ids_NK: torch.Tensor) -> None:
        """The router's choices for the tokens held on this rank at one MoE layer (no host sync)."""
        ids = topk_ids_NK.reshape(-1).long()
        # index_add_, not bincount: bincount sizes its output from the data (a host sync on CUDA)
        self.expert_load_LE[moe_layer].index_add_(0, ids, torch.ones_like(ids))
        self.local_L[moe_layer] += (self.expert_to_rank_LE[moe_layer][ids] == self.topology.rank).sum()

    def vector_X(self, counters: CommCounters) -> torch.Tensor:
        """This rank's counts as one int64 CPU vector of fixed size (host sync: off the hot path)."""
        rows = []
        local_L = self.local_L.cpu().tolist()
        for m in range(self.num_layers):
            a2a = counters.total(CollKind.ALL_TO_ALL, layer=m)
            kv = counters.total(CollKind.KV_COHERENCE, layer=m)
            cross = sum(c.payload_bytes * c.cross_node_rows // c.rows for c in (a2a, kv) if c.rows)
            rows.append(torch.tensor([a2a.calls, a2a.payload_bytes, a2a.rows, kv.payload_bytes, local_L[m], cross],
                                     dtype=torch.int64))
        head = torch.stack(rows) if rows else torch.zeros(0, _COUNTER_COLS, dtype=torch.int64)
        return torch.cat([head, self.expert_load_LE.cpu()], dim=1).reshape(-1)

    def gather(self, counters: CommCounters) -> GroupTraffic:
        """Collective over the CPU group: every rank calls it; every rank gets the group's totals. The
        all-gather itself is counted in ``counters`` (CollKind.STATS, layer None), after the vector is read,
        so it never shows in the per-layer figures."""
        vec_X = self.vector_X(counters)
        vec_GX = HostCollectives(self.topology, counters).all_gather_int64(vec_X, phase=STATS_PHASE,
                                                                           kind=CollKind.STATS)
        G = self.topology.world_size
        return self._totals(vec_GX.view(G, self.num_layers, _COUNTER_COLS + self.num_experts))

    def _totals(self, all_GLC: torch.Tensor) -> GroupTraffic:
        calls_GL = all_GLC[:, :, 0]
        if not bool((calls_GL == calls_GL[0]).all()):
            raise RuntimeError(f"live stats: ranks disagree on all-to-all calls per layer: {calls_GL.tolist()}")
        sum_LC = all_GLC.sum(0)
        load_LE = sum_LC[:, _COUNTER_COLS:]
        layers = tuple(LayerTraffic(moe_layer=m, a2a_calls=int(calls_GL[0, m]), a2a_bytes=int(sum_LC[m, 1]),
                                    transfers=int(sum_LC[m, 2]), activations=int(load_LE[m].sum()),
                                    kv_bytes=int(sum_LC[m, 3]), local_activations=int(sum_LC[m, 4]),
                                    cross_node_bytes=int(sum_LC[m, 5]),
                                    expert_load=tuple(load_LE[m].tolist()))
                       for m in range(self.num_layers))
        rank_LE = self.expert_to_rank_LE.cpu()
        gpu_LG = torch.zeros(self.num_layers, self.topology.world_size, dtype=torch.int64)
        gpu_LG.scatter_add_(1, rank_LE, load_LE)
        return GroupTraffic(layers, tuple(tuple(row) for row in gpu_LG.tolist()))
