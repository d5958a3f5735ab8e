"""Collectives over an EP group, each one counted in CommCounters.

    exchange_counts:  [G, C] int64 per rank --all_to_all_single (equal splits)--> [G, C] from every rank
    all_to_all_rows:  rows grouped by destination + split sizes --all_to_all_single (uneven)--> rows by source
    all_gather_rows:  [N, ...] per rank (same N everywhere) --all_gather_into_tensor--> [G, N, ...]
    reduce_scatter_rows: [G, C, ...] per rank --reduce_scatter_tensor (sum)--> [C, ...]: chunk r summed on rank r
    all_gather_varlen [N_r, ...] per rank --counts, pad to max, gather, trim--> list of G tensors

Uneven all-to-alls always take their receive split sizes from a counts exchange (or from metadata every
receiver already holds): under gloo, a receiver that expects other sizes than were sent is killed (SIGABRT),
so callers never guess. At world size 1 nothing is called and nothing is counted.

Legend: G ranks, C counts per rank pair, N rows, B bytes per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from comm.counters import CollKind, CommCounters
from comm.topology import EPTopology

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True, eq=False)
class Collectives:
    topology: EPTopology
    counters: CommCounters

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def rank(self) -> int:
        return self.topology.rank

    def exchange_counts(self, send_GC: torch.Tensor, *, phase: str, layer: int | None) -> torch.Tensor:
        """Row g of ``send_GC`` goes to rank g; row s of the result came from rank s. int64, [G, C]."""
        G = self.world_size
        if send_GC.shape[0] != G or send_GC.dtype != torch.int64:
            raise ValueError(f"counts must be int64 [{G}, C], got {send_GC.dtype} {tuple(send_GC.shape)}")
        if G == 1:
            return send_GC.clone()
        send_GC = send_GC.to(self.topology.device).contiguous()
        recv_GC = torch.empty_like(send_GC)
        dist.all_to_all_single(recv_GC, send_GC, group=self.topology.group)
        per_peer = send_GC.shape[1] * send_GC.element_size()
        self.counters.record(CollKind.A2A_SPLITS, phase=phase, layer=layer, rows=G - 1,
                             wire_bytes=(G - 1) * per_peer)
        return recv_GC

    def all_to_all_rows(self, send_NB: torch.Tensor, send_counts: list[int], recv_counts: list[int], *,
                        kind: CollKind, phase: str, layer: int | None, payload_bytes_per_row: int,
                        rows_per_send_row: int = 1, async_op: bool = False,
                        real_rows_G: torch.Tensor | None = None, intra_node: bool = False):
        """Send rows ``send_NB`` grouped by destination (``send_counts[g]`` rows to rank g) and receive
        ``recv_counts[s]`` rows from each rank s. Returns ``(recv_MB, work)``; ``work`` is None unless
        ``async_op`` (then the caller must ``work.wait()`` before reading ``recv_MB``).

        Counted: rows sent to other ranks x ``rows_per_send_row`` (e.g. attention layers packed in one row).
        ``real_rows_G`` (fixed-capacity buffers): a device count of the real rows in each destination's block;
        transfers and payload count those (read by the counters later, never here), wire bytes every row.
        ``intra_node``: every row stays on this node; the call runs on the node's own group (when there is one),
        so it never waits on another node.
        """
        G, me = self.world_size, self.rank
        if len(send_counts) != G or len(recv_counts) != G or sum(send_counts) != send_NB.shape[0]:
            raise ValueError(f"rank {me}: {send_NB.shape[0]} rows do not match send counts {send_counts}")
        recv_shape = (sum(recv_counts),) + tuple(send_NB.shape[1:])
        if G == 1:
            return send_NB.clone().reshape(recv_shape), None
        send_NB = send_NB.contiguous()
        recv_MB = torch.empty(recv_shape, dtype=send_NB.dtype, device=send_NB.device)
        group, send_c, recv_c = self._group_for(intra_node, self.topology.node_group, self.topology.group,
                                                send_counts, recv_counts)
        work = dist.all_to_all_single(recv_MB, send_NB, recv_c, send_c, group=group, async_op=async_op)
        wire_rows = sum(send_counts) - send_counts[me]
        row_bytes = math.prod(send_NB.shape[1:]) * send_NB.element_size()
        node, per_node = self.topology.node, self.topology.gpus_per_node
        if real_rows_G is None:
            out_rows = wire_rows
            cross_rows = sum(n for g, n in enumerate(send_counts) if g // per_node != node)
        else:   # device scalars, resolved by CommCounters when read
            other_G = torch.arange(G, device=real_rows_G.device) // per_node != node
            out_rows = real_rows_G.sum() - real_rows_G[me]
            cross_rows = (real_rows_G * other_G).sum()
        self.counters.record(kind, phase=phase, layer=layer, rows=out_rows * rows_per_send_row,
                             cross_node_rows=cross_rows * rows_per_send_row,
                             payload_bytes=out_rows * payload_bytes_per_row, wire_bytes=wire_rows * row_bytes)
        return recv_MB, work

    def _group_for(self, intra_node: bool, node_group, whole_group, send_counts: list[int], recv_counts: list[int]):
        """(group, send counts, receive counts) for a call: the node's group with its ranks' counts when every
        row stays on the node and the node has a group of its own, else the whole group."""
        topo = self.topology
        if not intra_node or node_group is None:
            return whole_group, list(send_counts), list(recv_counts)
        lo, hi = topo.node * topo.gpus_per_node, (topo.node + 1) * topo.gpus_per_node
        outside = [g for g in range(self.world_size) if not lo <= g < hi and (send_counts[g] or recv_counts[g])]
        if outside:
            raise ValueError(f"rank {self.rank}: an intra-node call has rows for ranks {outside} of other nodes")
        return node_group, list(send_counts[lo:hi]), list(recv_counts[lo:hi])

    def all_to_all_bytes(self, send_B: torch.Tensor, send_counts: list[int], recv_counts: list[int], *,
                         kind: CollKind, phase: str, parts: list[tuple[int | None, int, int, int]],
                         intra_node: bool = False):
        """Uneven all-to-all of a uint8 stream (``send_counts[g]`` bytes to rank g) on the topology's K/V group,
        asynchronously. Returns ``(recv_B, work)`` (``work.wait()`` before reading). Counted as one call (layer
        None) whose figures are attributed by ``parts``: (MoE layer or None, rows, cross-node rows, payload bytes)
        this rank sent, all destinations together."""
        G, me = self.world_size, self.rank
        if G == 1:
            return send_B[:0].clone(), None
        recv_B = torch.empty(sum(recv_counts), dtype=torch.uint8, device=send_B.device)
        group, send_c, recv_c = self._group_for(intra_node, self.topology.node_kv_group, self.topology.kv_group,
                                                send_counts, recv_counts)
        work = dist.all_to_all_single(recv_B, send_B.contiguous(), recv_c, send_c, group=group, async_op=True)
        self.counters.record(kind, phase=phase, layer=None, wire_bytes=sum(send_counts) - send_counts[me])
        for layer, rows, cross_rows, payload_bytes in parts:
            self.counters.record(kind, phase=phase, layer=layer, rows=rows, cross_node_rows=cross_rows,
                                 payload_bytes=payload_bytes, calls=0)
        return recv_B, work

    def all_gather_rows(self, x_NX: torch.Tensor, *, phase: str, layer: int | None = None,
                        real_rows: int | None = None) -> torch.Tensor:
        """[N, ...] from every rank (the same N everywhere) -> [G, N, ...]. ``real_rows``: how many of this
        rank's N rows are real (the rest padding): payload and transfers count those, wire bytes all."""
        G = self.world_size
        if G == 1:
            return x_NX.unsqueeze(0).clone()
        x_NX = x_NX.contiguous()
        out = torch.empty((G * x_NX.shape[0],) + tuple(x_NX.shape[1:]), dtype=x_NX.dtype, device=x_NX.device)
        _all_gather_single(out, x_NX, group=self.topology.group)
        out = out.view((G,) + tuple(x_NX.shape))
        N = x_NX.shape[0]
        row_bytes = x_NX.numel() * x_NX.element_size() // max(N, 1)
        real = N if real_rows is None else real_rows
        cross = sum(1 for g in range(G) if g // self.topology.gpus_per_node != self.topology.node) * real
        self.counters.record(CollKind.ALL_GATHER, phase=phase, layer=layer, rows=(G - 1) * real,
                             cross_node_rows=cross if real_rows is not None else 0,
                             payload_bytes=(G - 1) * real * row_bytes, wire_bytes=(G - 1) * N * row_bytes)
        return out

    def reduce_scatter_rows(self, x_GCX: torch.Tensor, *, phase: str, layer: int | None = None,
                            real_rows_G: list[int] | None = None) -> torch.Tensor:
        """Row block g of ``x_GCX`` (every rank's) summed on rank g -> this rank's [C, ...]. Counted: the C rows
        sent to each other rank (``real_rows_G[g]`` of block g are real, the rest padding: payload counts the real
        ones, wire bytes all)."""
        G, me = self.world_size, self.rank
        if x_GCX.shape[0] != G:
            raise ValueError(f"reduce_scatter_rows needs [{G}, C, ...], got {tuple(x_GCX.shape)}")
        if G == 1:
            return x_GCX[0].clone()
        C = x_GCX.shape[1]
        flat = x_GCX.reshape((G * C,) + tuple(x_GCX.shape[2:])).contiguous()
        out = torch.empty((C,) + tuple(x_GCX.shape[2:]), dtype=flat.dtype, device=flat.device)
        _reduce_scatter_single(out, flat, op=dist.ReduceOp.SUM, group=self.topology.group)
        row_bytes = math.prod(x_GCX.shape[2:]) * x_GCX.element_size()
        real = [C] * G if real_rows_G is None else list(real_rows_G)
        node, per_node = self.topology.node, self.topology.gpus_per_node
        rows = sum(n for g, n in enumerate(real) if g != me)
        cross = sum(n for g, n in enumerate(real) if g // per_node != node)
        self.counters.record(CollKind.REDUCE_SCATTER, phase=phase, layer=layer, rows=rows, cross_node_rows=cross,
                             payload_bytes=rows * row_bytes, wire_bytes=(G - 1) * C * row_bytes)
        return out

    def all_gather_varlen(self, x_NX: torch.Tensor, *, phase: str) -> list[torch.Tensor]:
        """[N_r, ...] from every rank r (N_r may differ) -> list of G tensors (pads to the largest N)."""
        if self.world_size == 1:
            return [x_NX.clone()]
        n_G = self.all_gather_rows(torch.tensor([x_NX.shape[0]], dtype=torch.int64, device=x_NX.device),
                                   phase=phase + "_counts")
        n_list = n_G.flatten().tolist()  # host sync (off the hot path: recorder / tests)
        padded = torch.zeros((max(n_list),) + tuple(x_NX.shape[1:]), dtype=x_NX.dtype, device=x_NX.device)
        padded[: x_NX.shape[0]] = x_NX
        out = self.all_gather_rows(padded, phase=phase)
        return [out[g, :n] for g, n in enumerate(n_list)]
