"""hierarchical: nodes first (inter-node traffic), then GPUs inside each node.

    stage 1: local search with the N nodes as bins (E/N experts of each layer per node), maximising
             co-location on a node                                   -> node_of_LE
    stage 2: local search over the whole cluster's objective with every expert kept on its node's GPUs
             (start: a random spread inside each node)              -> expert_to_gpu_LE

Each stage gets half of the time limit. Shapes: L layers, E experts, N nodes.
"""

from __future__ import annotations

import dataclasses

from placement.cluster import ClusterShape
from placement.solvers import SolveOptions, SolverResult
from placement.solvers.local import solve_local
from placement.stats import TraceStats, objective_upper_bound


def solve_hierarchical(stats: TraceStats, cluster: ClusterShape, options: SolveOptions) -> SolverResult:
    half = dataclasses.replace(options, time_limit=options.time_limit / 2)
    node_of_LE = None
    if cluster.nodes > 1:
        nodes_as_bins = ClusterShape(nodes=1, gpus_per_node=cluster.nodes)
        options.report(f"hierarchical: stage 1, experts onto {cluster.nodes} nodes")
        node_of_LE = solve_local(stats, nodes_as_bins, half).expert_to_gpu_LE
    options.report(f"hierarchical: stage 2, experts onto the {cluster.gpus_per_node} GPUs of each node")
    result = solve_local(stats, cluster, half, node_of_LE=node_of_LE)
    return SolverResult(result.expert_to_gpu_LE, objective_upper_bound(stats, cluster), extra=result.extra)
