"""Counted transports: ``a2a`` and ``node_aware``. One counts exchange per MoE layer tells every rank the size of
every collective of the layer; it is read on the host ONCE (the layer's only device-to-host sync).

    route (policy) --> per held token: stage-0 destinations, and the flows of the later stages it causes
        --> counts exchange: to each rank d, [rows I send d | for each later stage: d's sends, d's receipts
            caused by my tokens | bitmap of my tokens anchored at d (only when tokens move)]
        --> ONE host read: every send/receive size of the layer, and the tokens anchored here
        --> dispatch (stage 0) --> [node_aware: dispatch_intra: relays forward inside their node]
        --> experts (caller) --> [node_aware: combine_intra: partials summed at one rank per node]
        --> combine (one partial, or one node sum, per token and source) --> Anchored

``a2a`` is the same machine with relay groups of one rank (every relay stage empty and never called);
``node_aware`` groups the ranks of a node (comm/routes.py has the rule). Every collective is an uneven
``all_to_all_single`` whose receive sizes come from the exchange, so both ends always agree.

Legend: N tokens held here, H rows handled here, K top-k, D hidden, G ranks, Q relay groups, C count columns,
W bitmap words, T step tokens, A tokens anchored here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comm.counters import CollKind
from comm.partial_sums import fold_partials_, max_partials, partial_dtype
from comm.primitives import Collectives
from comm.routes import (BIG, bitmap_tokens, destinations_NG, flows_GG, group_pick_NQ, group_targets_NQ,
                         order_by_destination, order_by_rank)
from comm.transport_base import Anchored, ExpertWork, Route, handled_rows, token_slots_T
from comm.wire import combine_codec, dispatch_codec

_LATER = ("dispatch_intra", "combine_intra", "combine")   # stages after the source's own dispatch


@dataclass(frozen=True)
class Sizes:
    """Host-side sizes of one layer's collectives, read from the counts exchange."""

    send: dict[str, list[int]]      # stage -> [G] rows this rank sends each rank
    recv: dict[str, list[int]]      # stage -> [G] rows this rank receives from each rank
    anchored: list[int] | None      # tokens anchored here (None: the held tokens, unchanged)


@dataclass(frozen=True)
class CountedHandle:
    layer: int
    sizes: Sizes
    rows: dict                      # handled rows H: x, token, ids, w, anchor, rank
    needs_combine: bool
    num_step_tokens: int
    held: int                       # N
    token_N_host: torch.Tensor


class CountedTransport:
    """``a2a`` when ``group_size`` == 1, ``node_aware`` when it is the node size."""

    def __init__(self, coll: Collectives, expert_to_rank_LE: torch.Tensor, *, group_size: int, top_k: int,
                 hidden_size: int, dtype: torch.dtype) -> None:
        G = coll.world_size
        if G % group_size:
            raise ValueError(f"relay groups of {group_size} ranks do not divide {G} ranks")
        self.coll, self.expert_to_rank_LE, self.P, self.Q = coll, expert_to_rank_LE, group_size, G // group_size
        self.codec = dispatch_codec(hidden_size, top_k, dtype)
        self.ycodec = combine_codec(hidden_size, partial_dtype(top_k, dtype))
        self.row_bytes = hidden_size * torch.empty((), dtype=dtype).element_size()
        self.partial_row_bytes = hidden_size * torch.empty((), dtype=partial_dtype(top_k, dtype)).element_size()
        self.max_partials = max_partials(top_k, G)   # partials one row can receive in a combine stage
        self.relays = group_size > 1 and self.Q > 1
        dev = coll.topology.device
        self.group_G = torch.arange(G, device=dev) // group_size
        self.rank_G = torch.arange(G, device=dev)

    # ---- the plan ---------------------------------------------------------------------------------------------
    def _stage_sizes(self, route: Route) -> tuple[Sizes, torch.Tensor]:
        """Counts exchange + the layer's one host read. Also returns the held tokens' stage-0 destinations.

        To each rank d the exchange carries: the rows sent to d; for each later stage, d's sends and receipts
        caused by this rank's tokens (P columns each for the stages inside a relay group, G for the combine);
        the bitmap of the tokens anchored at d. When tokens stay home the combine mirrors the dispatch, so only
        the dispatch sizes travel (a2a: one column, as a plain counts exchange)."""
        G, P = self.coll.world_size, self.P
        stage0_NG, later = self._source_flows(route, destinations_NG(route.rank_NK, G))
        cols, widths = [stage0_NG.sum(dim=0)[:, None]], []
        for stage, f_GG in later.items():
            if stage == "combine":
                cols += [f_GG, f_GG.T]
            else:   # flows inside a relay group: only the P ranks of d's group can appear
                d_G = self.rank_G
                cols += [f_GG.view(G, self.Q, P)[d_G, self.group_G], f_GG.T.reshape(G, self.Q, P)[d_G, self.group_G]]
            widths.append(G if stage == "combine" else P)
        W = max(1, -(-route.num_step_tokens // 62)) if route.tokens_move else 0
        if W:
            cols.append(_anchor_bitmaps_GW(route.token_N, route.anchor_N, G, W))
        send_GC = torch.cat(cols, dim=1)
        recv_GC = self.coll.exchange_counts(send_GC, phase="dispatch", layer=route.layer)
        host = torch.cat([recv_GC.reshape(-1), send_GC[:, 0]]).cpu()   # host sync: the layer's only one
        recv_GC, send0 = host[:recv_GC.numel()].view(G, -1), host[recv_GC.numel():]
        send, recv = {"dispatch": send0.tolist()}, {"dispatch": recv_GC[:, 0].tolist()}
        start, base = 1, (self.coll.rank // P) * P
        for stage, width in zip(later, widths):
            block = recv_GC[:, start:start + 2 * width].sum(dim=0).tolist()
            start += 2 * width
            if width == G:
                send[stage], recv[stage] = block[:G], block[G:]
            else:
                send[stage], recv[stage] = ([0] * base + block[:P] + [0] * (G - base - P),
                                            [0] * base + block[P:] + [0] * (G - base - P))
        if not route.tokens_move and route.needs_combine:
            self._mirror_combine(send, recv)
        anchored = None
        if W:
            words = recv_GC[:, -W:].sum(dim=0).tolist()   # each token has one anchor: adding == or-ing
            anchored = bitmap_tokens(words, route.num_step_tokens)
        return Sizes(send, recv, anchored), stage0_NG

    def _mirror_combine(self, send: dict, recv: dict) -> None:
        """Tokens anchored at home (a = c): every partial goes back the way its row came. A relay sums its
        node's partials (combine_intra from the ranks it forwarded to, and from its node's direct receivers back
        to the home rank) and sends one sum back across (combine)."""
        G, P, grp = self.coll.world_size, self.P, self.coll.rank // self.P
        same = [g // P == grp for g in range(G)]
        if not self.relays:
            send["combine"], recv["combine"] = list(recv["dispatch"]), list(send["dispatch"])
            return
        send["combine"] = [0 if same[g] else n for g, n in enumerate(recv["dispatch"])]
        recv["combine"] = [0 if same[g] else n for g, n in enumerate(send["dispatch"])]
        send["combine_intra"] = [i + (n if same[g] else 0)
                                 for g, (i, n) in enumerate(zip(recv["dispatch_intra"], recv["dispatch"]))]
        recv["combine_intra"] = [i + (n if same[g] else 0)
                                 for g, (i, n) in enumerate(zip(send["dispatch_intra"], send["dispatch"]))]

    def _source_flows(self, route: Route, dest_NG: torch.Tensor):
        """Stage-0 destinations [N, G] of the held tokens, and the [G, G] flows of every later stage they cause."""
        me, G, P, Q = self.coll.rank, self.coll.world_size, self.P, self.Q
        rank_NK, anchor_N = route.rank_NK, route.anchor_N
        in_R_N = dest_NG.gather(1, anchor_N[:, None])[:, 0]
        from_c_NQ = group_pick_NQ(rank_NK, torch.full_like(anchor_N, me), P, Q)
        from_a_NQ = group_pick_NQ(rank_NK, anchor_N, P, Q)
        relay_NQ, target_NQ = group_targets_NQ(from_c_NQ, from_a_NQ, anchor_N, in_R_N, P)
        my_group = me // P
        own_G = self.group_G == my_group
        q_Q = torch.arange(Q, device=dest_NG.device)
        other_NQ = (from_c_NQ < BIG) & (q_Q != my_group)[None, :]
        relay_hit_NG = torch.zeros(dest_NG.shape, dtype=torch.long, device=dest_NG.device)
        relay_hit_NG.scatter_add_(1, relay_NQ.clamp(max=G - 1), other_NQ.long())
        stage0_NG = (dest_NG & own_G[None, :]) | (relay_hit_NG > 0)
        stage0_NG[:, me] = False
        later = {}
        cells_G = self.rank_G[None, :].expand_as(dest_NG)
        if self.relays:
            relay_NG = relay_NQ[:, self.group_G]
            later["dispatch_intra"] = flows_GG(relay_NG, cells_G, dest_NG & ~own_G[None, :] & (cells_G != relay_NG), G)
        if route.needs_combine and route.tokens_move:   # (tokens at home: the combine mirrors the dispatch)
            if self.relays:
                target_NG = target_NQ[:, self.group_G]
                later["combine_intra"] = flows_GG(cells_G, target_NG, dest_NG & (cells_G != target_NG), G)
            a_group_N = anchor_N // P
            cross_NQ = (from_a_NQ < BIG) & (q_Q[None, :] != a_group_N[:, None])
            later["combine"] = flows_GG(from_a_NQ, anchor_N[:, None].expand_as(from_a_NQ), cross_NQ, G)
        return stage0_NG, later

    # ---- dispatch ---------------------------------------------------------------------------------------------
    def dispatch(self, route: Route) -> tuple[ExpertWork, CountedHandle]:
        me, G, P = self.coll.rank, self.coll.world_size, self.P
        sizes, stage0_NG = self._stage_sizes(route)
        row_X, _, _ = order_by_destination(stage0_NG, route.token_N, route.num_step_tokens)
        i = row_X[:sum(sizes.send["dispatch"])]
        send = self.codec.pack(route.x_ND.device, x=route.x_ND[i], topk_ids=route.topk_ids_NK[i],
                               topk_weights=route.topk_weights_NK[i], ranks=route.rank_NK[i],
                               token=route.token_N[i, None], anchor=route.anchor_N[i, None])
        recv0, _ = self.coll.all_to_all_rows(send, sizes.send["dispatch"], sizes.recv["dispatch"],
                                             kind=CollKind.ALL_TO_ALL, phase="dispatch", layer=route.layer,
                                             payload_bytes_per_row=self.row_bytes)
        received = [recv0]
        if self.relays:   # rows that crossed into this node go on to its other expert ranks
            recv_G = torch.tensor(sizes.recv["dispatch"], device=self.rank_G.device)
            src_R = torch.repeat_interleave(self.rank_G, recv_G, output_size=recv0.shape[0])
            got0 = self.codec.unpack(recv0)
            rank_RK = got0["ranks"].long()   # the source's choice of copy
            crossed_R = self.group_G[src_R] != me // P
            fwd_RG = destinations_NG(rank_RK, G) & (self.group_G == me // P)[None, :] & crossed_R[:, None]
            fwd_RG[:, me] = False
            row_X, _, _ = order_by_destination(fwd_RG, got0["token"][:, 0].long(), route.num_step_tokens)
            j = row_X[:sum(sizes.send["dispatch_intra"])]
            recv1, _ = self.coll.all_to_all_rows(recv0[j], sizes.send["dispatch_intra"],
                                                 sizes.recv["dispatch_intra"], kind=CollKind.ALL_TO_ALL,
                                                 phase="dispatch_intra", layer=route.layer,
                                                 payload_bytes_per_row=self.row_bytes, intra_node=True)
            received.append(recv1)
        rows = handled_rows(route, self.codec.unpack(torch.cat(received)))
        work = ExpertWork(rows["x"], rows["token"], rows["ids"], rows["w"], rows["rank"] == me)
        return work, CountedHandle(route.layer, sizes, rows, route.needs_combine, route.num_step_tokens,
                                   route.x_ND.shape[0], route.token_N_host)

    # ---- combine ----------------------------------------------------------------------------------------------
    def combine(self, partial_HD: torch.Tensor, h: CountedHandle) -> Anchored:
        me, P = self.coll.rank, self.P
        rows, T = h.rows, h.num_step_tokens
        token_H, anchor_H, rank_HK = rows["token"], rows["anchor"], rows["rank"]
        in_R_H = (rank_HK == me).any(dim=1)
        pick_H = group_pick_NQ(rank_HK, anchor_H, P, self.Q)[:, me // P]   # pick of my group, from the anchor
        target_H = torch.where(anchor_H // P == me // P, anchor_H, pick_H)
        y_HD = torch.where((in_R_H & (target_H == me))[:, None], partial_HD, torch.zeros_like(partial_HD))
        if h.needs_combine:
            slot_T = token_slots_T(token_H, torch.ones_like(in_R_H), T)
            y_HD = torch.cat([y_HD, y_HD[:1] * 0])   # a spare row
            if self.relays:
                self._send_partials(y_HD, partial_HD, in_R_H & (target_H != me), target_H, token_H, slot_T, h,
                                    "combine_intra")
            self._send_partials(y_HD, y_HD[:-1], (target_H == me) & (anchor_H != me), anchor_H, token_H, slot_T,
                                h, "combine")
            y_HD = y_HD[:-1]
        elif any(h.sizes.send.get("combine", ())) or any(h.sizes.recv.get("combine", ())):
            raise RuntimeError(f"layer {h.layer}: the combine was skipped but partials need to move")
        if h.sizes.anchored is None:      # tokens stay where they are held: the first N rows, in token order
            rows_A, token_A = torch.arange(h.held, device=token_H.device), h.token_N_host
        else:
            token_A = torch.tensor(h.sizes.anchored, dtype=torch.long)
            order = order_by_rank(torch.zeros_like(anchor_H), anchor_H == me, token_H, T)
            rows_A = order[:len(h.sizes.anchored)]
        return Anchored(token_A, rows["x"][rows_A], y_HD[rows_A])

    def _send_partials(self, y_HD, value_HD, send_H, dest_H, token_H, slot_T, h: CountedHandle, stage: str):
        """Send ``value_HD`` of the rows ``send_H`` to ``dest_H`` and add what arrives into ``y_HD`` (by token;
        own value first, then by source rank: a fixed order on every device, comm/partial_sums.py)."""
        order = order_by_rank(dest_H, send_H, token_H, h.num_step_tokens)[:sum(h.sizes.send[stage])]
        send = self.ycodec.pack(value_HD.device, token=token_H[order, None], y=value_HD[order])
        recv, _ = self.coll.all_to_all_rows(send, h.sizes.send[stage], h.sizes.recv[stage],
                                            kind=CollKind.ALL_TO_ALL, phase=stage, layer=h.layer,
                                            payload_bytes_per_row=self.partial_row_bytes,
                                            intra_node=stage == "combine_intra")
        got = self.ycodec.unpack(recv)
        fold_partials_(y_HD, slot_T[got["token"][:, 0].long()], got["y"], self.max_partials)


def _anchor_bitmaps_GW(token_N: torch.Tensor, anchor_N: torch.Tensor, G: int, W: int) -> torch.Tensor:
    """[G, W] for each rank d the bitmap (62 tokens a word) of the held tokens anchored at d."""
    idx_N = anchor_N * W + token_N // 62
    bits = torch.zeros(G * W, dtype=torch.long, device=token_N.device)
    return bits.index_add_(0, idx_N, torch.ones_like(token_N) << (token_N % 62)).view(G, W)
