"""The reference placement the solvers are held to at scale (issue 10, item 5): plain block coordinate ascent
over every top-k pair, no slot weighting, no co-activation, no restarts (about 30 lines).

    contiguous --for each layer l, layers l-1 and l+1 fixed: a linear assignment of l's experts to GPU slots on
    the affinity of all (i, j) pairs of a token's choices at (l-1, l) and (l, l+1)--> sweep until no gain

Shapes: L MoE layers, E experts, G GPUs, M = E / G experts per GPU.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from placement.stats import StatsOptions, compute_stats, saving_GG


def coordinate_ascent_all_pairs(trace, cluster, max_sweeps: int = 50) -> np.ndarray:
    """[L, E] the reference of issue 10 item 5: from contiguous, with layers l-1 and l+1 fixed, give layer l's
    experts to GPUs by a linear assignment on the affinity of every (i, j) pair of a token's top-k choices at l
    and l+1 (all pairs alike, no co-activation); sweep the layers until a sweep gains nothing."""
    L, E, G = trace.num_layers, trace.num_experts, cluster.num_gpus
    M = E // G
    A_LEE = compute_stats(trace, StatsOptions(slot_decay=1.0, coact_weight=0.0)).affinity_LEE
    S_GG = saving_GG(cluster)
    p_LE = np.tile(np.arange(E) // M, (L, 1))
    value = lambda p: sum(float((A_LEE[l] * S_GG[p[l][:, None], p[l + 1][None, :]]).sum())  # noqa: E731
                          for l in range(L - 1))
    best = value(p_LE)
    for _ in range(max_sweeps):
        for l in range(L):
            H_EG = np.zeros((E, G))
            if l > 0:
                H_EG += A_LEE[l - 1].T @ S_GG[p_LE[l - 1]]
            if l < L - 1:
                H_EG += A_LEE[l] @ S_GG[p_LE[l + 1]]
            rows, cols = linear_sum_assignment(np.repeat(H_EG, M, axis=1), maximize=True)
            new_E = np.empty(E, dtype=np.int64)
            new_E[rows] = cols // M
            if H_EG[np.arange(E), new_E].sum() > H_EG[np.arange(E), p_LE[l]].sum() + 1e-9:
                p_LE[l] = new_E
        now = value(p_LE)
        if now <= best + 1e-12 * abs(best):
            break
        best = now
    return p_LE
