"""Dispatchers over real gloo ranks with plain torch experts, checked against a one-process sum.

One spawned group per world size runs every case. Checks per case: each token ends on exactly the anchor
the policy names, its value equals x + sum_k w_k f_{e_k}(x), and the rows counted per kind equal the traffic
model's |R \\ {c}| (dispatch) and |R \\ {a}| (combine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comm.counters import CollKind, CommCounters
from comm.spawn import spawn_ranks
from comm.strategy import Strategy
from tests.dist._dispatch_cases import Case, expert, problem, run_cases

CASES = [
    Case("two_a2a top2", Strategy.TWO_A2A, tokens=23, experts=8, top_k=2, seed=1),
    Case("two_a2a top1", Strategy.TWO_A2A, tokens=17, experts=8, top_k=1, seed=2),
    Case("coherent top1", Strategy.COHERENT, tokens=19, experts=8, top_k=1, seed=3),
    Case("coherent top2 with prefill", Strategy.COHERENT, tokens=21, experts=8, top_k=2, seed=4, prefill_every=3),
    Case("coherent top3", Strategy.COHERENT, tokens=16, experts=16, top_k=3, seed=5),
    Case("coherent top1 with prefill", Strategy.COHERENT, tokens=12, experts=8, top_k=1, seed=6, prefill_every=2),
    Case("two_a2a all to rank 0, rank 1 holds none", Strategy.TWO_A2A, tokens=14, experts=8, top_k=2, seed=7,
         skew_to_rank=0, empty_rank=1),
    Case("coherent all to last rank", Strategy.COHERENT, tokens=9, experts=8, top_k=2, seed=8, skew_to_rank=-1),
    Case("no tokens at all", Strategy.COHERENT, tokens=0, experts=8, top_k=2, seed=9),
]


def _cases_for(G: int) -> list[Case]:
    fix = lambda c: c if c.skew_to_rank != -1 else Case(**{**c.__dict__, "skew_to_rank": G - 1})  # noqa: E731
    return [fix(c) for c in CASES]


def _expected(case: Case, G: int):
    e2r_E, ids_TK, w_TK, start_T, prefill_T, x_TD, w_EDD = problem(case, G)
    T = case.tokens
    out_TD = x_TD.copy()
    for t in range(T):
        for k in range(case.top_k):
            e = ids_TK[t, k]
            out_TD[t] += w_TK[t, k] * expert(torch.as_tensor(w_EDD[e]), torch.as_tensor(x_TD[t:t + 1]))[0].numpy()
    rank_TK = e2r_E[ids_TK] if T else np.zeros((0, case.top_k), dtype=np.int64)
    if case.strategy.coherent:
        anchor_T = np.where(prefill_T, start_T, rank_TK[:, 0] if T else start_T)
    else:
        anchor_T = start_T
    dispatch = sum(len(set(rank_TK[t]) - {start_T[t]}) for t in range(T))
    combine = sum(len(set(rank_TK[t]) - {anchor_T[t]}) for t in range(T))
    return out_TD, anchor_T, dispatch, combine, prefill_T


@pytest.mark.dist
@pytest.mark.parametrize("G", [1, 2, 4])
def test_dispatch_combine_matches_one_process_sum(G):
    cases = _cases_for(G)
    per_rank = spawn_ranks(run_cases, G, (cases,), timeout_s=120)
    for i, case in enumerate(cases):
        out_TD, anchor_T, dispatch, combine, prefill_T = _expected(case, G)
        seen = {}
        for r in range(G):
            res = per_rank[r][i]
            for j, t in enumerate(res["token"]):
                assert t not in seen, f"{case.name}: token {t} anchored on ranks {seen[t]} and {r}"
                seen[t] = r
                np.testing.assert_allclose(res["out"][j], out_TD[t], rtol=1e-5, atol=1e-6, err_msg=case.name)
        assert seen == {t: int(anchor_T[t]) for t in range(case.tokens)}, case.name
        merged = CommCounters.merged([CommCounters.from_rows(per_rank[r][i]["counters"]) for r in range(G)])
        assert merged.total(CollKind.ALL_TO_ALL, phase="dispatch").rows == dispatch, case.name
        assert merged.total(CollKind.ALL_TO_ALL, phase="combine").rows == combine, case.name
        if G == 1:
            assert merged.total().calls == 0  # nothing to talk to
            continue
        combine_calls = 0 if (case.strategy.coherent and case.top_k == 1 and not prefill_T.any()) else 1
        assert merged.total(CollKind.ALL_TO_ALL, phase="dispatch").calls == 1
        assert merged.total(CollKind.ALL_TO_ALL, phase="combine").calls == combine_calls, case.name
        assert merged.total(CollKind.ALL_TO_ALL, phase="dispatch").payload_bytes == dispatch * case.hidden * 4
