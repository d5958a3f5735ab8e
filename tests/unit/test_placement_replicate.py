"""Replicas for load (placement/solvers/replicate.py): hot experts copied into the redundant slots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from launch.cli import main
from placement import ClusterShape, InputError, Placement, SolveOptions, Strategy, compute_stats, simulate, solve
from placement.solvers.replicate import add_replicas, load_max_over_mean_L, spread_primaries
from placement.synthetic import SyntheticSpec, synthetic_trace


def _trace(E: int = 16, L: int = 4, T: int = 1200):
    return synthetic_trace(SyntheticSpec(num_tokens=T, num_layers=L, num_experts=E, top_k=2, num_clusters=4, seed=7))


def test_one_hot_expert_replica_halves_max_over_mean():
    # 6 experts on 1 node x 2 GPUs, S = 4 (2 extra slots); expert 0 carries 60 of 80 activations, 30 from each GPU
    cluster = ClusterShape(gpus_per_node=2)
    load_LE = np.array([[60.0, 4, 4, 4, 4, 4]])
    primaries = np.array([[0, 0, 0, 1, 1, 1]])
    p = add_replicas(primaries, load_LE, 4, cluster=cluster)
    # before: GPU 0 68, GPU 1 12, mean 40 -> 1.7; expert 0 copied to GPU 1 (30 / 30 by source), then GPU 0's last
    # free slot takes expert 3 (the hottest it can still hold): 40 / 40 -> 1.0
    assert p.objective["load"]["max_over_mean_before"] == pytest.approx(1.7)
    assert p.objective["load"]["max_over_mean"] == pytest.approx(1.0)
    assert p.gpus_of(0, 0) == [0, 1] and p.gpus_of(0, 3) == [0, 1]
    assert p.solver["replicas"]["copies_lej"] == [[0, 0, 1], [0, 3, 0]]
    assert p.slots_per_gpu == 4 and p.has_replicas
    assert p.objective["load"]["max_over_mean"] <= p.objective["load"]["max_over_mean_before"] / 1.7 + 1e-12


def test_load_model_equals_simulator_two_a2a_and_lowers_imbalance():
    trace = _trace()
    cluster = ClusterShape(nodes=2, gpus_per_node=2)
    base = solve(compute_stats(trace), cluster, SolveOptions(restarts=1, rounds=5))
    p = add_replicas(base, trace, 5)
    assert p.slots_per_gpu == 5 and (p.copies_LEG.sum(axis=1) == 5).all()
    assert (p.copies_LEG[:, :, :].sum(axis=2) >= 1).all()
    sim = simulate(trace, p, Strategy.TWO_A2A).load_max_over_mean_L
    np.testing.assert_allclose(load_max_over_mean_L(p, trace), sim)
    np.testing.assert_allclose(p.objective["load"]["max_over_mean_L"], sim.round(4))
    before = simulate(trace, base, Strategy.TWO_A2A).load_max_over_mean_L
    assert sim.max() < before.max()
    again = Placement.from_dict(json.loads(json.dumps(p.to_dict())))
    assert np.array_equal(again.copies_LEG, p.copies_LEG)


def test_fewer_experts_than_gpus():
    trace = _trace(E=8)
    cluster = ClusterShape(nodes=2, gpus_per_node=8)
    p = add_replicas(spread_primaries(4, 8, 16), trace, 1, cluster=cluster)
    assert p.num_experts == 8 and p.num_gpus == 16 and p.slots_per_gpu == 1
    assert (p.copies_LEG.sum(axis=1) == 1).all()                 # one copy per GPU
    assert (p.copies_LEG.sum(axis=2) >= 1).all()                 # every expert somewhere
    assert p.copies_LEG.sum() == 4 * 16
    load = p.objective["load"]
    assert load["max_over_mean"] < load["max_over_mean_before"]
    simulate(trace, p, Strategy.COHERENT)                        # the simulator takes it
    Placement.from_dict(p.to_dict())


def test_bad_slots():
    cluster = ClusterShape(gpus_per_node=4)
    with pytest.raises(InputError, match="every expert needs a slot"):
        add_replicas(spread_primaries(1, 16, 4), np.ones((1, 16)), 3, cluster=cluster)
    with pytest.raises(InputError, match="at most one copy"):
        add_replicas(spread_primaries(1, 2, 4), np.ones((1, 2)), 3, cluster=cluster)
    with pytest.raises(InputError, match="max imbalance"):
        add_replicas(spread_primaries(1, 8, 4), np.ones((1, 8)), 3, cluster=cluster, max_imbalance=0.5)


@pytest.mark.parametrize("experts,nodes,per,slots", [(16, 1, 4, 5), (8, 2, 8, 1)])
def test_cli_writes_v2_file(tmp_path, capsys, experts, nodes, per, slots):
    path = tmp_path / "t.npz"
    _trace(E=experts).save(path)
    out = tmp_path / "p.json"
    rc = main(["place", "--trace", str(path), "--nodes", str(nodes), "--gpus-per-node", str(per),
               "--slots-per-gpu", str(slots), "--held-out", "0.25", "--restarts", "1", "--rounds", "5", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "replicas" in text
    d = json.loads(out.read_text())
    assert d["version"] == 2 and d["slots_per_gpu"] == slots
    p = Placement.load(out)
    assert p.slots_per_gpu == slots and p.has_replicas and p.num_experts == experts
    assert p.solver["replicas"]["added"] == (slots * nodes * per - experts) * 4 \
        and "max_over_mean" in p.objective["load"]


def test_cli_refuses_too_few_slots(tmp_path, capsys):
    path = tmp_path / "t.npz"
    _trace().save(path)
    assert main(["place", "--trace", str(path), "--gpus-per-node", "4", "--slots-per-gpu", "3",
                 "-o", str(tmp_path / "p.json")]) == 2
    assert "every expert needs a slot" in capsys.readouterr().err
