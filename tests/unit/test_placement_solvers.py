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


# ---- schema version 2: replicas in the file format ---------------------------------------------------------
def test_v2_round_trip_with_replicas_and_fewer_experts_than_gpus(tmp_path):
    from placement.placement import Placement
    cluster = ClusterShape(nodes=2, gpus_per_node=8)
    copies = np.zeros((2, 8, 16), dtype=bool)
    for l in range(2):
        for g in range(16):                      # Mixtral's 8 experts on 16 GPUs: every expert twice
            copies[l, (g + l) % 8, g] = True
    p = Placement.from_copies(copies, cluster, solver={"name": "hand"})
    assert (p.slots_per_gpu, p.has_replicas) == (1, True)
    assert p.gpus_of(0, 3) == [3, 11] and p.gpus_of(1, 0) == [7, 15]
    assert p.expert_to_gpu_LE[1].tolist() == [7, 0, 1, 2, 3, 4, 5, 6]   # primary copy: the lowest GPU id
    assert p.experts_on(11).tolist() == [[3], [4]]
    p.save(tmp_path / "p.json")
    back = Placement.load(tmp_path / "p.json")
    assert (back.copies_LEG == copies).all() and back.to_dict() == p.to_dict()


def test_v1_files_still_load_as_one_copy_per_expert(tmp_path):
    import json
    from placement.placement import Placement, contiguous_placement
    one = contiguous_placement(3, 8, ClusterShape(gpus_per_node=4))
    v1 = {"version": 1, "num_layers": 3, "num_experts": 8, "cluster": one.cluster.to_dict(),
          "expert_to_gpu": one.expert_to_gpu_LE.tolist()}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    back = Placement.load(tmp_path / "v1.json")
    assert (back.expert_to_gpu_LE == one.expert_to_gpu_LE).all() and not back.has_replicas
    assert back.slots_per_gpu == 2 and back.to_dict()["version"] == 2


@pytest.mark.parametrize("change, message", [
    (lambda rows: rows[1].__setitem__(2, []), r"layer 1, expert 2: needs a non-empty list of GPU ids"),
    (lambda rows: rows[0].__setitem__(0, [0, 0]), r"layer 0, expert 0: GPU 0 is listed twice"),
    (lambda rows: rows[0].__setitem__(5, [9]), r"layer 0, expert 5: GPU 9 is outside the cluster \[0, 4\)"),
    (lambda rows: rows[0].__setitem__(0, [0, 1]), r"layer 0: GPU 1 holds 3 copies, every GPU must hold the same"),
])
def test_v2_bad_files_are_named(tmp_path, change, message):
    import json
    from placement.errors import PlacementError
    from placement.placement import Placement, contiguous_placement
    d = contiguous_placement(2, 8, ClusterShape(gpus_per_node=4)).to_dict()
    change(d["expert_to_gpus"])
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(PlacementError, match=message):
        Placement.load(tmp_path / "bad.json")


def test_v2_slots_header_must_match():
    from placement.errors import PlacementError
    from placement.placement import Placement, contiguous_placement
    d = contiguous_placement(2, 8, ClusterShape(gpus_per_node=4)).to_dict()
    with pytest.raises(PlacementError, match=r"slots_per_gpu says 3, but every GPU holds 2 copies per layer"):
        Placement.from_dict(dict(d, slots_per_gpu=3))
