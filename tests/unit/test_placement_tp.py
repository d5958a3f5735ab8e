"""Tensor-parallel attention's traffic (placement/simulate_tp.py), the n-gram-only predictor and the TP cost model
(placement/cost_model_tp.py) on traces small enough to count by hand."""

from __future__ import annotations

import numpy as np
import pytest

from placement import ClusterShape, InputError, Placement, RoutingTrace
from placement.cost_model_tp import tp_step_time
from placement.hardware import HardwareProfile, LinkProfile
from placement.predictor import PredictorOptions, SpeculativePredictor
from placement.simulate_tp import compare_tp, simulate_tp

# 2 GPUs on one node, 4 experts: experts 0, 1 on GPU 0, experts 2, 3 on GPU 1 (both layers).
TWO = Placement(np.array([[0, 0, 1, 1], [0, 0, 1, 1]]), ClusterShape(gpus_per_node=2))
ONE = Placement(np.array([[0, 0, 1, 1]]), ClusterShape(gpus_per_node=2))   # the same, one layer
HW = HardwareProfile(name="toy", intra_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e9),
                     inter_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e8))


def _trace(experts_TLK, ids=None, E=4):
    e = np.array(experts_TLK, dtype=np.int16)
    return RoutingTrace(e, np.ones(e.shape, np.float32), E, None if ids is None else np.array(ids, np.int32))


# top-1, 5 tokens, 2 MoE layers: layer-0 experts 0 1 2 3 0 (ranks 0 0 1 1 0), layer-1 1 2 3 0 0 (ranks 0 1 1 0 0)
TOP1 = _trace([[[0], [1]], [[1], [2]], [[2], [3]], [[3], [0]], [[0], [0]]])


def test_tp_two_a2a_top1_by_hand():
    r = simulate_tp(TOP1, TWO, strategy="tp_two_a2a", tokens_per_step=5, hidden_size=10)
    assert r.chunk_rank_TL[:, 0].tolist() == [0, 0, 0, 1, 1]        # C = 3: rows 0-2 on rank 0, 3-4 on rank 1
    assert (r.chunk_rank_TL[:, 1] == r.chunk_rank_TL[:, 0]).all()
    # layer 0: tokens 2 (0 -> 1) and 4 (1 -> 0) move; layer 1: tokens 1, 2 (0 -> 1), 3, 4 (1 -> 0)
    assert r.transfers_L["dispatch"].tolist() == [2, 4]
    assert r.transfers_L["combine"].tolist() == [2, 4]
    assert r.dispatch_flows_LGG[1].tolist() == [[0, 2], [2, 0]]
    assert r.transfers_L["rs"].tolist() == [5, 5]                   # (G - 1) x 5 real rows
    assert r.transfers_L["ag"].tolist() == [5, 0]                   # none after the last MoE layer
    assert r.wire_rows_L["rs"].tolist() == [6, 6]                   # (G - 1) x G x C
    assert r.wire_rows_L["ag"].tolist() == [6, 0]
    assert r.padding_rows_L.tolist() == [1, 1]
    assert r.local_activations_L.tolist() == [3, 1]
    assert r.lar == pytest.approx(0.4)
    # bytes: rs in float32 partials (10 x 4 B), the rest bf16 (10 x 2 B)
    assert [int(r.bytes_L(p).sum()) for p in ("rs", "dispatch", "combine", "ag")] == [400, 120, 120, 100]
    assert r.total_bytes() == 740 and r.total_bytes(wire=True) == 480 + 120 + 120 + 120
    s = r.summary()
    assert s["dispatch_per_token_layer"] == pytest.approx(0.6) and s["ag_per_token_layer"] == pytest.approx(0.5)
    assert s["bytes_per_token_layer"] == pytest.approx(74.0)
    assert s["cross_node_per_token_layer"] == 0.0 and s["accuracy_L"] is None


def test_top2_dedup_and_steps():
    # one layer, top-2: ranks {0}, {0,1}, {1}, {0,1}, {1,0}; chunks 0 0 0 1 1
    t = _trace([[[0, 1]], [[0, 2]], [[2, 3]], [[1, 3]], [[3, 0]]])
    r = simulate_tp(t, ONE, strategy="tp_two_a2a", tokens_per_step=5, dtype_bytes=4)
    assert r.transfers_L["dispatch"].tolist() == [4]                # 0 + 1 + 1 (two experts, one rank) + 1 + 1
    assert r.local_activations_L.tolist() == [5] and r.lar == pytest.approx(0.5)
    assert r.transfers_L["ag"].tolist() == [0] and r.partial_bytes == 4 and r.total_bytes() is None
    # steps of 2 tokens: [0 1 | 2 3 | 4]: C = 1, 1, 1 -> chunks 0 1 | 0 1 | 0 (rank 1 pads the last step)
    r2 = simulate_tp(t, ONE, strategy="tp_two_a2a", tokens_per_step=2)
    assert r2.chunk_rank_TL[:, 0].tolist() == [0, 1, 0, 1, 0] and r2.steps == 3
    assert r2.padding_rows_L.tolist() == [1] and r2.wire_rows_L["rs"].tolist() == [6]
    # token 1 on rank 1 needs rank 0; token 2 on 0 needs 1; token 3 on 1 needs 0; token 4 on 0 needs 1
    assert r2.transfers_L["dispatch"].tolist() == [4] and r2.local_activations_L.tolist() == [5]


def test_cross_node_counts():
    two_nodes = Placement(TWO.expert_to_gpu_LE, ClusterShape(nodes=2, gpus_per_node=1))
    r = simulate_tp(TOP1, two_nodes, strategy="tp_two_a2a", tokens_per_step=5)
    assert r.cross_node_L["rs"].tolist() == [5, 5] and r.cross_node_L["ag"].tolist() == [5, 0]
    assert r.cross_node_L["dispatch"].tolist() == [2, 4]


# ids decide the route: id 10 -> ranks (0, 1), 11 -> (1, 0), 12 -> (0, 1), 13 -> (1, 0); two steps of 4
PERFECT = _trace([[[0], [2]], [[2], [0]], [[1], [3]], [[3], [1]]] * 2, ids=[10, 11, 12, 13] * 2)


def test_perfect_predictor_top1_needs_no_dispatch():
    pred = SpeculativePredictor.build(PERFECT, TWO, PredictorOptions(min_support=2))
    r = simulate_tp(PERFECT, TWO, strategy="tp_speculative", predictor=pred, tokens_per_step=4, hidden_size=8)
    assert r.chunk_rank_TL[:4].tolist() == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert r.transfers_L["dispatch"].tolist() == [0, 0] and r.transfers_L["combine"].tolist() == [0, 0]
    assert r.lar == 1.0
    assert r.accuracy_L().tolist() == [1.0, 1.0] and r.landed_fraction_L().tolist() == [1.0, 1.0]
    assert r.padding_rows_L.tolist() == [0, 0]
    base = simulate_tp(PERFECT, TWO, strategy="tp_two_a2a", tokens_per_step=4, hidden_size=8)
    assert base.transfers_L["dispatch"].tolist() == [4, 4]          # 2 per step-layer: chunks 0 0 1 1
    cmp = compare_tp(PERFECT, TWO, predictor=pred, tokens_per_step=4, hidden_size=8)
    rows = {row["strategy"]: row for row in cmp.rows()}
    assert rows["tp_speculative"]["dispatch_vs_tp_two_a2a"] == 0.0
    # DP two_a2a: home = row % 2 = ranks 0 1 0 1: layer 0 all local, layer 1 all remote
    assert rows["two_a2a"]["dispatch_per_token_layer"] == pytest.approx(0.5)
    assert rows["two_a2a"]["lar"] == pytest.approx(0.5) and rows["two_a2a"]["rs_per_token_layer"] == 0.0


def test_ngram_only_predictor_without_ids_and_overflow(tmp_path):
    with pytest.raises(Exception, match="no vocabulary ids"):
        SpeculativePredictor.build(TOP1, TWO)                      # still refused unless asked
    pred = SpeculativePredictor.build(TOP1, TWO, PredictorOptions(min_support=1), ngram_only=True)
    assert pred.ngram_only and pred.vocab_V.shape == (0,) and pred.token_rank_LV.shape == (2, 0)
    # layer 1 given layer-0 top-1 rank: context 0 (tokens 0, 1, 4) -> ranks 0 1 0: 0 (2/3); context 1 -> 1 0: 0
    assert pred.ngram_rank_LX[1].tolist() == [0, 0]
    assert pred.ngram_conf_LX[1] == pytest.approx([2 / 3, 1 / 2])
    rank, confident = pred.predict_start_ranks(np.array([3, 4]))
    assert rank.tolist() == [-1, -1] and not confident.any()
    rank_TL, conf_TL = pred.predict_ranks(None, np.array([[0, 0], [1, 1]]))
    assert rank_TL.tolist() == [[-1, 0], [-1, 0]] and conf_TL.tolist() == [[False, True], [False, True]]
    assert pred.predict_home_rank([1, 2], default=1) == 1
    path = tmp_path / "p.npz"
    pred.save(path)
    assert SpeculativePredictor.load(path).ngram_rank_LX.tolist() == pred.ngram_rank_LX.tolist()
    assert pred.accuracy(TOP1, TWO)["accuracy_L"] == pytest.approx([0.0, 0.6])
    # every token predicted on rank 0 at layer 1 but C = 3: tokens 3, 4 overflow to rank 1
    r = simulate_tp(TOP1, TWO, strategy="tp_speculative", predictor=pred, tokens_per_step=5)
    assert r.chunk_rank_TL[:, 1].tolist() == [0, 0, 0, 1, 1]
    assert r.predicted_L.tolist() == [0, 5] and r.hits_L.tolist() == [0, 3] and r.landed_L.tolist() == [0, 3]
    assert r.chunk_rank_TL[:, 0].tolist() == [0, 0, 0, 1, 1]       # no prediction: the first rank with room
    # capacity factor 2: a rank may take min(5, ceil(10 / 2)) = 5 predicted tokens. Layer 0 (no prediction):
    # C stays ceil(5 / 2) = 3, padding 1; layer 1: all five land on rank 0, so C = 5 there, padding 5
    r2 = simulate_tp(TOP1, TWO, strategy="tp_speculative", predictor=pred, tokens_per_step=5, capacity_factor=2.0)
    assert r2.chunk_rank_TL[:, 0].tolist() == [0, 0, 0, 1, 1] and (r2.chunk_rank_TL[:, 1] == 0).all()
    assert r2.landed_L.tolist() == [0, 5]
    assert r2.padding_rows_L.tolist() == [1, 5] and r2.wire_rows_L["rs"].tolist() == [6, 10]
    assert r2.transfers_L["dispatch"].tolist() == [2, 2] and r2.lar == pytest.approx(0.6)


def test_replicas_use_the_copy_on_the_chunk_rank():
    copies = np.zeros((1, 4, 2), dtype=bool)
    copies[0, [0, 1, 2], 0] = True                                 # GPU 0: experts 0 1 2
    copies[0, [0, 2, 3], 1] = True                                 # GPU 1: experts 0 2 3
    rep = Placement.from_copies(copies, ClusterShape(gpus_per_node=2))
    t = _trace([[[0]], [[0]], [[3]], [[0]], [[1]]])
    r = simulate_tp(t, rep, strategy="tp_two_a2a", tokens_per_step=5)
    # chunks 0 0 0 1 1: token 3 (expert 0) uses GPU 1's copy; token 2 -> 1 and token 4 -> 0 move
    assert r.transfers_L["dispatch"].tolist() == [2] and r.local_activations_L.tolist() == [3]
    assert r.dispatch_flows_LGG[0].tolist() == [[0, 1], [1, 0]]


def test_refusals():
    with pytest.raises(InputError, match="tp strategy"):
        simulate_tp(TOP1, TWO, strategy="two_a2a")
    with pytest.raises(InputError, match="needs a predictor"):
        simulate_tp(TOP1, TWO, strategy="tp_speculative")
    with pytest.raises(InputError, match="tokens_per_step"):
        simulate_tp(TOP1, TWO, strategy="tp_two_a2a", tokens_per_step=0)


def test_cost_model_by_hand():
    r = simulate_tp(TOP1, TWO, strategy="tp_two_a2a", tokens_per_step=5, hidden_size=10)
    c = tp_step_time(r, HW)
    # per layer: rs ring 3 rows x 40 B per edge, counts 1 int64 per peer, dispatch/combine rows of 20 B, ag 3 x 20 B
    us = {k: v * 1e6 for k, v in c.phase_s.items()}
    assert us["rs"] == pytest.approx(2 * (10 + 0.12))
    assert us["counts"] == pytest.approx(2 * (10 + 0.008))
    assert us["dispatch"] == pytest.approx((10 + 0.02) + (10 + 0.04))
    assert us["combine"] == pytest.approx((10 + 0.02) + (10 + 0.04))
    assert us["ag"] == pytest.approx(10 + 0.06)
    assert c.layer_s * 1e6 == pytest.approx(90.436 / 2)
    assert c.collectives_per_step == 9 and c.bottleneck == "intra_node"
    two_nodes = Placement(TWO.expert_to_gpu_LE, ClusterShape(nodes=2, gpus_per_node=1))
    c2 = tp_step_time(simulate_tp(TOP1, two_nodes, strategy="tp_two_a2a", tokens_per_step=5, hidden_size=10), HW)
    assert c2.phase_s["rs"] * 1e6 == pytest.approx(2 * (10 + 1.2)) and c2.bottleneck == "inter_node"


def test_balanced_chunks_by_hand():
    from placement.tp_shuffle import balanced_chunks
    pred = np.array([1, 1, 1, 0, -1, 1, 2])
    # cap = C = 3: rank 1 takes tokens 0-2, rank 0 token 3, rank 2 token 6; 4 (no prediction) and 5 (rank 1 full)
    # fill the free rows rank by rank: rank 0
    assert balanced_chunks(pred, 3).tolist() == [[3, 4, 5], [0, 1, 2], [6, -1, -1]]
    # factor 2: cap 5, so token 5 joins rank 1 and C = 4 (the fullest rank), not the cap
    assert balanced_chunks(pred, 3, capacity_factor=2).tolist() == [[3, 4, -1, -1], [0, 1, 2, 5], [6, -1, -1, -1]]
    assert balanced_chunks(np.array([3, 2, 1, 0]), 4, capacity_factor=2).tolist() == [[3], [2], [1], [0]]
