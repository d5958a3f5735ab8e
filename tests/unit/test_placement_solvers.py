"""Solvers: baselines by hand, ilp against brute force, local against ilp's proven optimum, hierarchical."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from placement import ClusterShape, InputError, RoutingTrace
from placement.simulate import Strategy, simulate
from placement.solvers import SolveOptions, SolverKind, solve
from placement.stats import StatsOptions, compute_stats, objective
from placement.synthetic import SyntheticSpec, synthetic_trace


def _stats(**spec):
    base = dict(num_tokens=1500, num_layers=4, num_experts=8, top_k=2, num_clusters=4, noise=0.3, seed=5)
    return compute_stats(synthetic_trace(SyntheticSpec(**{**base, **spec})), StatsOptions())


def test_baselines_by_hand():
    experts = np.array([[[3], [0]], [[3], [1]], [[2], [1]], [[0], [1]]], dtype=np.int16)   # 4 tokens, 2 layers
    st = compute_stats(RoutingTrace(experts, np.ones(experts.shape, np.float32), 4), StatsOptions())
    cluster = ClusterShape(gpus_per_node=2)
    contiguous = solve(st, cluster, SolveOptions(solver=SolverKind.CONTIGUOUS))
    assert contiguous.expert_to_gpu_LE.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert contiguous.solver["name"] == "contiguous"
    assert solve(st, cluster, SolveOptions(solver=SolverKind.ROUND_ROBIN)).expert_to_gpu_LE.tolist() == \
        [[0, 1, 0, 1], [0, 1, 0, 1]]
    # loads: layer 0 = [1, 0, 1, 2] -> expert 3 to GPU 0, then 0 to GPU 1, 2 to GPU 1 (tie by load: 1 vs 2)
    # (GPU 1 is then full), 1 to GPU 0; layer 1 = [1, 3, 0, 0] -> 1: GPU 0, 0: GPU 1, 2: GPU 1, 3: GPU 0
    balanced = solve(st, cluster, SolveOptions(solver=SolverKind.BALANCED)).expert_to_gpu_LE
    assert balanced.tolist() == [[1, 0, 1, 0], [1, 0, 1, 0]]


def _brute_force_best(st, cluster) -> float:
    L, E = st.load_LE.shape
    G, M = cluster.num_gpus, E // cluster.num_gpus
    rows = sorted(set(itertools.permutations(np.repeat(np.arange(G), M))))
    first_rows = [r for r in rows if r[0] == 0]                 # GPU labels are symmetric (G = 2)
    best = -np.inf
    for combo in itertools.product(first_rows, *[rows] * (L - 1)):
        best = max(best, objective(st, np.array(combo), cluster))
    return best


def test_ilp_proves_the_brute_force_optimum():
    st = _stats(num_layers=3, num_experts=6, num_clusters=3, noise=0.5)
    cluster = ClusterShape(gpus_per_node=2)
    placement = solve(st, cluster, SolveOptions(solver=SolverKind.ILP, time_limit=30))
    best = _brute_force_best(st, cluster)
    assert placement.solver["status"] == "optimal"
    assert placement.objective["value"] == pytest.approx(best)
    assert placement.objective["upper_bound"] == pytest.approx(best, rel=1e-4)


def test_local_is_within_3_percent_of_the_proven_optimum():
    st = _stats(num_layers=4, num_experts=8, num_clusters=4, noise=0.4)
    cluster = ClusterShape(gpus_per_node=2)
    exact = solve(st, cluster, SolveOptions(solver=SolverKind.ILP, time_limit=30))
    assert exact.solver["status"] == "optimal"
    local = solve(st, cluster, SolveOptions(solver=SolverKind.LOCAL))
    assert local.objective["value"] >= 0.97 * exact.objective["upper_bound"]
    assert local.objective["upper_bound"] >= exact.objective["value"]       # the cheap bound is valid too


def test_local_finds_the_planted_placement_and_cuts_coherent_traffic():
    spec = SyntheticSpec(num_tokens=3000, num_layers=6, num_experts=16, top_k=2, num_clusters=4, noise=0.05,
                         stickiness=0.95, seed=2)
    fit, held_out = synthetic_trace(spec).split(0.6)
    cluster = ClusterShape(gpus_per_node=4)
    local = solve(compute_stats(fit), cluster, SolveOptions(solver=SolverKind.LOCAL, seed=1))
    contiguous = solve(compute_stats(fit), cluster, SolveOptions(solver=SolverKind.CONTIGUOUS))
    ours = simulate(held_out, local, Strategy.COHERENT)
    base = simulate(held_out, contiguous, Strategy.TWO_A2A)
    # planted: a token keeps its cluster with p = 0.95 and routes inside it with p ~ 0.95 per choice
    assert ours.top1_cross_gpu_rate < 0.15
    assert base.top1_cross_gpu_rate > 0.6
    assert ours.transfers_per_token_layer < 0.35 * base.transfers_per_token_layer
    assert local.solver["restarts_run"] == 4 and local.objective["gap"] >= 0


def test_ilp_without_an_exact_model_says_why():
    st = _stats(num_layers=2, num_experts=32, num_clusters=4)
    placement = solve(st, ClusterShape(gpus_per_node=2), SolveOptions(solver=SolverKind.ILP, time_limit=5))
    assert placement.solver["status"] == "heuristic"
    assert "C(32, 16) = 601080390 expert subsets per layer" in placement.solver["exact_model"]


def test_hierarchical_keeps_traffic_inside_nodes():
    spec = SyntheticSpec(num_tokens=3000, num_layers=4, num_experts=16, top_k=4, num_clusters=2, noise=0.2,
                         seed=4)
    trace = synthetic_trace(spec)
    cluster = ClusterShape(nodes=2, gpus_per_node=2)
    hier = solve(compute_stats(trace), cluster, SolveOptions(solver=SolverKind.HIERARCHICAL, seed=0))
    contiguous = solve(compute_stats(trace), cluster, SolveOptions(solver=SolverKind.CONTIGUOUS))
    h = simulate(trace, hier, Strategy.COHERENT)
    c = simulate(trace, contiguous, Strategy.COHERENT)
    assert h.cross_node_transfers < 0.55 * c.cross_node_transfers       # measured: 16314 vs 31846
    assert hier.objective["value"] > contiguous.objective["value"]


def test_solver_options_are_validated():
    with pytest.raises(InputError, match="time limit must be a positive number"):
        SolveOptions(time_limit=0)
    with pytest.raises(InputError, match="unknown solver 'greedy'"):
        SolverKind.parse("greedy")
    with pytest.raises(InputError, match="12 experts cannot be split evenly over 8 GPUs"):
        solve(_stats(num_experts=12, num_clusters=4), ClusterShape(gpus_per_node=8))


@pytest.mark.slow
def test_ilp_proves_optimality_at_8_layers_16_experts_4_gpus():
    """The size the column model is for (bench/placement_bench.py times it; here only exactness counts)."""
    spec = SyntheticSpec(num_tokens=2000, num_layers=8, num_experts=16, top_k=2, num_clusters=8, noise=0.5, seed=1)
    st = compute_stats(synthetic_trace(spec))
    cluster = ClusterShape(gpus_per_node=4)
    exact = solve(st, cluster, SolveOptions(solver=SolverKind.ILP, time_limit=300))
    assert exact.solver["status"] == "optimal" and exact.objective["gap"] < 1e-4
    local = solve(st, cluster, SolveOptions())
    assert exact.objective["value"] >= local.objective["value"]
    assert local.objective["value"] >= 0.97 * exact.objective["upper_bound"]
