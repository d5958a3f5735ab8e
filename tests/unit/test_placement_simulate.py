"""The traffic simulator against values computed by hand from the traffic model (simulate.py docstring)."""

from __future__ import annotations

import numpy as np
import pytest

from placement import ClusterShape, InputError, Placement, PlacementError, RoutingTrace, TraceError
from placement.simulate import SimOptions, Strategy, simulate


def _trace(experts, *, E, seq=None, pos=None, token_ids=None) -> RoutingTrace:
    experts_TLK = np.array(experts, dtype=np.int16)
    T, L, K = experts_TLK.shape
    weights_TLK = np.broadcast_to(np.linspace(0.6, 0.1, K, dtype=np.float32), (T, L, K)).copy()
    arr = lambda a: None if a is None else np.array(a, dtype=np.int32)  # noqa: E731
    return RoutingTrace(experts_TLK, weights_TLK, E, arr(token_ids), arr(seq), arr(pos))


def _placement(rows, *, nodes=1, gpus_per_node) -> Placement:
    return Placement(np.array(rows), ClusterShape(nodes=nodes, gpus_per_node=gpus_per_node))


# 3 tokens, 2 layers, top-2, experts {0,1} on GPU 0 and {2,3} on GPU 1; no seq_ids: homes 0, 1, 0.
TOP2 = [[[0, 2], [1, 0]],
        [[3, 2], [0, 3]],
        [[2, 3], [2, 1]]]
CONTIGUOUS_4x2 = [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_two_a2a_counts_by_hand():
    r = simulate(_trace(TOP2, E=4), _placement(CONTIGUOUS_4x2, gpus_per_node=2), Strategy.TWO_A2A)
    assert r.dispatch_L.tolist() == [2, 2]
    assert r.combine_L.tolist() == [2, 2]
    assert r.transfers == 8
    assert r.transfers_per_token_layer == pytest.approx(8 / 6)
    assert r.local_activations_L.tolist() == [3, 4]
    assert r.lar == pytest.approx(7 / 12)
    assert r.top1_cross_L.tolist() == [1]
    assert r.top1_cross_gpu_rate == pytest.approx(1 / 3)
    assert r.load_LG.tolist() == [[1, 5], [4, 2]]
    assert r.a2a_calls_per_layer == 2
    assert (r.kv_entry_copies, r.sampled_id_copies) == (0, 0)
    assert r.cross_node_transfers == 0


def test_coherent_top2_anchor_is_top1_rank():
    r = simulate(_trace(TOP2, E=4), _placement(CONTIGUOUS_4x2, gpus_per_node=2), Strategy.COHERENT)
    # layer 0 starts at home (every row is its own sequence); anchors r_1 = 0, 1, 1
    assert r.dispatch_L.tolist() == [2, 2]
    assert r.combine_L.tolist() == [1, 2]
    assert r.transfers == 7
    assert r.local_activations_L.tolist() == [3, 4]
    assert r.a2a_calls_per_layer == 2
    assert r.kv_entry_copies == 3 * 2 * 1          # tokens x attention layers x (G - 1)
    assert r.sampled_id_copies == 3 * 1
    assert r.to_dict()["sampled_id_bytes"] == 24


def test_kv_bytes_and_transfer_bytes_when_sizes_are_known():
    opts = SimOptions(hidden_size=16, dtype_bytes=2, kv_entry_bytes=64, attention_layers=5)
    r = simulate(_trace(TOP2, E=4), _placement(CONTIGUOUS_4x2, gpus_per_node=2), Strategy.COHERENT, options=opts)
    assert r.transfer_bytes == 7 * 16 * 2
    assert r.kv_entry_copies == 3 * 5 * 1
    assert r.kv_bytes == 3 * 5 * 1 * 64


# One sequence (home 0), positions 0..2 given in shuffled row order, top-1, expert e on GPU e.
SEQ_ROWS = {0: [[1], [1]], 1: [[0], [1]], 2: [[1], [0]]}
ORDER = [2, 0, 1]


def _seq_trace():
    return _trace([SEQ_ROWS[p] for p in ORDER], E=2, seq=[0, 0, 0], pos=ORDER)


def test_coherent_top1_follows_previous_token_and_needs_one_a2a():
    r = simulate(_seq_trace(), _placement([[0, 1], [0, 1]], gpus_per_node=2), Strategy.COHERENT)
    # pos0 starts at home 0 -> layer0 rank 1 (1 transfer), layer1 rank 1 (0); pos1 starts at 1 (pos0's final
    # anchor) -> rank 0 (1), rank 1 (1); pos2 starts at 1 -> rank 1 (0), rank 0 (1).
    assert r.dispatch_L.tolist() == [2, 2]
    assert r.combine_L.tolist() == [0, 0]
    assert r.a2a_calls_per_layer == 1
    two = simulate(_seq_trace(), _placement([[0, 1], [0, 1]], gpus_per_node=2), Strategy.TWO_A2A)
    assert two.transfers == 8


def test_prefill_tokens_go_home_and_break_the_chain():
    prefill_T = np.array([p == 0 for p in ORDER])
    r = simulate(_seq_trace(), _placement([[0, 1], [0, 1]], gpus_per_node=2), Strategy.COHERENT,
                 prefill_T=prefill_T)
    # pos0 (prefill) two_a2a at home 0: 1+1 per layer; pos1 starts at home (its previous is prefill).
    assert r.dispatch_L.tolist() == [1 + 0 + 0, 1 + 1 + 1]
    assert r.combine_L.tolist() == [1, 1]
    assert r.sampled_id_copies == (2 + 1) * 1      # two decode tokens + the prompt's last token


def test_home_rank_override():
    homes = np.array([1, 1, 1])
    r = simulate(_trace(TOP2, E=4), _placement(CONTIGUOUS_4x2, gpus_per_node=2), Strategy.TWO_A2A,
                 home_rank_T=homes)
    # R per token-layer: {0,1},{0} | {1},{0,1} | {1},{0,1}; home 1 everywhere
    assert r.dispatch_L.tolist() == [1 + 0 + 0, 1 + 1 + 1]
    with pytest.raises(InputError, match="home ranks must lie in"):
        simulate(_trace(TOP2, E=4), _placement(CONTIGUOUS_4x2, gpus_per_node=2), Strategy.TWO_A2A,
                 home_rank_T=np.array([0, 2, 0]))


# 2 nodes x 2 GPUs, expert e on GPU e, one layer, top-2; homes 0..3.
CROSS = [[[3, 1]], [[0, 1]], [[2, 0]], [[1, 2]]]


def test_cross_node_counting():
    placement = _placement([[0, 1, 2, 3]], nodes=2, gpus_per_node=2)
    two = simulate(_trace(CROSS, E=4), placement, Strategy.TWO_A2A)
    assert (two.dispatch_L.tolist(), two.combine_L.tolist()) == ([6], [6])
    assert (two.cross_node_dispatch_L.tolist(), two.cross_node_combine_L.tolist()) == ([3], [3])
    coh = simulate(_trace(CROSS, E=4), placement, Strategy.COHERENT)
    assert (coh.dispatch_L.tolist(), coh.combine_L.tolist()) == ([6], [4])
    assert (coh.cross_node_dispatch_L.tolist(), coh.cross_node_combine_L.tolist()) == ([3], [3])
    assert coh.cross_node_transfers == 6


def test_speculative_refuses_a_trace_without_vocabulary_ids():
    with pytest.raises(TraceError, match="no vocabulary ids"):
        simulate(_trace(TOP2, E=4), _placement(CONTIGUOUS_4x2, gpus_per_node=2), Strategy.SPECULATIVE)


def test_placement_must_fit_the_trace():
    with pytest.raises(PlacementError, match="placement is for 2 MoE layers x 4 experts, but the trace has 2 x 8"):
        simulate(_trace([[[7], [0]]], E=8), _placement(CONTIGUOUS_4x2, gpus_per_node=2), Strategy.TWO_A2A)


def test_duplicate_sequence_position_is_refused():
    trace = _trace([[[0]], [[1]]], E=2, seq=[4, 4], pos=[3, 3])
    with pytest.raises(TraceError, match="seq_id 4 position 3 appears twice"):
        simulate(trace, _placement([[0, 1]], gpus_per_node=2), Strategy.COHERENT)


def test_unknown_strategy_name():
    with pytest.raises(InputError, match="unknown strategy 'three_a2a'"):
        Strategy.parse("three_a2a")
