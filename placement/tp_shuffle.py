"""Which rank holds which step token between a tensor-parallel attention layer and the next (``--attention tp``).

Under TP attention every rank computes every step token's attention for its own heads; the layer's output
partials are reduce-scattered so that each rank sums ONE chunk of the tokens (C = ceil(T / G) rows per rank,
padded), runs the MoE (or dense) layer on it and all-gathers the result for the next layer's attention. The
chunking is a pure function of step metadata, so every rank computes the same one (no talk):

    contiguous_chunks (tp_two_a2a, DeepSpeed-MoE with TP attention): token t on rank t // C.
    balanced_chunks   (tp_speculative, Speculative MoE's s-TS): token t on the rank predicted to hold its experts
                      while that rank holds fewer than the cap ceil(factor x T / G) rows; C is then the fullest
                      rank's rows (at least ceil(T / G): padding only as far as the predictions are skewed); the
                      rest (no prediction, or their rank full) fill the free rows rank by rank, lowest rank first,
                      in index order. Vectorised: no Python loop over the step's tokens.

Output: ``order_GC`` int64 [G, C]: the step token in row c of rank g's chunk, -1 for padding; each rank's row
ascending (the dispatcher wants held tokens ascending).

Shapes: T step tokens, G ranks, C rows per rank.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from placement.errors import InputError


def chunk_rows(num_tokens: int, world_size: int) -> int:
    """C: rows per rank (at least 1)."""
    return max(1, -(-num_tokens // world_size))


def contiguous_chunks(num_tokens: int, world_size: int) -> np.ndarray:
    """int64 [G, C]: token t in row t % C of rank t // C; -1 pads the last ranks' rows."""
    C = chunk_rows(num_tokens, world_size)
    order = np.full(world_size * C, -1, dtype=np.int64)
    order[:num_tokens] = np.arange(num_tokens)
    return order.reshape(world_size, C)


def balanced_chunks(pred_rank_T: np.ndarray, world_size: int, *, capacity_factor: float = 1.0) -> np.ndarray:
    """int64 [G, C] as contiguous_chunks, each token on its predicted rank (-1: none) while room lasts.
    ``capacity_factor`` >= 1: a rank takes at most ceil(factor x T / G) predicted tokens (room for a skewed batch);
    C = the fullest rank's rows, never less than ceil(T / G): the padding the reduce-scatter and all-gather carry
    is what the skew needs, not the cap."""
    pred_T = np.asarray(pred_rank_T, dtype=np.int64)
    T, G = len(pred_T), world_size
    if capacity_factor < 1:
        raise ValueError(f"capacity_factor must be >= 1, got {capacity_factor}")
    cap = min(T, chunk_rows(int(np.ceil(capacity_factor * T)), G)) if T else 1
    if len(pred_T) and (pred_T.max() >= G or pred_T.min() < -1):
        raise ValueError(f"predicted ranks must be in [-1, {G}), got {pred_T.min()}..{pred_T.max()}")
    # predicted tokens first, in index order, at most ``cap`` per rank (no Python loop over tokens: hot path)
    key_T = np.where(pred_T >= 0, pred_T, G)
    by_rank = np.argsort(key_T, kind="stable")
    count_G = np.bincount(key_T, minlength=G + 1)
    start_G = np.concatenate([[0], np.cumsum(count_G)[:-1]])
    within = np.arange(T) - start_G[key_T[by_rank]]
    taken = (key_T[by_rank] < G) & (within < cap)
    rank_T = np.full(T, -1, dtype=np.int64)
    rank_T[by_rank[taken]] = key_T[by_rank[taken]]
    load_G = np.bincount(rank_T[rank_T >= 0], minlength=G)
    C = max(chunk_rows(T, G), int(load_G.max(initial=0)))
    # the rest, in index order, into the free rows rank by rank (lowest rank first)
    rest = np.flatnonzero(rank_T < 0)
    rank_T[rest] = np.repeat(np.arange(G), C - load_G)[: len(rest)]
    return _order_GC(rank_T, G, C)


def _order_GC(rank_T: np.ndarray, G: int, C: int) -> np.ndarray:
    """int64 [G, C]: each rank's tokens ascending, -1 padding."""
    by_rank = np.argsort(rank_T, kind="stable")
    count_G = np.bincount(rank_T, minlength=G)
    start_G = np.concatenate([[0], np.cumsum(count_G)[:-1]])
    order = np.full((G, C), -1, dtype=np.int64)
    order[rank_T[by_rank], np.arange(len(rank_T)) - start_G[rank_T[by_rank]]] = by_rank
    return order


def real_rows_G(order_GC: np.ndarray) -> list[int]:
    """Real (non-padding) rows of each rank's chunk."""
    return (order_GC >= 0).sum(axis=1).tolist()


class AttentionLayout(Enum):
    """``--attention``: where a token's attention runs. DP: on one rank (today's strategies); TP: heads sharded
    over the EP group, the layer's tokens reduce-scattered into chunks around each MoE layer."""

    DP = "dp"
    TP = "tp"

    @classmethod
    def parse(cls, name: str) -> "AttentionLayout":
        try:
            return cls(name)
        except ValueError:
            raise InputError(f"attention must be one of {', '.join(a.value for a in cls)}, got {name!r}") from None
