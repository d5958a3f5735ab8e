"""Summing per-rank partial expert outputs in a fixed order (what the transports' combines use).

Legend: H rows handled here (+1: the last row is a spare), X partials received, R most partials one row can
receive, D hidden.

    received y_XD (all_to_all_single: grouped by source rank, ascending) + their rows slot_X
      --one stable sort by row--> arrival position of each partial within its row (no host sync)
      --[R, H + 1] table of which partial is a row's r-th (missing: a zero row)-->
      y_HD += term 0, then += term 1, ... (R passes, each a gather: deterministic on every device)

The order is fixed: the row's own value first, then the received partials in source-rank order. An atomic
``index_add_`` gives the same order on the CPU but none on CUDA once a row gets >= 2 adds (3 terms); for
top-1 / top-2 routing both give the same bits (two terms commute; adding a zero changes nothing but the sign
of a zero).
"""

from __future__ import annotations

import torch


def partial_dtype(top_k: int, dtype: torch.dtype) -> torch.dtype:
    """The dtype partial sums cross the network in. The model sums its k weighted expert outputs in float32 and
    rounds once (epserve/model/moe.py), so that the sum does not depend on how the k terms are split between
    ranks: with top-k <= 2 a partial in the model dtype is exact (one term, or the whole two-term sum, which is
    rounded to the model dtype anyway), with k >= 3 a rounded partial would round twice, so bfloat16 / float16
    models send float32 partials (twice the combine bytes; the cost model prices it)."""
    return torch.float32 if top_k >= 3 and torch.empty((), dtype=dtype).element_size() < 4 else dtype


def max_partials(top_k: int, world_size: int) -> int:
    """R: a row receives at most one partial per other rank, and only from ranks holding one of its k experts."""
    return max(0, min(top_k, world_size - 1))


def fold_partials_(y_HD: torch.Tensor, slot_X: torch.Tensor, y_XD: torch.Tensor, max_terms: int) -> torch.Tensor:
    """In place: y_HD[h] += every y_XD[x] with slot_X[x] == h, one at a time in arrival (source-rank) order.
    slot_X == H (y_HD's last row) marks a partial for no row (an empty slot): it lands in the spare row.
    A real row with more than ``max_terms`` partials is a bug in the caller and raises (an index error)."""
    H1, X = y_HD.shape[0], y_XD.shape[0]
    if X == 0 or max_terms == 0:
        return y_HD
    dev, spare = y_HD.device, H1 - 1
    arange_X = torch.arange(X, device=dev)
    sorted_S, order_S = torch.sort(slot_X, stable=True)
    pos_X = torch.empty_like(slot_X)
    pos_X[order_S] = arange_X - torch.searchsorted(sorted_S, sorted_S)   # earlier arrivals in the same row
    pos_X = torch.where(slot_X == spare, 0, pos_X)
    src_RH = torch.full((max_terms, H1), X, dtype=torch.long, device=dev)   # X: the zero row below
    src_RH[pos_X, slot_X] = arange_X          # (several partials share a cell only in the spare row)
    y_ZD = torch.cat([y_XD, y_XD.new_zeros(1, y_XD.shape[1])])
    for r in range(max_terms):
        y_HD.add_(y_ZD[src_RH[r]])
    return y_HD
