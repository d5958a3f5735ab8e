"""The replica rule (placement/replicas.py) by hand, and the simulator following it."""

from __future__ import annotations

import numpy as np

from placement import ClusterShape, RoutingTrace
from placement.placement import Placement, contiguous_placement
from placement.replicas import copy_choice_LEG
from placement.simulate import Strategy, simulate


def test_copy_choice_prefers_here_then_the_node_then_spreads_by_source():
    copies = np.zeros((1, 3, 4), dtype=bool)            # 2 nodes x 2 GPUs
    copies[0, 0, [0, 3]] = True                         # expert 0 on node 0 (GPU 0) and node 1 (GPU 3)
    copies[0, 1, 1] = True                              # expert 1: one copy
    copies[0, 2, [2, 3]] = True                         # expert 2: two copies, both on node 1
    choice = copy_choice_LEG(copies, gpus_per_node=2)
    assert choice[0, 0].tolist() == [0, 0, 3, 3]        # here, else the copy on the node
    assert choice[0, 1].tolist() == [1, 1, 1, 1]        # one copy: everyone uses it
    assert choice[0, 2].tolist() == [2, 3, 2, 3]        # node 0 has none: sources spread (copy c mod 2)


def test_one_copy_placements_choose_their_table():
    p = contiguous_placement(3, 8, ClusterShape(nodes=2, gpus_per_node=2))
    assert (p.copy_choice_LEG == p.expert_to_gpu_LE[:, :, None]).all()


def test_simulator_two_a2a_uses_the_home_ranks_copy():
    copies = np.zeros((1, 4, 2), dtype=bool)
    copies[0, [0, 1], 0] = copies[0, [2, 3], 1] = True
    copies[0, 2, 0] = copies[0, 1, 1] = True           # experts 1 and 2 on both GPUs: 3 slots each
    p = Placement.from_copies(copies, ClusterShape(gpus_per_node=2))
    # token 0 (home 0) routes to 2 then 3; token 1 (home 1) to 1 then 0
    trace = RoutingTrace(np.array([[[2, 3]], [[1, 0]]], dtype=np.int16), np.full((2, 1, 2), 0.5, np.float32), 4)
    r = simulate(trace, p, Strategy.TWO_A2A, home_rank_T=np.array([0, 1]))
    # token 0: expert 2 local (GPU 0 holds a copy), expert 3 on GPU 1 -> 1 dispatch + 1 combine;
    # token 1: expert 1 local (GPU 1's copy), expert 0 on GPU 0 -> 1 dispatch + 1 combine
    assert (int(r.dispatch_L[0]), int(r.combine_L[0]), int(r.local_activations_L[0])) == (2, 2, 2)
    assert r.load_LG[0].tolist() == [2, 2]
    one = contiguous_placement(1, 4, ClusterShape(gpus_per_node=2))   # 0, 1 on GPU 0; 2, 3 on GPU 1
    base = simulate(trace, one, Strategy.TWO_A2A, home_rank_T=np.array([0, 1]))
    assert int(base.local_activations_L[0]) == 0 and int(base.dispatch_L[0]) == 2
