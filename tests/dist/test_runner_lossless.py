"""Lossless across the grid: world sizes 1, 2, 4 x dispatchers x placements x model shapes give the
one-process model's greedy tokens, and logits within 1e-5 of its forward. Also: each rank's expert bytes
are exactly its share under the placement, and nothing is left in flight.

One spawned group per world size runs every case (spawning costs seconds; a case costs a fraction).
"""

from __future__ import annotations

import numpy as np
import pytest

from comm.spawn import spawn_ranks
from comm.strategy import Strategy
from placement.cluster import ClusterShape
from placement.placement import Placement
from tests.dist._runner_cases import RunCase, reference, reference_routing, run_cases

PROMPTS = ((5, 6, 7, 8, 9, 10, 11), (12, 13), (3,), (40, 41, 42, 43, 44))
NEW = 5
STRATEGIES = (Strategy.TWO_A2A, Strategy.COHERENT)


def random_placement(L: int, E: int, G: int, seed: int) -> Placement:
    g = np.random.default_rng(seed)
    rows = [g.permutation(np.arange(E) // (E // G)) for _ in range(L)]
    return Placement(np.stack(rows), ClusterShape(gpus_per_node=G), solver={"name": "random", "seed": seed})


def hot_rank_placement(routing_L, E: int, G: int) -> Placement:
    """The E/G most used experts of each layer (by the prompts' routing) all on rank 0: uneven loads."""
    rows = []
    for ids_TK in routing_L:
        order = np.argsort(-np.bincount(ids_TK.ravel(), minlength=E), kind="stable")
        row = np.empty(E, dtype=np.int64)
        row[order] = np.arange(E) // (E // G)
        rows.append(row)
    return Placement(np.stack(rows), ClusterShape(gpus_per_node=G), solver={"name": "hot_rank_0"})


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return {
        "mixtral_top2": tiny_checkpoint("mixtral"),
        "mixtral_top1": tiny_checkpoint("mixtral", num_experts_per_tok=1),
        # shared expert; dense first and last layers around one MoE layer (a trailing K/V group)
        "qwen2_dense_shared": tiny_checkpoint("qwen2_moe", mlp_only_layers=[0, 2]),
        "qwen3_top2": tiny_checkpoint("qwen3_moe"),
    }


def grid(models, G: int) -> list[RunCase]:
    cases = []
    for name, ckpt in models.items():
        if name == "qwen3_top2" and G != 2:
            continue
        from epserve.model.config import ModelConfig
        cfg = ModelConfig.from_dir(ckpt)
        L, E = cfg.num_moe_layers, cfg.num_experts
        placements = {"contiguous": None, "random": random_placement(L, E, G, seed=G)}
        if G > 1 and name == "mixtral_top2":
            placements["hot_rank_0"] = hot_rank_placement(reference_routing(ckpt, PROMPTS), E, G)
        for strategy in STRATEGIES:
            for pname, placement in placements.items():
                cases.append(RunCase(f"{name}/{strategy.value}/{pname}", ckpt, strategy, PROMPTS, NEW, placement))
    top2, top1 = models["mixtral_top2"], models["mixtral_top1"]
    for strategy in STRATEGIES:
        # mixed steps: chunked prefill of later requests beside decode of earlier ones
        cases.append(RunCase(f"mixtral_top2/{strategy.value}/chunked+staggered", top2, strategy, PROMPTS, NEW,
                             prefill_chunk=3, stagger=2))
        cases.append(RunCase(f"qwen2/{strategy.value}/chunked+staggered", models["qwen2_dense_shared"], strategy,
                             PROMPTS, NEW, prefill_chunk=2, stagger=1))
        # one sequence, top-1: every decode step leaves at least G - 2 ranks with no token at all
        cases.append(RunCase(f"mixtral_top1/{strategy.value}/single", top1, strategy, PROMPTS[:1], NEW))
    return cases


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("G", [1, 2, 4])
def test_lossless_grid(models, G):
    cases = grid(models, G)
    refs = {}
    per_rank = spawn_ranks(run_cases, G, (cases,), timeout_s=400)
    for i, case in enumerate(cases):
        key = (case.ckpt, case.prompts)
        if key not in refs:
            refs[key] = reference(case.ckpt, case.prompts, case.max_new_tokens)
        ref_tokens, ref_logits = refs[key]
        got = per_rank[0][i]
        for r in range(G):
            assert per_rank[r][i]["tokens"] == ref_tokens, f"{case.name}: rank {r} tokens differ"
            assert per_rank[r][i]["coherence_in_flight"] == 0 or case.strategy.coherent
        for s, (mine, theirs) in enumerate(zip(got["logits"], ref_logits)):
            for j, (a, b) in enumerate(zip(mine, theirs)):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"{case.name}: seq {s} token {j}")
        _check_expert_share(case, per_rank, i, G)


def _check_expert_share(case: RunCase, per_rank, i: int, G: int) -> None:
    """Each rank loaded exactly its experts under the placement, and its expert bytes are exactly that share."""
    from epserve.model.config import ModelConfig
    cfg = ModelConfig.from_dir(case.ckpt)
    placement = case.placement
    if placement is None:
        from placement.placement import contiguous_placement
        placement = contiguous_placement(cfg.num_moe_layers, cfg.num_experts, ClusterShape(gpus_per_node=G))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4   # gate, up, down in float32
    for r in range(G):
        res = per_rank[r][i]
        want = {m: placement.experts_on(r)[m].tolist() for m in range(cfg.num_moe_layers)}
        assert res["loaded"] == want, f"{case.name}: rank {r} loaded {res['loaded']}"
        assert res["expert_bytes"] == cfg.num_moe_layers * (cfg.num_experts // G) * per_expert
