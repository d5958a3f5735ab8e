"""Live re-placement is lossless: requests in flight while a new placement is swapped in, layer by layer,
expert weights moving between ranks, finish with the one-process model's tokens. After the swaps each rank
holds exactly the final placement's experts, bit-identical to the checkpoint's, and sent exactly the expert
copies placement/moves.py planned (counted as CollKind.WEIGHTS).

Cases per world size (2 ranks: one node; 4 ranks: 2 nodes x 2): contiguous --> permuted --> back, under
two_a2a and coherent, a2a and fixed transports (node_aware at 4 ranks), a whole layer per step or one expert copy per rank per step
(a layer's moves staged over several steps); at 4 ranks a swap into a replicated (v2) placement and out of
it; top-8 Qwen3 in bfloat16.
"""

from __future__ import annotations

import pytest

from comm.spawn import spawn_ranks
from comm.strategy import Strategy
from epserve.engine.plan import REPLACE_NONE
from epserve.model.config import ModelConfig
from placement.placement import contiguous_placement
from placement.transport import Transport
from tests.dist._replace_cases import (NEW, PROMPTS, ReplaceCase, cluster_of, expected_sent_rows, permuted,
                                       run_replace_cases, with_replicas)
from tests.dist._runner_cases import reference_tokens

GPUS_PER_NODE = {2: 2, 4: 2}


def _cases(models: dict, G: int) -> list[ReplaceCase]:
    cases = []
    for name, dtype in (("mixtral_top2", "float32"), ("qwen3_top8", "bfloat16")):
        ckpt = models[name]
        cfg = ModelConfig.from_dir(ckpt)
        start = contiguous_placement(cfg.num_moe_layers, cfg.num_experts, cluster_of(G, GPUS_PER_NODE[G]))
        other = permuted(start, seed=G)
        for strategy in (Strategy.TWO_A2A, Strategy.COHERENT):
            for transport in ((Transport.A2A, Transport.FIXED) if name == "mixtral_top2" else (Transport.A2A,)):
                # the swap's budget in expert copies per rank per step (None: a whole layer per step)
                chunked = {("mixtral_top2", Transport.FIXED): 1, ("qwen3_top8", Transport.A2A): 3}.get((name, transport))
                cases.append(ReplaceCase(f"{name}/{strategy.value}/{transport.value}/{dtype}/step{chunked}", ckpt,
                                         strategy, start, (other, start), transport, dtype, chunked))
        if G == 4 and name == "mixtral_top2":
            cases.append(ReplaceCase(f"{name}/coherent/replicas", ckpt, Strategy.COHERENT, start,
                                     (with_replicas(other, seed=3), other), step_experts=1))
            cases.append(ReplaceCase(f"{name}/two_a2a/node_aware", ckpt, Strategy.TWO_A2A, start, (other, start),
                                     Transport.NODE_AWARE, step_experts=1))
    return cases


@pytest.fixture(scope="module")
def replace_runs(tiny_checkpoint):
    models = {"mixtral_top2": tiny_checkpoint("mixtral"),
              "qwen3_top8": tiny_checkpoint("qwen3_moe", num_experts=16, num_experts_per_tok=8)}
    done = {}

    def get(G: int):
        if G not in done:
            cases = _cases(models, G)
            done[G] = (cases, spawn_ranks(run_replace_cases, G, (cases,), gpus_per_node=GPUS_PER_NODE[G],
                                          timeout_s=300))
        return done[G]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_swaps_mid_generation_keep_every_token(replace_runs, G):
    cases, per_rank = replace_runs(G)
    for i, case in enumerate(cases):
        want = reference_tokens(case.ckpt, PROMPTS, NEW, case.dtype)
        for r in range(G):
            res = per_rank[r][i]
            assert res["tokens"] == want, f"{case.name}: rank {r}"
            # the swaps ran while sequences were decoding, not on idle steps
            assert len(res["busy_steps"]) >= 4, (case.name, res["steps"])


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_after_the_swaps_each_rank_holds_the_final_placement(replace_runs, G):
    cases, per_rank = replace_runs(G)
    for i, case in enumerate(cases):
        final = case.targets[-1]
        expert_bytes = 3 * ModelConfig.from_dir(case.ckpt).hidden_size * \
            ModelConfig.from_dir(case.ckpt).moe_intermediate_size * (2 if case.dtype == "bfloat16" else 4)
        for r in range(G):
            res = per_rank[r][i]
            assert res["all_ops_ran"], f"{case.name}: the generation ended before the swaps did"
            assert res["loaded"] == res["want"], f"{case.name}: rank {r}"
            assert res["same_weights"], f"{case.name}: rank {r}'s moved weights differ from the checkpoint's"
            assert res["window_is_the_latest_routing"], f"{case.name}: the live window is not the latest routing"
            assert res["version"] == 1 + len(case.targets) and res["placement_is_final"], case.name
            assert (res["table"] == final.copy_choice_LEG[:, :, r]).all(), case.name
            sent = expected_sent_rows(case, r)
            assert res["moved_rows"] == sent and res["moved_payload"] == sent * expert_bytes, \
                (case.name, r, res["moved_rows"], sent)
        assert sum(expected_sent_rows(case, r) for r in range(G)) > 0, case.name


def test_schedule_runs_the_swap_steps_in_order_between_begin_and_commit():
    from epserve.engine.plan import REPLACE_BEGIN, REPLACE_COMMIT
    from placement.cluster import ClusterShape
    from tests.dist._replace_cases import schedule
    start = contiguous_placement(3, 8, ClusterShape(gpus_per_node=2))
    other = permuted(start, seed=1)
    ops = schedule(start, (other,), expert_bytes=10, step_bytes=10)
    seq = [op for _, (op, _) in sorted(ops.items())]
    bundle = ops[min(ops)][1]
    assert seq == [REPLACE_BEGIN, *range(len(bundle.schedule)), REPLACE_COMMIT] and REPLACE_NONE not in seq
    assert len(bundle.schedule) > 3   # one expert copy per rank per step: layers take several steps
