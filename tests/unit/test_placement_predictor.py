"""The speculative predictor and the speculative strategies, on traces small enough to count by hand."""

from __future__ import annotations

import numpy as np
import pytest

from placement import ClusterShape, InputError, Placement, PlacementError, RoutingTrace, TraceError
from placement.predictor import PredictorOptions, SpeculativePredictor
from placement.simulate import Strategy, simulate
from placement.synthetic import SyntheticSpec, synthetic_trace

PLACEMENT = Placement(np.array([[0, 1], [0, 1]]), ClusterShape(gpus_per_node=2))  # expert e on GPU e


def _trace(rows, ids, seq=None, pos=None):
    experts = np.array(rows, dtype=np.int16)[:, :, None]
    weights = np.ones_like(experts, dtype=np.float32)
    arr = lambda a: None if a is None else np.array(a, dtype=np.int32)  # noqa: E731
    return RoutingTrace(experts, weights, 2, arr(ids), arr(seq), arr(pos))


# id 5 three times (layer-0 ranks 1, 1, 0; layer-1 ranks 1, 0, 1), id 7 once.
BUILD = _trace([[1, 1], [1, 0], [0, 1], [0, 0]], [5, 5, 5, 7])
# one sequence (home 0): ids 5, 7, 5
EVAL = _trace([[1, 0], [0, 1], [1, 1]], [5, 7, 5], seq=[0, 0, 0], pos=[0, 1, 2])


@pytest.fixture()
def predictor():
    return SpeculativePredictor.build(BUILD, PLACEMENT, PredictorOptions(min_confidence=0.5, min_support=2))


def test_tables_by_hand(predictor):
    assert predictor.vocab_V.tolist() == [5, 7]
    assert predictor.token_rank_LV.tolist() == [[1, 0], [1, 0]]
    assert predictor.token_conf_LV[:, 0] == pytest.approx([2 / 3, 2 / 3])
    assert predictor.support_V.tolist() == [3, 1]
    # layer 1 given the top-1 rank at layer 0: context 1 -> {1, 0} (tie -> 0), context 0 -> {1, 0}
    assert predictor.ngram_rank_LX[1].tolist() == [0, 0]
    assert predictor.ngram_conf_LX[1].tolist() == [0.5, 0.5]


def test_start_ranks_and_home_rank(predictor):
    rank, confident = predictor.predict_start_ranks(np.array([5, 7, 9]))
    assert rank.tolist() == [1, 0, -1]
    assert confident.tolist() == [True, False, False]      # id 7 has support 1 < 2; id 9 was never seen
    assert predictor.predict_home_rank([5, 5, 7]) == 1
    assert predictor.predict_home_rank([7, 9], default=1) == 1


def test_held_out_accuracy_by_hand(predictor):
    acc = predictor.accuracy(EVAL, PLACEMENT)
    # every token gets the best guess of either table; id 7's guess (rank 0) hits although not confident
    assert acc["accuracy_L"] == pytest.approx([1.0, 1 / 3])
    assert acc["confident_L"] == pytest.approx([2 / 3, 1.0])
    assert acc["confident_accuracy_L"] == pytest.approx([1.0, 1 / 3])


def test_speculative_strategies_by_hand(predictor):
    coherent = simulate(EVAL, PLACEMENT, Strategy.COHERENT)
    assert coherent.dispatch_L.tolist() == [1, 2]
    spec = simulate(EVAL, PLACEMENT, Strategy.SPECULATIVE, predictor=predictor)
    assert spec.dispatch_L.tolist() == [0, 2]                # ids 5 start on rank 1; id 7 as coherent
    assert spec.combine_L.tolist() == [0, 0]
    assert simulate(EVAL, PLACEMENT, Strategy.TWO_A2A).transfers == 8
    # the sequence's prompt (its first token, id 5) is predicted to use rank 1 -> home 1
    assert simulate(EVAL, PLACEMENT, Strategy.SPECULATIVE_TWO_A2A, predictor=predictor).transfers == 4


def test_save_load_roundtrip(predictor, tmp_path):
    path = tmp_path / "p.predictor.npz"
    predictor.save(path)
    loaded = SpeculativePredictor.load(path)
    assert loaded.token_rank_LV.tolist() == predictor.token_rank_LV.tolist()
    assert loaded.placement_sha256 == predictor.placement_sha256
    assert loaded.options == predictor.options
    assert simulate(EVAL, PLACEMENT, Strategy.SPECULATIVE, predictor=loaded).dispatch_L.tolist() == [0, 2]


def test_refusals(predictor, tmp_path):
    no_ids = RoutingTrace(BUILD.experts_TLK, BUILD.weights_TLK, 2)
    with pytest.raises(TraceError, match="no vocabulary ids"):
        SpeculativePredictor.build(no_ids, PLACEMENT)
    other = Placement(np.array([[1, 0], [0, 1]]), ClusterShape(gpus_per_node=2))
    with pytest.raises(PlacementError, match="built for a different placement"):
        simulate(EVAL, other, Strategy.SPECULATIVE, predictor=predictor)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable predictor"):
        SpeculativePredictor.load(bad)
    with pytest.raises(InputError, match="predictor order must be 1 or 2"):
        PredictorOptions(order=3)


def test_ids_that_decide_routing_are_predicted_well_on_held_out_synthetic_data():
    spec = SyntheticSpec(num_tokens=6000, num_layers=4, num_experts=16, top_k=2, num_clusters=4, vocab_size=200,
                         id_fidelity=1.0, noise=0.05, stickiness=0.9, seed=3)
    fit, held_out = synthetic_trace(spec).split(0.5)
    placement = Placement(np.arange(16)[None, :].repeat(4, 0) % 4, ClusterShape(gpus_per_node=4))
    acc = SpeculativePredictor.build(fit, placement, PredictorOptions(order=2)).accuracy(held_out, placement)
    # control: the same tables built after shuffling the ids among the tokens (ids carry no information)
    shuffled = RoutingTrace(fit.experts_TLK, fit.weights_TLK, 16, np.random.default_rng(0).permutation(fit.token_ids_T))
    control = SpeculativePredictor.build(shuffled, placement, PredictorOptions(order=2)).accuracy(held_out, placement)
    assert acc["accuracy_L"][0] > 0.85
    assert acc["accuracy_L"][0] > control["accuracy_L"][0] + 0.3


# ---- replicated experts (placement schema v2) -------------------------------------------------------------------
def _replicated(pairs):
    """3 experts on 3 GPUs (one node), 2 copies each: ``pairs[e]`` = the GPUs holding expert e (both layers)."""
    copies = np.zeros((2, 3, 3), dtype=bool)
    for e, gpus in enumerate(pairs):
        copies[:, e, gpus] = True
    return Placement.from_copies(copies, ClusterShape(gpus_per_node=3))


REPLICATED = _replicated([[0, 1], [1, 2], [2, 0]])     # primaries (lowest GPU) [0, 1, 0]


def _trace3(rows, ids, seq=None, pos=None):
    experts = np.array(rows, dtype=np.int16)[:, :, None]
    arr = lambda a: None if a is None else np.array(a, dtype=np.int32)  # noqa: E731
    return RoutingTrace(experts, np.ones_like(experts, dtype=np.float32), 3, arr(ids), arr(seq), arr(pos))


# id 6 four times: layer 0 experts 0, 1, 0, 1 (GPU 1 holds both), layer 1 experts 1, 1, 2, 1 (GPU 2 holds both)
BUILD3 = _trace3([[0, 1], [1, 1], [0, 2], [1, 1]], [6, 6, 6, 6])
# one sequence (home 0), ids 6, 6: token 0 experts 1 then 2, token 1 experts 0 then 1
EVAL3 = _trace3([[1, 2], [0, 1]], [6, 6], seq=[0, 0], pos=[0, 1])


@pytest.fixture()
def replicated_predictor():
    return SpeculativePredictor.build(BUILD3, REPLICATED, PredictorOptions(min_confidence=0.5, min_support=2))


def test_replicated_tables_count_every_copy(replicated_predictor):
    p = replicated_predictor
    # with the primaries only, layer 0 would be a tie (ranks 0 and 1, confidence 1/2): every copy counts
    assert p.token_rank_LV.tolist() == [[1], [2]]
    assert p.token_conf_LV.tolist() == [[1.0], [1.0]]
    # n-gram contexts are the primary copy's rank of e_1: 0 (experts 0) -> {1,2}, {2,0}; 1 -> {1,2}, {1,2}
    assert p.ngram_rank_LX[1].tolist() == [2, 1, 0]
    assert p.placement_sha256.startswith("copies:")
    assert p.accuracy(EVAL3, REPLICATED)["accuracy_L"] == pytest.approx([1.0, 1.0])


def test_replicated_digest_covers_the_copies(replicated_predictor, tmp_path):
    from placement.anchor import expert_table_digest
    from placement.predictor import placement_digest
    assert placement_digest(PLACEMENT) == expert_table_digest(PLACEMENT.expert_to_gpu_LE)   # one copy: unchanged
    replicated_predictor.check_placement(REPLICATED)
    path = tmp_path / "r.predictor.npz"
    replicated_predictor.save(path)
    SpeculativePredictor.load(path).check_placement(Placement.from_dict(REPLICATED.to_dict()))
    same_primaries = _replicated([[0, 2], [1, 2], [0, 1]])
    assert same_primaries.expert_to_gpu_LE.tolist() == REPLICATED.expert_to_gpu_LE.tolist()
    with pytest.raises(PlacementError, match="built for a different placement"):
        replicated_predictor.check_placement(same_primaries)
    with pytest.raises(PlacementError, match="built for a different placement"):
        simulate(EVAL3, same_primaries, Strategy.SPECULATIVE, predictor=replicated_predictor)


def test_speculative_strategies_with_replicas_by_hand(replicated_predictor):
    p = replicated_predictor
    coherent = simulate(EVAL3, REPLICATED, Strategy.COHERENT)
    # token 0 from home 0: expert 1 -> copy 1, expert 2 -> copy 2; token 1 from 2: expert 0 -> 0, expert 1 -> 1
    assert coherent.dispatch_L.tolist() == [2, 2]
    spec = simulate(EVAL3, REPLICATED, Strategy.SPECULATIVE, predictor=p)
    # both tokens start on the predicted rank 1: the copies of experts 1 and 0 there, expert 2 -> copy 2, 1 local
    assert spec.dispatch_L.tolist() == [0, 1] and spec.combine_L.tolist() == [0, 0]
    assert spec.local_activations_L.tolist() == [2, 1]
    assert simulate(EVAL3, REPLICATED, Strategy.TWO_A2A).transfers == 4
    # the prompt (token 0, id 6) votes ranks 1 and 2 over the layers: home 1 (ties to the lowest)
    two = simulate(EVAL3, REPLICATED, Strategy.SPECULATIVE_TWO_A2A, predictor=p)
    assert two.transfers == 2
    assert simulate(EVAL3, REPLICATED, Strategy.TWO_A2A, home_rank_T=np.array([1, 1])).transfers == 2
    # a prefill token stays home whatever the prediction
    prefill = simulate(EVAL3, REPLICATED, Strategy.SPECULATIVE, predictor=p, prefill_T=np.array([True, False]))
    assert prefill.held_LG[0].tolist() == [1, 1, 0]


def test_the_engine_loads_a_predictor_for_a_replicated_placement(replicated_predictor, tmp_path):
    from epserve.engine.builder import load_predictor
    path = tmp_path / "r.predictor.npz"
    replicated_predictor.save(path)
    assert load_predictor(path, Strategy.SPECULATIVE, REPLICATED).placement_sha256 == \
        replicated_predictor.placement_sha256
    with pytest.raises(PlacementError, match="built for a different placement"):
        load_predictor(path, Strategy.SPECULATIVE_TWO_A2A, _replicated([[0, 2], [1, 2], [0, 1]]))
