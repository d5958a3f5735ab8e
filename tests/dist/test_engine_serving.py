"""The engine serving real requests over 2 gloo ranks (and 1), for every strategy: requests arriving while
others run give MoEModel.greedy_reference's tokens exactly, seeded sampling gives the same tokens at world
size 1 and 2, a cancelled request ends CANCELLED and every rank's KV is free afterwards, and the live stats
equal the runtime's counters and the recorded routing trace.

Rank-side code: tests/dist/_engine_cases.py. One spawned group runs every strategy (spawning costs seconds).
"""

from __future__ import annotations

import numpy as np
import pytest

from comm.counters import CollKind, CommCounters
from comm.spawn import spawn_ranks
from comm.strategy import Strategy
from epserve.model.config import ModelConfig
from epserve.model.loader import load_model
from placement.cluster import ClusterShape
from placement.placement import contiguous_placement
from tests.dist._engine_cases import (CANCEL_AFTER, CANCEL_ID, CANCEL_PROMPT, GREEDY, SAMPLED, EngineCase,
                                      run_engine_cases)
from tests.dist._runner_cases import build_predictor

# One spawned group serves every strategy: 10 s on a quiet machine, 30 s on the loaded one, hence slow.
pytestmark = pytest.mark.slow

STRATEGIES_2 = (Strategy.TWO_A2A, Strategy.COHERENT, Strategy.SPECULATIVE, Strategy.SPECULATIVE_TWO_A2A)


@pytest.fixture(scope="module")
def engine_ckpt(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


@pytest.fixture(scope="module")
def engine_runs(engine_ckpt, tmp_path_factory):
    """``G -> (cases, per-rank results)`` for G in (1, 2)."""
    work = tmp_path_factory.mktemp("engine")
    cfg = ModelConfig.from_dir(engine_ckpt)
    placement = contiguous_placement(cfg.num_moe_layers, cfg.num_experts, ClusterShape(gpus_per_node=2))
    predictor = build_predictor(engine_ckpt, placement, work / "predictor.npz")
    cases2 = [EngineCase(s.value, engine_ckpt, s, work / f"g2-{s.value}.npz", placement,
                         predictor if s.needs_predictor else None) for s in STRATEGIES_2]
    cases1 = [EngineCase("two_a2a", engine_ckpt, Strategy.TWO_A2A, work / "g1.npz")]
    return {1: (cases1, spawn_ranks(run_engine_cases, 1, (cases1,), timeout_s=120)),
            2: (cases2, spawn_ranks(run_engine_cases, 2, (cases2,), timeout_s=240))}


@pytest.fixture(scope="module")
def references(engine_ckpt):
    model, _ = load_model(engine_ckpt)
    eos = ModelConfig.from_dir(engine_ckpt).eos_token_ids
    refs = {rid: model.greedy_reference([list(p)], n, eos_token_ids=eos)[0] for rid, (p, n) in GREEDY.items()}
    refs[CANCEL_ID] = model.greedy_reference([list(CANCEL_PROMPT)], 20)[0]
    return refs, eos


def _all_cases(engine_runs):
    for G in (1, 2):
        cases, per_rank = engine_runs[G]
        for i, case in enumerate(cases):
            yield G, case, [per_rank[r][i] for r in range(G)]


@pytest.mark.dist
def test_engine_tokens_equal_greedy_reference(engine_runs, references):
    refs, eos = references
    for G, case, results in _all_cases(engine_runs):
        res = results[0]
        for rid, (prompt, n) in GREEDY.items():
            want = refs[rid]
            assert res["tokens"][rid] == want, f"G={G} {case.name} {rid}"
            reason = "stop" if want[-1] in eos and len(want) <= n else "length"
            assert res["finals"][rid] == (reason, None), f"G={G} {case.name} {rid}"
        got = res["tokens"][CANCEL_ID]
        assert CANCEL_AFTER <= len(got) < 20 and got == refs[CANCEL_ID][:len(got)], f"G={G} {case.name}"
        assert res["finals"][CANCEL_ID] == ("cancelled", None), f"G={G} {case.name}"


@pytest.mark.dist
def test_seeded_sampling_same_at_world_size_1_and_2(engine_runs):
    base = engine_runs[1][1][0][0]["tokens"]
    assert [len(base[rid]) for rid in SAMPLED] == [n for _, n, _ in SAMPLED.values()]
    for G, case, results in _all_cases(engine_runs):
        for rid in SAMPLED:
            assert results[0]["tokens"][rid] == base[rid], f"G={G} {case.name} {rid}"
            assert results[0]["finals"][rid] == ("length", None)


@pytest.mark.dist
def test_kv_free_on_every_rank_after_cancel_and_finish(engine_runs):
    for G, case, results in _all_cases(engine_runs):
        assert results[0]["idle"].kv_used_tokens == 0, f"G={G} {case.name}"
        for r, res in enumerate(results):
            for rank_stats in res["kv"].per_rank:
                assert (rank_stats.used_blocks, rank_stats.sequences) == (0, 0), f"G={G} {case.name} rank {r}"
        if G > 1:
            assert results[1]["plans"] >= results[0]["snapshot"].steps > 0


@pytest.mark.dist
def test_snapshot_traffic_equals_counters_and_trace(engine_runs, engine_ckpt):
    cfg = ModelConfig.from_dir(engine_ckpt)
    K, E = cfg.top_k, cfg.num_experts
    for G, case, results in _all_cases(engine_runs):
        snap, trace = results[0]["snapshot"], results[0]["trace"]
        merged = CommCounters.merged([CommCounters.from_rows(r["counters"]) for r in results])
        rank0 = CommCounters.from_rows(results[0]["counters"])
        T = trace.experts_TLK.shape[0]
        # every sampled token but each request's last is fed back; the cancelled request's last one too when
        # its cancel came while that decode step was running
        fed_back = snap.generation_tokens - (len(GREEDY) + len(SAMPLED) + 1)
        assert T - (snap.prompt_tokens + fed_back) in (0, 1), f"G={G} {case.name}"
        assert (snap.strategy, snap.world_size, snap.waiting, snap.running) == (case.strategy.value, G, 0, 0)
        assert len(snap.layers) == cfg.num_moe_layers and len(snap.gpu_load) == cfg.num_moe_layers
        for m, layer in enumerate(snap.layers):
            a2a = merged.total(CollKind.ALL_TO_ALL, layer=m)
            assert layer.moe_layer == m
            assert layer.a2a_calls == rank0.data_all_to_all_calls(m), f"G={G} {case.name} layer {m}"
            assert (layer.a2a_bytes, layer.transfers) == (a2a.payload_bytes, a2a.rows), f"G={G} {case.name}"
            kv = merged.total(CollKind.KV_COHERENCE, layer=m)
            assert layer.kv_bytes == kv.payload_bytes, f"G={G} {case.name} layer {m}"
            assert (layer.kv_bytes > 0) == (G > 1 and case.strategy.coherent), f"G={G} {case.name} layer {m}"
            assert layer.cross_node_bytes == 0, f"G={G} {case.name}: one node, nothing crosses"
            assert layer.activations == T * K, f"G={G} {case.name} layer {m}"
            want_load = np.bincount(trace.experts_TLK[:, m].ravel(), minlength=E)
            assert layer.expert_load == tuple(want_load.tolist()), f"G={G} {case.name} layer {m}"
            assert sum(snap.gpu_load[m]) == T * K and len(snap.gpu_load[m]) == G
            assert 0 <= layer.local_activations <= layer.activations
            if G == 1:
                assert layer.local_activations == layer.activations and layer.a2a_calls == 0
            else:
                assert layer.a2a_calls > 0 and layer.transfers > 0


@pytest.mark.dist
def test_health_and_shutdown(engine_runs):
    for G, case, results in _all_cases(engine_runs):
        idle, busy, after = results[0]["health"]
        assert idle.ok and busy.ok, f"G={G} {case.name}: {idle} {busy}"
        assert (after.ok, after.reason) == (False, "shutting down")
        assert results[0]["stopped"], f"G={G} {case.name}: the engine thread did not end"
        assert results[0]["placement"]["expert_to_gpus"] and results[0]["placement"]["version"] == 2
