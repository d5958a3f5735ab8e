"""The anchor rule (placement/anchor.py) and the simulator with an anchor table, against hand-computed values;
the runtime's torch twin against the numpy rule; files and their errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from comm.routes import table_anchor_N
from placement import ClusterShape, Placement, PlacementError, RoutingTrace
from placement.anchor import AnchorTable, choose_anchors, expert_table_digest, fit_anchor_table
from placement.simulate import Strategy, simulate

# 3 tokens, 2 layers, top-2, E = 4 on 2 GPUs: experts {0, 1} on GPU 0 and {2, 3} on GPU 1; homes 0, 1, 0.
TOP2 = [[[0, 2], [1, 0]],
        [[3, 2], [0, 3]],
        [[2, 3], [2, 1]]]
CONTIGUOUS = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])


def _trace(experts, *, E=4, seq=None, pos=None) -> RoutingTrace:
    experts_TLK = np.array(experts, dtype=np.int16)
    weights_TLK = np.broadcast_to(np.float32([0.7, 0.3]), experts_TLK.shape).copy()
    arr = lambda a: None if a is None else np.array(a, dtype=np.int32)  # noqa: E731
    return RoutingTrace(experts_TLK, weights_TLK, E, None, arr(seq), arr(pos))


def _table(score_LEG, rows=CONTIGUOUS) -> AnchorTable:
    return AnchorTable(np.array(score_LEG, dtype=np.int32), expert_table_digest(rows))


# layer 0: expert 0 favours rank 1 (1 vs 5), expert 2 rank 0 (3 vs 0); layer 1: zeros (the top-1 rule)
HAND = [[[1, 5], [0, 0], [3, 0], [0, 0]], [[0, 0]] * 4]


def test_rule_by_hand_and_ties_go_to_the_top1_rank():
    ranks_NK = np.array([[0, 1], [1, 1], [1, 0]])
    experts_NK = np.array([[0, 2], [3, 2], [2, 0]])
    score_EG = np.array(HAND[0])
    # token 0: score(0) = 1 + 3 = 4, score(1) = 5 + 0 = 5 -> rank 1 (not its top-1 rank 0)
    # token 1: one rank; token 2: experts 2, 0 -> the same scores 4 vs 5 -> rank 1 (its top-1 rank)
    assert choose_anchors(score_EG, experts_NK, ranks_NK).tolist() == [1, 1, 1]
    # all scores equal: the top-1 expert's rank
    assert choose_anchors(np.full((4, 2), 7), experts_NK, ranks_NK).tolist() == [0, 1, 1]
    # equal best scores on two ranks: the one of the earlier slot
    tie_EG = np.array([[2, 2], [0, 0], [0, 0], [0, 0]])
    assert choose_anchors(tie_EG, np.array([[2, 0]]), np.array([[1, 0]])).tolist() == [1]


def test_torch_twin_equals_the_numpy_rule():
    g = np.random.default_rng(3)
    E, G, K, N = 16, 4, 4, 500
    score_EG = g.integers(0, 4, size=(E, G))       # small range: many ties
    experts_NK = np.stack([g.permutation(E)[:K] for _ in range(N)])
    ranks_NK = g.permutation(np.arange(E) // (E // G))[experts_NK]
    want = choose_anchors(score_EG, experts_NK, ranks_NK)
    got = table_anchor_N(torch.as_tensor(score_EG), torch.as_tensor(experts_NK), torch.as_tensor(ranks_NK))
    assert got.tolist() == want.tolist()
    assert (want != ranks_NK[:, 0]).sum() > 100    # the rule really departs from the top-1 rank


def test_simulator_uses_the_table_by_hand():
    placement = Placement(CONTIGUOUS, ClusterShape(gpus_per_node=2)).with_anchors(_table(HAND))
    r = simulate(_trace(TOP2), placement, Strategy.COHERENT)
    # layer 0 (start at homes 0, 1, 0): anchors 1, 1, 1 -> dispatch 1 + 0 + 1, combine 1 + 0 + 0
    # layer 1 (start at 1, 1, 1; zero scores: top-1 ranks 0, 0, 1): R = {0}, {0, 1}, {1, 0}
    #   dispatch 1 + 1 + 1, combine 0 + 1 + 1
    assert r.dispatch_L.tolist() == [2, 3] and r.combine_L.tolist() == [1, 2]
    assert r.local_activations_L.tolist() == [3, 2]
    # the same without the table (anchors r_1 = 0, 1, 1 at layer 0) and under two_a2a (the table is unused)
    plain = Placement(CONTIGUOUS, ClusterShape(gpus_per_node=2))
    assert simulate(_trace(TOP2), plain, Strategy.COHERENT).dispatch_L.tolist() == [2, 2]
    assert simulate(_trace(TOP2), placement, Strategy.TWO_A2A).to_dict()["transfers"] == \
        simulate(_trace(TOP2), plain, Strategy.TWO_A2A).to_dict()["transfers"] == 8


def test_last_layer_anchor_decides_where_the_next_decode_token_starts():
    # one layer; one sequence of two decode tokens; home rank 0. Token 0: experts 0 (rank 0), 2 (rank 1);
    # token 1: experts 2, 3, both on rank 1. The table sends token 0's sum to rank 1, where token 1 starts.
    rows = CONTIGUOUS[:1]
    trace = _trace([[[0, 2]], [[2, 3]]], seq=[0, 0], pos=[0, 1])
    table = _table([[[0, 0], [0, 0], [0, 9], [0, 0]]], rows)
    placement = Placement(rows, ClusterShape(gpus_per_node=2))
    r = simulate(trace, placement.with_anchors(table), Strategy.COHERENT)
    assert (r.dispatch_L.tolist(), r.combine_L.tolist()) == ([1], [1])     # token 1 moves nothing
    r = simulate(trace, placement, Strategy.COHERENT)
    assert (r.dispatch_L.tolist(), r.combine_L.tolist()) == ([2], [1])     # token 1 starts on rank 0


def _nb(p, q, K=2):
    """round(1000 * (logit p - (K - 1) / K * logit q)): the fitted score (anchor.py docstring)."""
    logit = lambda x: math.log(x / (1 - x))  # noqa: E731
    return round(1000 * (logit(p) - (K - 1) / K * logit(q)))


def test_fit_by_hand():
    table = fit_anchor_table(_trace(TOP2), CONTIGUOUS, 2, balance=0)
    # next-layer ranks R_1: token 0 {0}, token 1 {0, 1}, token 2 {0, 1}; layer-0 experts {0,2}, {3,2}, {2,3}
    # add-one smoothing: p = (hits + 1) / (seen + 2), q = (tokens using g + 1) / (3 + 2) = (4/5, 3/5)
    q0, q1 = 4 / 5, 3 / 5
    assert table.score_LEG[0].tolist() == [[_nb(2 / 3, q0), _nb(1 / 3, q1)],    # expert 0: seen 1, hits (1, 0)
                                           [_nb(1 / 2, q0), _nb(1 / 2, q1)],    # expert 1: never seen
                                           [_nb(4 / 5, q0), _nb(3 / 5, q1)],    # expert 2: seen 3, hits (3, 2)
                                           [_nb(3 / 4, q0), _nb(3 / 4, q1)]]    # expert 3: seen 2, hits (2, 2)
    assert table.score_LEG[0].tolist() == [[0, -896], [-693, -203], [693, 203], [405, 896]]
    assert table.score_LEG[1].tolist() == [[0, 0]] * 4    # no sequences: nothing follows the last layer
    assert table.meta["chained_tokens"] == 0
    chained = fit_anchor_table(_trace([[[0, 2]], [[2, 3]]], seq=[0, 0], pos=[0, 1]), CONTIGUOUS[:1], 2, balance=0)
    # the last (only) layer predicts the next position's first layer: one pair, token 1 uses rank 1 only:
    # q = (1/3, 2/3); experts 0 and 2 seen once with hits (0, 1); experts 1 and 3 never seen
    seen, unseen = [_nb(1 / 3, 1 / 3), _nb(2 / 3, 2 / 3)], [_nb(1 / 2, 1 / 3), _nb(1 / 2, 2 / 3)]
    assert chained.score_LEG[0].tolist() == [seen, unseen, seen, unseen]


def test_the_load_term_spreads_anchored_tokens_by_per_rank_offsets():
    # 40 tokens, 4 experts on 2 ranks: every token has one expert on each rank, and the next layer always uses
    # rank 0, so affinity alone anchors every token on rank 0 (where all of them would then run attention)
    g = np.random.default_rng(0)
    first = g.integers(0, 2, size=40)
    layer0 = np.stack([first, 2 + g.integers(0, 2, size=40)], axis=1)
    layer1 = np.stack([np.zeros(40, int), np.ones(40, int)], axis=1)
    trace = _trace(np.stack([layer0, layer1], axis=1).tolist())
    ranks_NK = CONTIGUOUS[0][layer0]
    pure = fit_anchor_table(trace, CONTIGUOUS, 2, balance=0)
    fair = fit_anchor_table(trace, CONTIGUOUS, 2)
    load = lambda t: np.bincount(choose_anchors(t.score_LEG[0], layer0, ranks_NK), minlength=2)  # noqa: E731
    assert load(pure).tolist() == [40, 0]
    # a per-rank offset moves the tokens in order of their score gap: the best it can do is split at a gap
    gap_N = np.sort(pure.score_LEG[0][layer0].sum(axis=1) @ np.array([1, -1]))
    best = min(max(i, 40 - i) for i in range(41) if i in (0, 40) or gap_N[i - 1] != gap_N[i])
    assert load(fair).max() == best < 40 and fair.meta["balance"] > 0
    offset_EG = fair.score_LEG[0].astype(np.int64) - pure.score_LEG[0]
    assert (offset_EG == offset_EG[:1]).all()      # one integer offset per rank, the same for every expert


def test_placement_saves_and_loads_its_table(tmp_path):
    placement = Placement(CONTIGUOUS, ClusterShape(gpus_per_node=2), solver={"name": "x"}).with_anchors(_table(HAND))
    placement.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["solver"] == {"name": "x", "anchors": "p.anchors.npz"}
    loaded = Placement.load(tmp_path / "p.json")
    assert loaded.anchors.score_LEG.tolist() == HAND
    Placement(CONTIGUOUS, ClusterShape(gpus_per_node=2)).save(tmp_path / "q.json")
    assert Placement.load(tmp_path / "q.json").anchors is None


def test_table_errors_name_the_problem(tmp_path):
    placement = Placement(CONTIGUOUS, ClusterShape(gpus_per_node=2)).with_anchors(_table(HAND))
    placement.save(tmp_path / "p.json")
    (tmp_path / "p.anchors.npz").unlink()
    with pytest.raises(PlacementError, match="anchor table file not found: .*p.anchors.npz"):
        Placement.load(tmp_path / "p.json")
    other = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
    with pytest.raises(PlacementError, match="fitted for a different placement"):
        Placement(other, ClusterShape(gpus_per_node=2)).with_anchors(_table(HAND))
    with pytest.raises(PlacementError, match="anchor table is for 1 layers x 4 experts x 2 GPUs"):
        Placement(CONTIGUOUS, ClusterShape(gpus_per_node=2)).with_anchors(_table(HAND[:1]))
    with pytest.raises(PlacementError, match=r"must lie in \[-16777216, 16777216\]"):
        _table([[[-1, 1 << 25]] * 4] * 2)
    (tmp_path / "bad.anchors.npz").write_bytes(b"not a zip")
    with pytest.raises(PlacementError, match="not a readable anchor table"):
        AnchorTable.load(tmp_path / "bad.anchors.npz")
    np.savez(tmp_path / "noscore.npz", header=np.array(json.dumps({"format": "epserve-anchor-table"})))
    with pytest.raises(PlacementError, match="not a complete anchor table file .missing score."):
        AnchorTable.load(tmp_path / "noscore.npz")
    np.savez(tmp_path / "v2.npz", header=np.array(json.dumps({"format": "epserve-anchor-table", "version": 2})),
             score=np.zeros((1, 4, 2), dtype=np.int32))
    with pytest.raises(PlacementError, match="version 2 is not supported"):
        AnchorTable.load(tmp_path / "v2.npz")
    np.savez(tmp_path / "list.npz", header=np.array("[1, 2]"), score=np.zeros((1, 4, 2), dtype=np.int32))
    with pytest.raises(PlacementError, match="bad anchor table header .not a JSON object"):
        AnchorTable.load(tmp_path / "list.npz")


# ---- replicated experts (placement schema v2) --------------------------------------------------------------------
def _replicated(seed: int, L=2, E=4, G=4, P=2) -> Placement:
    """Experts e on GPU e (one each), plus one random extra copy per GPU."""
    g = np.random.default_rng(seed)
    copies = np.zeros((L, E, G), dtype=bool)
    for l in range(L):
        copies[l, np.arange(E), g.permutation(E)] = True
        for gpu in range(G):
            copies[l, g.choice(np.flatnonzero(~copies[l, :, gpu])), gpu] = True
    return Placement.from_copies(copies, ClusterShape(nodes=G // P, gpus_per_node=P))


def test_digest_covers_the_copies_and_a_table_is_refused_for_another_replicated_placement():
    one = Placement(CONTIGUOUS, ClusterShape(gpus_per_node=2))
    assert expert_table_digest(one.copies_LEG) == expert_table_digest(CONTIGUOUS)   # one copy: unchanged
    # 4 experts, 2 GPUs of 3 slots: GPU 0 holds {0, 1, 2}; GPU 1 holds {2, 3, 0} (a) or {2, 3, 1} (b), so the
    # primaries (lowest GPU) agree, the replicas differ
    cluster = ClusterShape(gpus_per_node=2)
    copies_a, copies_b = np.zeros((1, 4, 2), dtype=bool), np.zeros((1, 4, 2), dtype=bool)
    copies_a[0, [0, 1, 2], 0] = copies_b[0, [0, 1, 2], 0] = True
    copies_a[0, [2, 3, 0], 1] = copies_b[0, [2, 3, 1], 1] = True
    a, b = Placement.from_copies(copies_a, cluster), Placement.from_copies(copies_b, cluster)
    assert np.array_equal(a.expert_to_gpu_LE, b.expert_to_gpu_LE) and a.has_replicas and b.has_replicas
    da, db = expert_table_digest(a.copies_LEG), expert_table_digest(b.copies_LEG)
    assert da != db and da != expert_table_digest(a.expert_to_gpu_LE)
    table = AnchorTable(np.ones((1, 4, 2), dtype=np.int32), da)
    assert table.replicated
    table.check_fits(a.copies_LEG, 2)
    with pytest.raises(PlacementError, match="different placement"):
        table.check_fits(b.copies_LEG, 2)
    table.check_fits(a.copy_choice_LEG[:, :, 1], 2)   # the runtime's column: only the shape can be checked
    with pytest.raises(PlacementError, match="1 x 4 x 4"):
        table.check_fits(np.zeros((1, 4), dtype=np.int64), 4)
    assert a.with_anchors(table).anchors is table     # a replicated placement takes the table


def _coherent_reference(trace: RoutingTrace, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Per-token loop (no prefill, every token its own sequence unless chained in row order): dispatch and
    combine per layer under coherent with replicas and an anchor table."""
    T, L, K = trace.experts_TLK.shape
    choice, score = placement.copy_choice_LEG, placement.anchors.score_LEG
    G = placement.num_gpus
    seq = trace.seq_ids_T if trace.seq_ids_T is not None else np.arange(T)
    last = {}
    dispatch, combine = np.zeros(L, dtype=np.int64), np.zeros(L, dtype=np.int64)
    for t in range(T):   # rows of a sequence are in position order in these traces
        c = last.get(int(seq[t]), int(seq[t]) % G)
        for l in range(L):
            es = [int(e) for e in trace.experts_TLK[t, l]]
            rs = [int(choice[l, e, c]) for e in es]
            sc = [sum(int(score[l, e, r]) for e in es) for r in rs]
            a = rs[max(range(K), key=lambda k: (sc[k], -k))]
            dispatch[l] += len(set(rs) - {c})
            combine[l] += len(set(rs) - {a})
            c = a
        last[int(seq[t])] = c
    return dispatch, combine


def test_simulator_follows_the_table_over_the_chosen_copies():
    g = np.random.default_rng(3)
    placement = _replicated(1)
    T, L, E = 60, 2, 4
    experts = np.stack([np.stack([g.choice(E, 2, replace=False) for _ in range(L)]) for _ in range(T)])
    trace = RoutingTrace(experts.astype(np.int16), np.broadcast_to(np.float32([0.6, 0.4]), experts.shape).copy(),
                         E, None, (np.arange(T) % 5).astype(np.int32), (np.arange(T) // 5).astype(np.int32))
    score = g.integers(-50, 50, size=(L, E, 4)).astype(np.int32)
    anchored = placement.with_anchors(AnchorTable(score, expert_table_digest(placement.copies_LEG)))
    r = simulate(trace, anchored, Strategy.COHERENT)
    want_d, want_c = _coherent_reference(trace, anchored)
    assert (r.dispatch_L.tolist(), r.combine_L.tolist()) == (want_d.tolist(), want_c.tolist())
    top1 = simulate(trace, placement, Strategy.COHERENT)
    assert top1.dispatch_L.tolist() != r.dispatch_L.tolist()   # the table really moved tokens


def test_fit_on_copies_counts_any_copy_of_the_next_experts():
    # layer 1: every GPU holds every expert, so every token's next layer is "on" every rank: p = q = 4/5
    copies = np.zeros((2, 4, 2), dtype=bool)
    copies[0, [0, 1], 0] = copies[0, [2, 3], 1] = True
    copies[1] = True
    trace = _trace(TOP2)
    table = fit_anchor_table(trace, copies, 2, balance=0)
    assert table.replicated and table.placement_sha256 == expert_table_digest(copies)
    seen = {0: 1, 1: 0, 2: 3, 3: 2}   # tokens at layer 0 with each expert
    for e, n in seen.items():
        assert table.score_LEG[0, e].tolist() == [_nb((n + 1) / (n + 2), 4 / 5)] * 2
    # one copy per expert: the same table as fitted on the expert -> GPU table
    one = np.zeros((2, 4, 2), dtype=bool)
    np.put_along_axis(one, CONTIGUOUS[:, :, None], True, axis=2)
    a, b = fit_anchor_table(trace, one, 2), fit_anchor_table(trace, CONTIGUOUS, 2)
    assert np.array_equal(a.score_LEG, b.score_LEG) and a.placement_sha256 == b.placement_sha256
