"""Route plans: which rows go where at one MoE layer, as pure functions of routing metadata.

One mechanism serves every strategy (DESIGN.md traffic model). A token held on rank c (its position rank)
with expert ranks R and anchor a (a in R or a == c):

    dispatch:  c sends the token's residual to every rank in R \\ {c}       (rows grouped by destination)
    experts:   every rank in R computes one partial weighted sum over its own experts of the token
    combine:   every rank in R \\ {a} sends its partial to a               (rows grouped by destination)
    anchor a:  residual + own partial (if a in R) + received partials; the token lives on a afterwards

Row orders are fixed so that both ends of a transfer agree without extra metadata: a sender sorts its rows by
(destination, step-local token index), a receiver expects rows by (source, token index). The combine's
receive sizes are derived from the routing the anchor already holds, so the combine needs no counts exchange.

Legend: N tokens held here, H tokens handled here (held + received), K top-k, G ranks, S rows sent,
R rows received, A tokens anchored here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _group_by_destination(mask_NG: torch.Tensor, order_key_N: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Indices of the True cells of ``mask_NG`` ordered by (g, order_key), and the count per g."""
    G = mask_NG.shape[1]
    n_S, g_S = mask_NG.nonzero(as_tuple=True)
    key_S = g_S * (int(order_key_N.max()) + 1 if order_key_N.numel() else 1) + order_key_N[n_S]
    order = torch.argsort(key_S, stable=True)
    counts = torch.bincount(g_S, minlength=G).tolist()  # host sync: split sizes must be Python ints
    return n_S[order], counts


def expert_ranks_NK(expert_to_rank_E: torch.Tensor, topk_ids_NK: torch.Tensor) -> torch.Tensor:
    return expert_to_rank_E[topk_ids_NK.long()]


def table_anchor_N(score_EG: torch.Tensor, topk_ids_NK: torch.Tensor, rank_NK: torch.Tensor) -> torch.Tensor:
    """[N] anchor rank by an anchor table (placement/anchor.py ``choose_anchors``, same integers, same rule):
    the r_k with the largest sum_k' score_EG[e_k', r_k], ties to the smallest k."""
    K = rank_NK.shape[1]
    score_NG = score_EG[topk_ids_NK.long()].sum(dim=1)
    key_NK = score_NG.gather(1, rank_NK) * K + torch.arange(K - 1, -1, -1, device=rank_NK.device)
    return rank_NK.gather(1, key_NK.argmax(dim=1, keepdim=True))[:, 0]


def destinations_NG(rank_NK: torch.Tensor, world_size: int) -> torch.Tensor:
    """[N, G] bool: rank g serves at least one of the token's experts (deduplicated per destination)."""
    mask_NG = torch.zeros(rank_NK.shape[0], world_size, dtype=torch.bool, device=rank_NK.device)
    mask_NG.scatter_(1, rank_NK, True)
    return mask_NG


@dataclass(frozen=True)
class DispatchPlan:
    send_index_S: torch.Tensor   # rows of the held tokens to send, grouped by destination
    send_counts: list[int]       # [G]; entry ``me`` is 0


def plan_dispatch(rank_NK: torch.Tensor, token_N: torch.Tensor, *, me: int, world_size: int) -> DispatchPlan:
    """Send each held token once to each expert rank other than this one."""
    mask_NG = destinations_NG(rank_NK, world_size)
    mask_NG[:, me] = False
    index_S, counts = _group_by_destination(mask_NG, token_N)
    return DispatchPlan(index_S, counts)


@dataclass(frozen=True)
class CombinePlan:
    send_index_S: torch.Tensor   # rows of the expert batch (M) whose partial goes to another anchor, by dest
    send_counts: list[int]       # [G]
    anchored_A: torch.Tensor     # rows of the handled tokens (H) anchored here, by token index
    recv_slot_R: torch.Tensor    # for each received partial (by source, token): its position in anchored_A
    recv_counts: list[int]       # [G]
    own_slot_A: torch.Tensor     # for each anchored token: its row in the expert batch M, or -1


def plan_combine(rank_HK: torch.Tensor, token_H: torch.Tensor, anchor_H: torch.Tensor, *, me: int,
                 world_size: int) -> tuple[torch.Tensor, CombinePlan]:
    """Returns (rows of H that compute here = the expert batch M, the combine plan)."""
    G = world_size
    computes_H = (rank_HK == me).any(dim=1)
    batch_M = computes_H.nonzero(as_tuple=True)[0]
    # Sender side: partials of tokens anchored elsewhere, one row per token, grouped by anchor.
    away_M = anchor_H[batch_M] != me
    to_MG = torch.zeros(batch_M.numel(), G, dtype=torch.bool, device=rank_HK.device)
    to_MG[away_M, anchor_H[batch_M][away_M].long()] = True
    send_index_S, send_counts = _group_by_destination(to_MG, token_H[batch_M])
    # Receiver side: for each token anchored here, one partial from each of its other expert ranks.
    anchored = (anchor_H == me).nonzero(as_tuple=True)[0]
    anchored_A = anchored[torch.argsort(token_H[anchored], stable=True)]
    from_AG = destinations_NG(rank_HK[anchored_A], G)
    from_AG[:, me] = False
    recv_slot_R, recv_counts = _group_by_destination(from_AG, token_H[anchored_A])
    slot_of_H = torch.full((rank_HK.shape[0],), -1, dtype=torch.long, device=rank_HK.device)
    slot_of_H[batch_M] = torch.arange(batch_M.numel(), device=rank_HK.device)
    return batch_M, CombinePlan(send_index_S, send_counts, anchored_A, recv_slot_R, recv_counts,
                                slot_of_H[anchored_A])
