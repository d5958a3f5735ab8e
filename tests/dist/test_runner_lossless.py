"""Lossless across the grid: world sizes 1, 2, 4 x dispatchers x placements x model shapes give the
one-process model's greedy tokens, and logits within 1e-5 of its forward. Also: each rank's expert bytes
are exactly its share under the placement, and every rank agrees on the tokens.

The grid itself (cases, one spawned group per world size) is in tests/dist/_runner_cases.py and conftest.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from epserve.model.config import ModelConfig
from placement.cluster import ClusterShape
from placement.placement import contiguous_placement
from tests.dist._runner_cases import RunCase, reference

# logits against the one-process forward: float32 rounding; bfloat16 keeps 8 bits (logits here are O(1): 2^-6
# is a few units in the last place). Tokens must be identical in both.
LOGIT_ATOL = {"float32": 1e-5, "bfloat16": 1.6e-2}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("G", [1, 2, 4])
def test_lossless_grid(dist_grid, G):
    grid, per_rank = dist_grid(G)
    refs = {}
    for i, case in enumerate(grid.runner):
        key = (case.ckpt, case.prompts, case.max_new_tokens, case.dtype)
        if key not in refs:
            refs[key] = reference(case.ckpt, case.prompts, case.max_new_tokens, case.dtype)
        ref_tokens, ref_logits = refs[key]
        for r in range(G):
            assert per_rank[r]["runner"][i]["tokens"] == ref_tokens, f"{case.name}: rank {r} tokens differ"
        if case.capacity == 1:   # the fixed buffers overflowed and steps ran again, losing nothing
            assert per_rank[0]["runner"][i]["retried_steps"] >= 1, case.name
        for s, (mine, theirs) in enumerate(zip(per_rank[0]["runner"][i]["logits"], ref_logits)):
            for j, (a, b) in enumerate(zip(mine, theirs)):
                np.testing.assert_allclose(a, b, atol=LOGIT_ATOL[case.dtype], rtol=0,
                                           err_msg=f"{case.name}: seq {s} token {j}")


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_each_rank_holds_exactly_its_expert_share(dist_grid, G):
    grid, per_rank = dist_grid(G)
    for i, case in enumerate(grid.runner):
        _check_expert_share(case, [per_rank[r]["runner"][i] for r in range(G)], G)


def _check_expert_share(case: RunCase, results: list[dict], G: int) -> None:
    cfg = ModelConfig.from_dir(case.ckpt)
    placement = case.placement or contiguous_placement(cfg.num_moe_layers, cfg.num_experts,
                                                       ClusterShape(gpus_per_node=G))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4   # gate, up, down in float32
    for r, res in enumerate(results):
        want = {m: placement.experts_on(r)[m].tolist() for m in range(cfg.num_moe_layers)}
        assert res["loaded"] == want, f"{case.name}: rank {r} loaded {res['loaded']}"
        assert res["expert_bytes"] == cfg.num_moe_layers * placement.slots_per_gpu * per_expert, case.name
