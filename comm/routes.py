"""Routes: where each row goes at one MoE layer, as sync-free device functions of routing metadata.

A token held on rank c, with expert ranks R (deduplicated) and anchor a (a in R or a == c), moves by the
transport's rule (placement/transport.py holds the traffic model these functions implement). Ranks are grouped
into *relay groups* of P consecutive ranks: P = GPUs per node for ``node_aware``, P = 1 for ``a2a`` / ``fixed``
(then every rank is its own group and every relay stage is empty). With R_n = R on group n, pick_n(x) = the
rank of R_n whose local index comes first at or after x's (cyclically), and t_n = a if a is on group n else
pick_n(a):

    dispatch        c -> r for r in R_{grp(c)} \\ {c};  c -> relay_n (= a if a in R_n else pick_n(c)) elsewhere
    dispatch_intra  relay_n -> r for r in R_n \\ {relay_n}                  (rows that crossed groups)
    combine_intra   r -> t_n for r in R_n \\ {t_n}                           (partials summed inside a group)
    combine         pick_n(a) -> a for every group n != grp(a) holding R_n (one sum per group crosses back)

Nothing here reads a device value on the host: sizes that depend on data are counted on device, exchanged by
the transport, and read once (``a2a``/``node_aware``) or never (``fixed``). Row orders are (destination,
step-local token index): a sort over a fixed number of cells, sliced by a host-known total.

Legend: N tokens held here, H rows handled here, K top-k, G ranks, Q relay groups, S rows sent, T step tokens.
"""

from __future__ import annotations

import numpy as np
import torch

BIG = torch.iinfo(torch.int64).max // 4


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


def group_pick_NQ(rank_NK: torch.Tensor, ref_N: torch.Tensor, group_size: int, num_groups: int) -> torch.Tensor:
    """[N, Q] pick_n(ref) of each token on each relay group: the expert rank there whose local index comes first
    at or after ref's, cyclically (BIG where the group holds none of the token's experts)."""
    P = group_size
    key_NK = (rank_NK - ref_N[:, None]) % P
    best_NQ = torch.full((rank_NK.shape[0], num_groups), BIG, dtype=torch.long, device=rank_NK.device)
    best_NQ = best_NQ.scatter_reduce(1, rank_NK // P, key_NK, "amin", include_self=True)
    q_Q = torch.arange(num_groups, device=rank_NK.device)
    return torch.where(best_NQ < BIG, q_Q[None, :] * P + (ref_N[:, None] % P + best_NQ) % P, BIG)


def group_targets_NQ(from_c_NQ: torch.Tensor, from_a_NQ: torch.Tensor, anchor_N: torch.Tensor,
                     in_R_N: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(relay_NQ, target_NQ): the dispatch relay (a if a in R_n else pick_n(c)) and the combine target
    (a on a's group, pick_n(a) elsewhere) of each token on each group; BIG where the group holds no R.
    ``from_c_NQ`` / ``from_a_NQ``: :func:`group_pick_NQ` from the position rank c / the anchor a."""
    Q = from_c_NQ.shape[1]
    on_a_NQ = (anchor_N // group_size)[:, None] == torch.arange(Q, device=from_c_NQ.device)[None, :]
    relay_NQ = torch.where(on_a_NQ & in_R_N[:, None], anchor_N[:, None], from_c_NQ)
    target_NQ = torch.where(on_a_NQ, anchor_N[:, None], from_a_NQ)
    return relay_NQ, target_NQ


def flows_GG(src_NX: torch.Tensor, dst_NX: torch.Tensor, valid_NX: torch.Tensor, world_size: int) -> torch.Tensor:
    """[G, G] int64 count of (src, dst) pairs over the valid cells (any shape, same for all three)."""
    G = world_size
    idx = (src_NX.clamp(0, G - 1) * G + dst_NX.clamp(0, G - 1)).reshape(-1)
    out = torch.zeros(G * G, dtype=torch.long, device=src_NX.device)
    return out.index_add_(0, idx, valid_NX.reshape(-1).long()).view(G, G)


def order_by_destination(dest_NG: torch.Tensor, token_N: torch.Tensor, num_step_tokens: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells of ``dest_NG`` sorted by (g, token); invalid cells last. Returns (row_X, dest_X, counts_G) where
    X = N * G: the caller keeps the first ``sum(counts_G)`` (a host-known total) entries."""
    N, G = dest_NG.shape
    g_G = torch.arange(G, device=dest_NG.device)
    key_NG = torch.where(dest_NG, g_G[None, :] * (num_step_tokens + 1) + token_N[:, None], BIG)
    order_X = torch.argsort(key_NG.reshape(-1), stable=True)
    return order_X // G, order_X % G, dest_NG.sum(dim=0)


def order_by_rank(rank_N: torch.Tensor, valid_N: torch.Tensor, token_N: torch.Tensor, num_step_tokens: int
                  ) -> torch.Tensor:
    """Rows sorted by (rank, token) with invalid rows last (one destination per row)."""
    key_N = torch.where(valid_N, rank_N * (num_step_tokens + 1) + token_N, BIG)
    return torch.argsort(key_N, stable=True)


def token_bitmap_W(token_N: torch.Tensor, valid_N: torch.Tensor, num_step_tokens: int) -> torch.Tensor:
    """[W] int64 words, 62 tokens each: bit t % 62 of word t // 62 set for every valid token t."""
    W = max(1, -(-num_step_tokens // 62))
    bits = torch.zeros(W, dtype=torch.long, device=token_N.device)
    word_N = torch.where(valid_N, token_N // 62, 0)
    value_N = torch.where(valid_N, torch.ones_like(token_N) << (token_N % 62), 0)
    return bits.index_add_(0, word_N, value_N)   # distinct tokens: adding bits == or-ing them


def bitmap_tokens(words: list[int], num_step_tokens: int) -> list[int]:
    """Host side of :func:`token_bitmap_W`: the set tokens, ascending (numpy over the words' bits)."""
    bits_WB = (np.asarray(words, dtype=np.int64)[:, None] >> np.arange(62, dtype=np.int64)[None, :]) & 1
    tokens = np.flatnonzero(bits_WB.reshape(-1))
    return tokens[tokens < num_step_tokens].tolist()
