"""Routing statistics: what the placement solvers optimise.

Shapes: T tokens, L MoE layers, K experts per token (top-k), E experts per layer, G GPUs, N nodes,
M = E/G experts per GPU per layer.

    RoutingTrace --compute_stats--> TraceStats(affinity [L-1,E,E], coact [L,E,E], load [L,E])
                                        |
    Placement --------------------> objective(stats, expert_to_gpu_LE, cluster)  (what solvers maximise)
                                    objective_upper_bound(stats, cluster)         (valid for every placement)

The objective is linear in pairwise co-location. For a pair of experts (i at layer l, j at layer l or l+1)
placed on GPUs g and h it earns the pair's weight times ``saving[g, h]``: 1 on the same GPU, ``1 - alpha``
on two GPUs of the same node and 0 across nodes, where ``alpha = intra_node_cost / inter_node_cost`` (on one
node: 1 on the same GPU, 0 otherwise). So ``objective = alpha * gpu_colocated + (1 - alpha) * node_colocated``.

Weights (``StatsOptions``): a token that picks expert i in slot s (0 = top-1) at layer l and j in slot d at
layer l+1 adds ``slot_decay ** (s + d)`` to ``affinity[l, i, j]`` (times both router weights when
``weighted``); ``slot_decay = 0`` keeps only top-1 -> top-1 pairs, 1 counts every pair alike. The default
(``None``, ``auto_slot_decay``) follows the trace's size: the most top-heavy decay in [0.5, 1] whose pair table
still holds ``AUTO_PAIRS_PER_CELL`` effective pairs per (i, j) cell. Top slots say most about top-1 traffic,
but few tokens spread over E x E cells are noise: FLAME (1229 tokens, 64 experts, top-6) keeps 0.5, a
DeepSeek-V3-shaped trace (2458 tokens, 256 experts, top-8) gets 1 (bench/results/placement_bench.md, scale),
FLAME's first 512 / 256 fit tokens 0.70 / 1 (their held-out top-1 on 1 x 8, 2 starts x 100 rounds, seeds 0-1:
0.589 / 0.618 at 0.5, 0.582 / 0.590 at 0.75, 0.575 / 0.608 at 1). Two experts
i != j picked together at layer l add ``coact_weight * slot_decay ** (s + d)`` to ``coact[l, i, j]``
(symmetric; each unordered pair counts once in the objective). These are a linear surrogate for the
coherent strategy's traffic (simulate.py), which is what the reports show.

Regularisation (``shrink = a`` in [0, 1]): pair counts from a few hundred tokens are noisy, so each layer's
affinity W (and co-activation C) is shrunk toward the product of its marginals, what the pairs would be if
the two choices were independent: ``(1 - a) W + a outer(row sums, column sums) / total`` (C: its row sums
both ways, diagonal kept zero). Totals and marginals are unchanged. ``a`` is chosen by cross-validation
inside the fit part (solvers/shrinkage.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from placement.cluster import ClusterShape
from placement.errors import InputError
from placement.trace import RoutingTrace


@dataclass(frozen=True, kw_only=True)
class StatsOptions:
    slot_decay: float | None = None   # pair of choices in slots (s, d) weighs slot_decay ** (s + d); None: auto
    coact_weight: float = 0.5   # weight of intra-layer co-activation relative to inter-layer affinity
    weighted: bool = False      # also multiply each pair by its two router weights
    shrink: float = 0.0         # pair counts shrunk this far toward the product of their marginals

    def __post_init__(self) -> None:
        for name in ("slot_decay", "coact_weight"):
            value = getattr(self, name)
            if name == "slot_decay" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise InputError(f"stats option {name} must be a finite number >= 0, got {value!r}")
        if self.slot_decay is not None and self.slot_decay > 1:
            raise InputError(f"stats option slot_decay must be in [0, 1], got {self.slot_decay}")
        if isinstance(self.shrink, bool) or not isinstance(self.shrink, (int, float)) or not 0 <= self.shrink <= 1:
            raise InputError(f"stats option shrink must be a number in [0, 1], got {self.shrink!r}")

    def to_dict(self) -> dict:
        return {"slot_decay": self.slot_decay, "coact_weight": self.coact_weight, "weighted": self.weighted,
                "shrink": self.shrink}


@dataclass(frozen=True, eq=False)
class TraceStats:
    """What a solver sees of a trace. Arrays are float64 sums over the trace's tokens."""

    affinity_LEE: np.ndarray    # [L-1, E, E] pair weight between expert i at layer l and j at l+1
    coact_LEE: np.ndarray       # [L, E, E] symmetric, zero diagonal, already times coact_weight
    load_LE: np.ndarray         # [L, E] activations per expert
    num_tokens: int
    top_k: int
    options: StatsOptions

    def __post_init__(self) -> None:
        L, E = self.load_LE.shape
        if self.affinity_LEE.shape != (max(L - 1, 0), E, E) or self.coact_LEE.shape != (L, E, E):
            raise InputError(f"stats shapes disagree: affinity {self.affinity_LEE.shape}, coact "
                             f"{self.coact_LEE.shape}, load {self.load_LE.shape}")

    @property
    def num_layers(self) -> int:
        return self.load_LE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load_LE.shape[1]


AUTO_PAIRS_PER_CELL = 2.5     # auto slot_decay: effective pairs per (i, j) cell of the pair table
AUTO_DECAY_RANGE = (0.5, 1.0)


def effective_pairs_per_token(slot_decay: float, top_k: int) -> float:
    """Kish effective sample size ``(sum w)**2 / sum w**2`` of one token's K x K slot pairs weighted
    ``slot_decay ** (s + d)``: that of its K slots (weights ``slot_decay ** s``), squared (1 for top-1 only,
    K**2 when every pair counts alike)."""
    w_K = float(slot_decay) ** np.arange(top_k, dtype=np.float64)
    return float((w_K.sum() ** 2 / (w_K ** 2).sum()) ** 2)


def auto_slot_decay(num_tokens: int, num_experts: int, top_k: int) -> float:
    """The smallest slot_decay in ``AUTO_DECAY_RANGE`` whose pair table holds ``AUTO_PAIRS_PER_CELL`` effective
    pairs per cell: ``num_tokens * effective_pairs_per_token(d, K) / E**2`` (increasing in d; bisection).
    Its upper end when even that falls short."""
    lo, hi = AUTO_DECAY_RANGE
    need = AUTO_PAIRS_PER_CELL * num_experts ** 2 / max(num_tokens, 1)
    if effective_pairs_per_token(lo, top_k) >= need:
        return lo
    if effective_pairs_per_token(hi, top_k) <= need:
        return hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if effective_pairs_per_token(mid, top_k) < need else (lo, mid)
    return round(hi, 4)


def compute_stats(trace: RoutingTrace, options: StatsOptions = StatsOptions()) -> TraceStats:
    """Inter-layer affinity, intra-layer co-activation and load of a trace (vectorised over tokens). The
    returned stats carry the options used, with an auto ``slot_decay`` resolved to its number."""
    experts_TLK = trace.experts_TLK.astype(np.int64)
    T, L, K = experts_TLK.shape
    E = trace.num_experts
    if options.slot_decay is None:
        options = dataclasses.replace(options, slot_decay=auto_slot_decay(T, E, K))
    w_TLK = np.broadcast_to(options.slot_decay ** np.arange(K, dtype=np.float64), (T, L, K))
    if options.weighted:
        w_TLK = w_TLK * trace.weights_TLK
    affinity_LEE = np.stack([_pair_sums(experts_TLK[:, l], w_TLK[:, l], experts_TLK[:, l + 1], w_TLK[:, l + 1], E)
                             for l in range(L - 1)]) if L > 1 else np.zeros((0, E, E))
    coact_LEE = np.zeros((L, E, E))
    if K > 1 and options.coact_weight > 0:
        for l in range(L):
            coact_LEE[l] = _pair_sums(experts_TLK[:, l], w_TLK[:, l], experts_TLK[:, l], w_TLK[:, l], E)
            np.fill_diagonal(coact_LEE[l], 0.0)
        coact_LEE *= options.coact_weight

    if options.shrink > 0:
        affinity_LEE = np.stack([shrink_pairs(A_EE, options.shrink) for A_EE in affinity_LEE]) if L > 1 \
            else affinity_LEE
        coact_LEE = np.stack([shrink_pairs(C_EE, options.shrink, symmetric=True) for C_EE in coact_LEE])

    layer_TLK = np.broadcast_to(np.arange(L)[None, :, None], experts_TLK.shape)
    load_LE = np.bincount((layer_TLK * E + experts_TLK).ravel(), minlength=L * E).reshape(L, E).astype(np.float64)
    return TraceStats(affinity_LEE, coact_LEE, load_LE, T, K, options)


def shrink_pairs(W_EE: np.ndarray, a: float, symmetric: bool = False) -> np.ndarray:
    """[E, E] pair weights shrunk by ``a`` toward the product of their marginals:
    ``(1 - a) W + a outer(W.sum(1), W.sum(0)) / W.sum()``. With ``symmetric`` (co-activation, zero diagonal)
    the target's diagonal is zeroed and it is rescaled so the total stays ``W.sum()``."""
    total = float(W_EE.sum())
    if total <= 0 or a == 0:
        return W_EE.copy()
    target_EE = np.outer(W_EE.sum(axis=1), W_EE.sum(axis=0)) / total
    if symmetric:
        np.fill_diagonal(target_EE, 0.0)
        off = float(target_EE.sum())
        target_EE = target_EE * (total / off) if off > 0 else W_EE
    return (1.0 - a) * W_EE + a * target_EE


def _pair_sums(a_TK: np.ndarray, wa_TK: np.ndarray, b_TK: np.ndarray, wb_TK: np.ndarray, E: int) -> np.ndarray:
    """[E, E] sum over tokens and slot pairs of wa * wb, at (a, b)."""
    pair_TKK = a_TK[:, :, None] * E + b_TK[:, None, :]
    w_TKK = wa_TK[:, :, None] * wb_TK[:, None, :]
    return np.bincount(pair_TKK.ravel(), w_TKK.ravel(), minlength=E * E).reshape(E, E)


def node_alpha(cluster: ClusterShape) -> float:
    """Share of a co-location's saving that needs the same GPU (the rest needs only the same node)."""
    if cluster.nodes == 1 or cluster.inter_node_cost == 0:
        return 1.0
    return min(cluster.intra_node_cost / cluster.inter_node_cost, 1.0)


def saving_GG(cluster: ClusterShape) -> np.ndarray:
    """[G, G] saving of a pair placed on GPUs (g, h): 1 same GPU, 1 - alpha same node, 0 across nodes."""
    G, alpha = cluster.num_gpus, node_alpha(cluster)
    node_G = np.arange(G) // cluster.gpus_per_node
    same_node_GG = (node_G[:, None] == node_G[None, :]).astype(np.float64)
    return alpha * np.eye(G) + (1.0 - alpha) * same_node_GG


def objective(stats: TraceStats, expert_to_gpu_LE: np.ndarray, cluster: ClusterShape) -> float:
    """Sum of pair weights times their saving under this placement (higher is better)."""
    s_GG = saving_GG(cluster)
    p_LE = np.asarray(expert_to_gpu_LE)
    total = 0.0
    for l in range(stats.num_layers - 1):
        total += float((stats.affinity_LEE[l] * s_GG[p_LE[l][:, None], p_LE[l + 1][None, :]]).sum())
    for l in range(stats.num_layers):
        total += 0.5 * float((stats.coact_LEE[l] * s_GG[p_LE[l][:, None], p_LE[l][None, :]]).sum())
    return total


def colocation_bound(stats: TraceStats, capacity: int) -> float:
    """Upper bound on the pair weight that can share a bin holding ``capacity`` experts of each layer.

    Inter-layer: expert i of layer l shares its bin with exactly ``capacity`` experts of layer l+1, so at most
    the sum of the ``capacity`` largest weights of its row (and likewise per column); the smaller of the
    row-wise and column-wise sums is taken per layer pair. Intra-layer: expert i shares with ``capacity - 1``
    others, so half the sum over i of its ``capacity - 1`` largest co-activations.
    """
    total = 0.0
    for A_EE in stats.affinity_LEE:
        rows = np.sort(A_EE, axis=1)[:, -capacity:].sum()
        cols = np.sort(A_EE, axis=0)[-capacity:, :].sum()
        total += min(rows, cols)
    if capacity > 1:
        for C_EE in stats.coact_LEE:
            total += 0.5 * np.sort(C_EE, axis=1)[:, -(capacity - 1):].sum()
    return float(total)


def objective_upper_bound(stats: TraceStats, cluster: ClusterShape) -> float:
    """A bound no placement on ``cluster`` can exceed (see ``colocation_bound``)."""
    E, alpha = stats.num_experts, node_alpha(cluster)
    bound = alpha * colocation_bound(stats, E // cluster.num_gpus)
    if alpha < 1.0:
        bound += (1.0 - alpha) * colocation_bound(stats, E // cluster.nodes)
    return bound
