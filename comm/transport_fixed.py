"""The ``fixed`` transport: fixed per-peer buffers of ``capacity`` rows with a valid flag. No counts exchange and
no device-to-host sync on the data path (what DeepEP's low-latency kernels and CUDA graphs need).

    route --> each (token, destination) cell takes the next free row of that destination's block
              (a running count on device); cells past the capacity are dropped and raise the overflow flag
          --> all_to_all_single of G x capacity rows (equal splits) --> rows with token >= 0 are real
          --> experts (caller) on held rows + every received slot (empty slots use no expert)
          --> partials to their anchors the same way --> sums by token (own first, then by source rank)
          --> Anchored (+ overflow flag)

Overflow is lossless: the flag rides out of the step with the sampled ids (one gather per step that exists
anyway) and the Runner runs the whole step again with a doubled capacity (comm/dispatchers.py
``grow_capacity``). Capacity per step: placement/transport.py ``fixed_capacity`` (from the step's tokens and
top-k; never above what any rank can send a peer).

Tokens that move (coherent policies) need their new rank's token list on the host for attention: that one
read is the policy's, after the combine; with two_a2a policies the layer has no host sync at all.

Legend: N tokens held here, H rows handled here (N + G x capacity), K top-k, D hidden, G ranks, C capacity,
T step tokens, A tokens anchored here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from comm.counters import CollKind
from comm.partial_sums import fold_partials_, max_partials, partial_dtype
from comm.primitives import Collectives
from comm.routes import destinations_NG, order_by_rank
from comm.transport_base import Anchored, ExpertWork, Route, handled_rows, token_slots_T
from comm.wire import RowCodec, combine_codec, dispatch_codec, field_offset
from placement.transport import DEFAULT_CAPACITY_FACTOR, fixed_capacity


@dataclass(frozen=True)
class FixedHandle:
    layer: int
    capacity: int
    rows: dict                      # handled rows H: x, token, ids, w, anchor, rank, valid
    overflow: torch.Tensor          # device bool
    needs_combine: bool
    tokens_move: bool
    num_step_tokens: int
    held: int
    token_N_host: torch.Tensor


class FixedTransport:
    def __init__(self, coll: Collectives, expert_to_rank_LE: torch.Tensor, *, top_k: int, hidden_size: int,
                 dtype: torch.dtype, capacity: int | None = None,
                 capacity_factor: float = DEFAULT_CAPACITY_FACTOR) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"fixed transport capacity must be >= 1 row per peer, got {capacity}")
        self.coll, self.expert_to_rank_LE, self.top_k = coll, expert_to_rank_LE, top_k
        self.capacity, self.capacity_factor = capacity, capacity_factor   # grown by grow_capacity()
        self.codec = dispatch_codec(hidden_size, top_k, dtype)
        self.ycodec = combine_codec(hidden_size, partial_dtype(top_k, dtype))
        self.row_bytes = hidden_size * torch.empty((), dtype=dtype).element_size()
        self.partial_row_bytes = hidden_size * torch.empty((), dtype=partial_dtype(top_k, dtype)).element_size()

    def capacity_for(self, route: Route) -> int:
        if self.capacity is not None:
            return self.capacity
        return fixed_capacity(route.num_step_tokens, top_k=self.top_k, world_size=self.coll.world_size,
                              factor=self.capacity_factor, bound=route.held_bound)

    def grow_capacity(self) -> None:
        """After an overflow: every later step uses twice the rows per peer (the same on every rank)."""
        if self.capacity is not None:
            self.capacity *= 2
        else:
            self.capacity_factor *= 2

    # ---- dispatch ---------------------------------------------------------------------------------------------
    def dispatch(self, route: Route) -> tuple[ExpertWork, FixedHandle]:
        me, G = self.coll.rank, self.coll.world_size
        C = self.capacity_for(route)
        dest_NG = destinations_NG(route.rank_NK, G)
        dest_NG[:, me] = False
        packed_NB = self.codec.pack(route.x_ND.device, x=route.x_ND, topk_ids=route.topk_ids_NK,
                                    topk_weights=route.topk_weights_NK, ranks=route.rank_NK,
                                    token=route.token_N[:, None], anchor=route.anchor_N[:, None])
        send, overflow = _fill_slots(packed_NB, dest_NG, C, self.codec)
        recv, _ = self.coll.all_to_all_rows(send, [C] * G, [C] * G, kind=CollKind.ALL_TO_ALL, phase="dispatch",
                                            layer=route.layer, payload_bytes_per_row=self.row_bytes,
                                            real_rows_G=_real_rows_G(send, self.codec, C))
        rows = handled_rows(route, self.codec.unpack(recv))
        valid_H = rows["token"] >= 0               # empty slots arrive as zeros with token -1
        rows["valid"] = valid_H
        use_HK = (rows["rank"] == me) & valid_H[:, None]
        work = ExpertWork(rows["x"], rows["token"], rows["ids"], rows["w"], use_HK)
        return work, FixedHandle(route.layer, C, rows, overflow, route.needs_combine, route.tokens_move,
                                 route.num_step_tokens, route.x_ND.shape[0], route.token_N_host)

    # ---- combine ----------------------------------------------------------------------------------------------
    def combine(self, partial_HD: torch.Tensor, h: FixedHandle) -> Anchored:
        me, G, C = self.coll.rank, self.coll.world_size, h.capacity
        rows, T = h.rows, h.num_step_tokens
        token_H, anchor_H, valid_H = rows["token"], rows["anchor"], rows["valid"]
        in_R_H = (rows["rank"] == me).any(dim=1) & valid_H
        y_HD = torch.where(in_R_H[:, None], partial_HD, torch.zeros_like(partial_HD))
        overflow = h.overflow
        if h.needs_combine:
            away_H = in_R_H & (anchor_H != me)
            packed = self.ycodec.pack(partial_HD.device, token=token_H[:, None], y=partial_HD)
            cell_HG = (anchor_H[:, None] == torch.arange(G, device=anchor_H.device)[None, :]) & away_H[:, None]
            send, over = _fill_slots(packed, cell_HG, C, self.ycodec)
            recv, _ = self.coll.all_to_all_rows(send, [C] * G, [C] * G, kind=CollKind.ALL_TO_ALL, phase="combine",
                                                layer=h.layer, payload_bytes_per_row=self.partial_row_bytes,
                                                real_rows_G=_real_rows_G(send, self.ycodec, C))
            got = self.ycodec.unpack(recv)
            slot_T = token_slots_T(token_H, valid_H, T)
            tok_R = got["token"][:, 0].long()
            y_HD = torch.cat([y_HD, y_HD[:1] * 0])   # a spare row for empty slots
            # own partial first, then the received ones in source-rank order (comm/partial_sums.py)
            fold_partials_(y_HD, slot_T[torch.where(tok_R >= 0, tok_R, T)], got["y"], max_partials(self.top_k, G))
            y_HD = y_HD[:-1]
            overflow = overflow | over
        if not h.tokens_move:      # tokens stay where they are held: the first N rows, in token order
            rows_A, token_A = torch.arange(h.held, device=token_H.device), h.token_N_host
        else:
            here_H = valid_H & (anchor_H == me)
            order = order_by_rank(torch.zeros_like(anchor_H), here_H, token_H, T)
            host = torch.cat([here_H.sum()[None], token_H[order]]).cpu()   # host sync: where tokens now live
            A = int(host[0])
            rows_A, token_A = order[:A], host[1:A + 1].clone()
        return Anchored(token_A, rows["x"][rows_A], y_HD[rows_A], overflow)


def _fill_slots(packed_NB: torch.Tensor, cell_NG: torch.Tensor, C: int, codec: RowCodec
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """[G x C, B] send buffer: row n goes to every g with ``cell_NG[n, g]``, into the next free row of g's block
    (in n order); empty rows carry token -1. Returns (buffer, overflow flag: some cell did not fit)."""
    N, G = cell_NG.shape
    pos_NG = cell_NG.long().cumsum(dim=0) - 1                        # running count per destination
    fits_NG = cell_NG & (pos_NG < C)
    g_NG = torch.arange(G, device=cell_NG.device)[None, :]
    slot_X = torch.where(fits_NG, g_NG * C + pos_NG, G * C).reshape(-1)   # G * C: a spare row for the rest
    n_X = torch.arange(N, device=cell_NG.device)[:, None].expand(N, G).reshape(-1)
    buf = torch.zeros(G * C + 1, packed_NB.shape[1], dtype=torch.uint8, device=packed_NB.device)
    start, width = field_offset(codec, "token")
    buf[:, start:start + width] = 255                                 # int32 -1: an empty row
    buf.index_copy_(0, slot_X, packed_NB[n_X])
    return buf[:G * C], (cell_NG & ~fits_NG).any()


def _real_rows_G(send_XB: torch.Tensor, codec: RowCodec, C: int) -> torch.Tensor:
    """[G] device count of the real rows of each destination's block (the counters read it later, off the hot
    path)."""
    start, width = field_offset(codec, "token")
    token = send_XB[:, start:start + width].contiguous().view(torch.int32)[:, 0]
    return (token >= 0).view(-1, C).sum(dim=1)
