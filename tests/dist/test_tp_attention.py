"""Tensor-parallel attention (``--attention tp``, tp_two_a2a) is lossless: at 1, 2 and 4 ranks (4 as 2 nodes x 2)
the greedy tokens equal the one-process model's for top-1 and top-2 Mixtral, top-8 Qwen3 and OLMoE (q/k norm over
all heads), in float32 and bfloat16, with the a2a and fixed transports, contiguous / solved / replicated (v2)
placements, tp_two_a2a and tp_speculative. Each rank keeps only its heads (weights and
KV cache; key-value heads replicated when the ranks outnumber them), and the reduce-scatter and all-gather
around every decoder layer move (G - 1) rows per step token each (the last layer: no all-gather), counted."""

from __future__ import annotations

import pytest

from comm.spawn import spawn_ranks
from epserve.model.config import ModelConfig
from placement.transport import Transport
from comm.strategy import Strategy
from tests.dist._runner_cases import build_predictor, reference_tokens, replicated_placement, solved_placement
from tests.dist._tp_cases import NEW, PROMPTS, TPCase, run_tp_cases

GPUS_PER_NODE = {1: 1, 2: 2, 4: 2}


@pytest.fixture(scope="module")
def tp_runs(tiny_checkpoint, tmp_path_factory):
    models = {"mixtral_top2": tiny_checkpoint("mixtral"),
              "mixtral_top1": tiny_checkpoint("mixtral", num_experts_per_tok=1),
              "qwen3_top8": tiny_checkpoint("qwen3_moe", num_experts=16, num_experts_per_tok=8),
              "olmoe": tiny_checkpoint("olmoe")}
    cases = [TPCase(f"{name}/{dtype}", ckpt, dtype) for name, ckpt in models.items()
             for dtype in (("float32",) if name == "mixtral_top1" else ("float32", "bfloat16"))]
    cases.append(TPCase("mixtral_top2/float32/fixed", models["mixtral_top2"], transport=Transport.FIXED))
    done = {}

    def placed(G: int) -> list[TPCase]:
        """tp_two_a2a on a replicated and a solved placement, tp_speculative on the solved one with a predictor
        from the same routing (G > 1)."""
        if G == 1:
            return []
        ckpt, tmp = models["mixtral_top2"], tmp_path_factory.mktemp(f"tp{G}")
        placement = solved_placement(ckpt, G, GPUS_PER_NODE[G])
        cfg = ModelConfig.from_dir(ckpt)
        replicated = replicated_placement(cfg.num_moe_layers, cfg.num_experts, G, GPUS_PER_NODE[G], seed=G)
        return [TPCase("mixtral_top2/replicated/tp_two_a2a", ckpt, placement=replicated),
                TPCase("mixtral_top2/solved/tp_two_a2a", ckpt, placement=placement),
                TPCase("mixtral_top2/solved/tp_speculative", ckpt, strategy=Strategy.SPECULATIVE, placement=placement,
                       predictor_path=build_predictor(ckpt, placement, tmp / "predictor.npz"))]

    def get(G: int):
        if G not in done:
            mine = cases + placed(G)
            done[G] = (mine, spawn_ranks(run_tp_cases, G, (mine,), gpus_per_node=GPUS_PER_NODE[G], timeout_s=300))
        return done[G]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("G", [1, 2, 4])
def test_tp_attention_gives_the_one_process_tokens(tp_runs, G):
    cases, per_rank = tp_runs(G)
    for i, case in enumerate(cases):
        want = reference_tokens(case.ckpt, PROMPTS, NEW, case.dtype)
        for r in range(G):
            assert per_rank[r][i]["tokens"] == want, f"{case.name}: rank {r}"


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_each_rank_keeps_its_heads_and_the_collectives_are_counted(tp_runs, G):
    cases, per_rank = tp_runs(G)
    for i, case in enumerate(cases):
        cfg = ModelConfig.from_dir(case.ckpt)
        H, Hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        moe_layers, layers = cfg.num_moe_layers, cfg.num_layers
        for r in range(G):
            res = per_rank[r][i]
            assert res["heads"] == (H // G, max(1, Hkv // G)), case.name
            assert res["kv_heads_cached"] == max(1, Hkv // G), case.name
            assert res["o_cols"] == H // G * d, case.name
            if cfg.qk_norm.value != "full":   # OLMoE keeps the full q projection for its norm
                assert res["q_rows"] == H // G * d, case.name
            tokens = sum(res["step_tokens"])
            steps = sum(1 for t in res["step_tokens"] if t)
            # every step: one reduce-scatter per decoder layer, one all-gather per layer but the last;
            # summed over ranks, each real token row is sent to the G - 1 other ranks
            assert res["rs_calls"] == steps * layers and res["ag_calls"] == steps * (layers - 1), case.name
        rs = sum(per_rank[r][i]["rs_rows"] for r in range(G))
        ag = sum(per_rank[r][i]["ag_rows"] for r in range(G))
        tokens = sum(per_rank[0][i]["step_tokens"])
        assert rs == (G - 1) * tokens * layers, (case.name, rs)
        assert ag == (G - 1) * tokens * (layers - 1), (case.name, ag)
        assert moe_layers >= 1


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_tp_speculative_dispatches_fewer_rows_than_tp_two_a2a(tp_runs, G):
    """s-TS: with a predictor that knows these prompts' routing, tokens land where their experts are."""
    cases, per_rank = tp_runs(G)
    by_name = {c.name: i for i, c in enumerate(cases)}
    base, spec = by_name["mixtral_top2/solved/tp_two_a2a"], by_name["mixtral_top2/solved/tp_speculative"]
    assert per_rank[0][spec]["label"] == "tp_speculative" and per_rank[0][base]["label"] == "tp_two_a2a"
    rows = {i: sum(per_rank[r][i]["dispatch_rows"] for r in range(G)) for i in (base, spec)}
    assert rows[spec] < 0.7 * rows[base], rows


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_counters_equal_the_tp_simulator(tp_runs, G):
    """placement/simulate_tp.py replays the run's recorded routing with its steps: every phase's transfers
    (reduce-scatter, dispatch + combine, all-gather) equal what the ranks counted, under both TP strategies."""
    from placement.predictor import SpeculativePredictor
    from placement.simulate_tp import simulate_tp
    cases, per_rank = tp_runs(G)
    for i, case in enumerate(cases):
        if case.placement is None:
            continue
        res0 = per_rank[0][i]
        strategy = "tp_speculative" if case.predictor_path else "tp_two_a2a"
        predictor = SpeculativePredictor.load(case.predictor_path) if case.predictor_path else None
        sim = simulate_tp(res0["trace"], case.placement, strategy=strategy, predictor=predictor,
                          step_sizes=[t for t in res0["step_tokens"] if t], capacity_factor=2.0)
        total = {phase: int(v.sum()) for phase, v in sim.transfers_L.items()}
        assert sum(per_rank[r][i]["dispatch_rows"] for r in range(G)) == total["dispatch"] + total["combine"], \
            case.name
        assert sum(per_rank[r][i]["rs_rows"] for r in range(G)) == total["rs"], case.name
        assert sum(per_rank[r][i]["ag_rows"] for r in range(G)) == total["ag"], case.name
