"""The placements other systems use: contiguous blocks (DeepSpeed-MoE), round robin, and token-load balanced.

Shapes: L layers, E experts, G GPUs, M = E/G experts per GPU per layer. None of them looks at affinity; each
still reports the cheap upper bound (stats.objective_upper_bound) so its gap is comparable.
"""

from __future__ import annotations

import numpy as np

from placement.cluster import ClusterShape
from placement.solvers import SolveOptions, SolverResult
from placement.stats import TraceStats, objective_upper_bound


def solve_contiguous(stats: TraceStats, cluster: ClusterShape, options: SolveOptions) -> SolverResult:
    """Expert e on GPU e // M in every layer."""
    L, E = stats.load_LE.shape
    row_E = np.arange(E) // (E // cluster.num_gpus)
    return SolverResult(np.tile(row_E, (L, 1)), objective_upper_bound(stats, cluster))


def solve_round_robin(stats: TraceStats, cluster: ClusterShape, options: SolveOptions) -> SolverResult:
    """Expert e on GPU e % G in every layer."""
    L, E = stats.load_LE.shape
    return SolverResult(np.tile(np.arange(E) % cluster.num_gpus, (L, 1)), objective_upper_bound(stats, cluster))


def solve_balanced(stats: TraceStats, cluster: ClusterShape, options: SolveOptions) -> SolverResult:
    """Per layer, experts by decreasing token load onto the least-loaded GPU that still has a free slot
    (longest-processing-time first, with equal expert counts)."""
    L, E = stats.load_LE.shape
    G, M = cluster.num_gpus, E // cluster.num_gpus
    expert_to_gpu_LE = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        load_G, free_G = np.zeros(G), np.full(G, M)
        for e in np.argsort(-stats.load_LE[l], kind="stable"):
            g = int(np.argmin(np.where(free_G > 0, load_G, np.inf)))
            expert_to_gpu_LE[l, e] = g
            load_G[g] += stats.load_LE[l, e]
            free_G[g] -= 1
    return SolverResult(expert_to_gpu_LE, objective_upper_bound(stats, cluster))
