"""The traffic simulator against values computed by hand from the traffic model (simulate.py docstring)."""

from __future__ import annotations

import numpy as np
import pytest

from placement import ClusterShape, InputError, Placement, PlacementError, RoutingTrace, TraceError
from placement.simulate import SimOptions, Strategy, simulate
from placement.transport import Transport


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


# ---- transports (placement/transport.py) ------------------------------------------------------------------

def _flow_pairs(report, phase):
    """{(layer, source, destination): transfers} of one phase."""
    return {(int(l), int(s), int(d)): int(n) for (l, s, d), n in np.ndenumerate(report.flows_LGG[phase]) if n}


def test_node_aware_by_hand_relays_once_per_node():
    # 2 nodes x 2 GPUs, expert e on GPU e; one token at home 0 whose two experts live on node 1.
    placement = _placement([[0, 1, 2, 3]], nodes=2, gpus_per_node=2)
    trace = _trace([[[3, 2]]], E=4)
    a2a = simulate(trace, placement, Strategy.TWO_A2A)
    na = simulate(trace, placement, Strategy.TWO_A2A, transport=Transport.NODE_AWARE)
    assert a2a.transport == "a2a" and na.transport == "node_aware"
    assert (_flow_pairs(a2a, "dispatch"), _flow_pairs(a2a, "combine")) == \
        ({(0, 0, 2): 1, (0, 0, 3): 1}, {(0, 2, 0): 1, (0, 3, 0): 1})
    assert {p: _flow_pairs(na, p) for p in na.phases} == {
        "dispatch": {(0, 0, 2): 1},              # relay_1 = pick_1(0) = 2 (the anchor 0 is not on node 1)
        "dispatch_intra": {(0, 2, 3): 1},
        "combine_intra": {(0, 3, 2): 1},         # t_1 = pick_1(0) = 2
        "combine": {(0, 2, 0): 1}}
    assert (na.transfers, a2a.transfers) == (4, 4)
    assert (na.cross_node_transfers, a2a.cross_node_transfers) == (2, 4)
    assert (na.a2a_calls_per_layer, na.counts_exchanges_per_layer) == (4, 1)
    # coherent: anchor = rank of the top-1 expert (3), which is in R_1, so it is the relay and no combine crosses
    coh = simulate(trace, placement, Strategy.COHERENT, transport=Transport.NODE_AWARE)
    assert {p: _flow_pairs(coh, p) for p in coh.phases} == {
        "dispatch": {(0, 0, 3): 1}, "dispatch_intra": {(0, 3, 2): 1}, "combine_intra": {(0, 2, 3): 1},
        "combine": {}}
    assert coh.cross_node_transfers == 1
    assert simulate(trace, placement, Strategy.COHERENT).cross_node_transfers == 2


def test_fixed_counts_equal_a2a_without_counts_exchange():
    placement = _placement([[0, 1, 2, 3]], nodes=2, gpus_per_node=2)
    a2a = simulate(_trace(CROSS, E=4), placement, Strategy.TWO_A2A)
    fixed = simulate(_trace(CROSS, E=4), placement, Strategy.TWO_A2A, transport=Transport.FIXED)
    assert all((a2a.flows_LGG[p] == fixed.flows_LGG[p]).all() for p in ("dispatch", "combine"))
    assert (fixed.a2a_calls_per_layer, fixed.counts_exchanges_per_layer) == (2, 0)
    assert fixed.phases == ("dispatch", "combine")


def test_node_aware_on_one_node_is_refused():
    with pytest.raises(InputError, match="node_aware needs at least 2 nodes: the placement's cluster has 1 node"):
        simulate(_trace(TOP2, E=4), _placement(CONTIGUOUS_4x2, gpus_per_node=2), Strategy.TWO_A2A,
                 transport=Transport.NODE_AWARE)


def test_kv_copies_cross_nodes_once_per_node_with_node_aware():
    placement = _placement([[0, 1, 2, 3, 4, 5, 6, 7]], nodes=2, gpus_per_node=4)
    trace = _trace([[[e]] for e in range(8)], E=8)
    opts = SimOptions(attention_layers=3)
    a2a = simulate(trace, placement, Strategy.COHERENT, options=opts)
    na = simulate(trace, placement, Strategy.COHERENT, options=opts, transport=Transport.NODE_AWARE)
    assert a2a.kv_entry_copies == na.kv_entry_copies == 8 * 3 * 7
    assert a2a.kv_cross_node_copies == 8 * 3 * 4          # to the 4 ranks of the other node
    assert na.kv_cross_node_copies == 8 * 3 * 1           # once to the other node, forwarded inside it
    assert simulate(trace, placement, Strategy.TWO_A2A).kv_cross_node_copies == 0


def _reference_positions(trace: RoutingTrace, ranks_TLK, G: int, coherent: bool):
    """Per-token Python loop: (c_TL, a_TL) for two_a2a and coherent (no prefill, top-1 anchors)."""
    T, L, _ = ranks_TLK.shape
    seq = list(range(T)) if trace.seq_ids_T is None else trace.seq_ids_T.tolist()
    pos = [0] * T if trace.positions_T is None else trace.positions_T.tolist()
    row_of = {(s, p): t for t, (s, p) in enumerate(zip(seq, pos))}
    c, a = np.zeros((T, L), np.int64), np.zeros((T, L), np.int64)
    for t in sorted(range(T), key=lambda t: (seq[t], pos[t])):   # previous positions first
        home = seq[t] % G
        if not coherent:
            c[t], a[t] = home, home
            continue
        prev = row_of.get((seq[t], pos[t] - 1)) if pos[t] > 0 else None
        where = home if prev is None else int(a[prev, L - 1])
        for l in range(L):
            c[t, l], a[t, l] = where, ranks_TLK[t, l, 0]
            where = int(ranks_TLK[t, l, 0])
    return c, a


def _reference_flows(ranks_TLK, c_TL, a_TL, gpn: int, G: int, transport: Transport):
    """The traffic model of placement/transport.py, one token-layer at a time with Python sets:
    ({phase: [L, G, G]}, [per token-layer (cross-node transfers, other nodes needed by dispatch + combine)])."""
    T, L, _ = ranks_TLK.shape
    phases = ("dispatch", "dispatch_intra", "combine_intra", "combine")
    flows = {p: np.zeros((L, G, G), np.int64) for p in phases}
    per_token = []
    node = lambda r: r // gpn  # noqa: E731
    for t in range(T):
        for l in range(L):
            R, c, a = set(ranks_TLK[t, l].tolist()), int(c_TL[t, l]), int(a_TL[t, l])
            sends = []
            if transport is not Transport.NODE_AWARE:
                sends += [("dispatch", c, r) for r in R - {c}] + [("combine", r, a) for r in R - {a}]
            else:
                for n in {node(r) for r in R}:
                    Rn = {r for r in R if node(r) == n}
                    pick = lambda x: min(Rn, key=lambda r: (r - x) % gpn)  # noqa: E731 - next local index
                    relay = a if a in Rn else pick(c)
                    t_n = a if n == node(a) else pick(a)
                    if n == node(c):
                        sends += [("dispatch", c, r) for r in Rn - {c}]
                    else:
                        sends += [("dispatch", c, relay)] + [("dispatch_intra", relay, r) for r in Rn - {relay}]
                    sends += [("combine_intra", r, t_n) for r in Rn - {t_n}]
                    if n != node(a):
                        sends.append(("combine", pick(a), a))
            for phase, s, d in sends:
                flows[phase][l, s, d] += 1
            needed = len({node(r) for r in R} - {node(c)}) + len({node(r) for r in R} - {node(a)})
            per_token.append((sum(node(s) != node(d) for _, s, d in sends), needed))
    return flows, per_token


LAYOUTS = [(1, 4), (2, 2), (2, 4), (4, 2), (3, 1)]


@pytest.mark.parametrize("nodes,gpn", LAYOUTS)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_vectorised_counts_equal_a_per_token_reference(nodes, gpn, K):
    from placement.synthetic import SyntheticSpec, synthetic_trace
    G = nodes * gpn
    E = 2 * G if 2 * G >= K else 4 * G
    trace = synthetic_trace(SyntheticSpec(num_tokens=60, num_layers=3, num_experts=E, top_k=K, num_clusters=G,
                                          seq_len=5, seed=nodes * 10 + K))
    rng = np.random.default_rng(K)
    placement = Placement(np.stack([rng.permutation(np.arange(E) % G) for _ in range(3)]),
                          ClusterShape(nodes=nodes, gpus_per_node=gpn))
    ranks_TLK = placement.expert_to_gpu_LE[np.arange(3)[None, :, None], trace.experts_TLK.astype(np.int64)]
    transports = [t for t in Transport if nodes > 1 or t is not Transport.NODE_AWARE]
    for strategy in (Strategy.TWO_A2A, Strategy.COHERENT):
        c_TL, a_TL = _reference_positions(trace, ranks_TLK, G, strategy.coherent)
        for transport in transports:
            r = simulate(trace, placement, strategy, transport=transport)
            flows, per_token = _reference_flows(ranks_TLK, c_TL, a_TL, gpn, G, transport)
            for phase in r.phases:
                assert (r.flows_LGG[phase] == flows[phase]).all(), (strategy, transport, phase)
            assert r.transfers == sum(int(f.sum()) for f in flows.values())
            assert r.cross_node_transfers == sum(x for x, _ in per_token)
            if transport is Transport.NODE_AWARE:
                assert all(x <= n for x, n in per_token)   # at most once per other node, each way
                assert r.cross_node_transfers <= simulate(trace, placement, strategy).cross_node_transfers


@pytest.mark.parametrize("nodes,gpn", [(2, 2), (2, 4), (4, 2)])
def test_node_aware_keeps_totals_for_every_strategy(nodes, gpn):
    from placement.predictor import PredictorOptions, SpeculativePredictor
    from placement.synthetic import SyntheticSpec, synthetic_trace
    G = nodes * gpn
    trace = synthetic_trace(SyntheticSpec(num_tokens=400, num_layers=4, num_experts=2 * G, top_k=3,
                                          num_clusters=G, vocab_size=50, seq_len=8, seed=G))
    placement = Placement(np.tile(np.arange(2 * G) % G, (4, 1)), ClusterShape(nodes=nodes, gpus_per_node=gpn))
    predictor = SpeculativePredictor.build(trace, placement, PredictorOptions())
    prefill_T = trace.positions_T < 2
    for strategy in Strategy:
        a2a, na = (simulate(trace, placement, strategy, predictor=predictor, prefill_T=prefill_T, transport=t)
                   for t in (Transport.A2A, Transport.NODE_AWARE))
        assert (na.dispatch_L == a2a.dispatch_L).all() and (na.combine_L == a2a.combine_L).all(), strategy
        assert na.cross_node_transfers <= a2a.cross_node_transfers, strategy
        assert (na.load_LG == a2a.load_LG).all() and (na.held_LG == a2a.held_LG).all()
        assert sum(int(na.phase_transfers_L(p).sum()) for p in na.phases) == na.transfers
