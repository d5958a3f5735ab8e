"""Dispatchers over real gloo ranks with plain torch experts, checked against a one-process sum.

One spawned group per world size runs every case (tests/dist/conftest.py). Checks per case: each token ends on exactly the anchor
the policy names, its value equals x + sum_k w_k f_{e_k}(x), and the rows counted per kind equal the traffic
model's |R \\ {c}| (dispatch) and |R \\ {a}| (combine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comm.counters import CollKind, CommCounters
from tests.dist._dispatch_cases import Case, expert, problem
from placement.transport import Transport
from tests.dist._grid import GPUS_PER_NODE

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
    node = lambda r: r // GPUS_PER_NODE[G]  # noqa: E731
    if case.transport is Transport.NODE_AWARE:   # once to each other node that holds experts, once back
        cross = sum(len({node(r) for r in rank_TK[t]} - {node(start_T[t])}) for t in range(T))
    else:
        cross = sum(node(r) != node(start_T[t]) for t in range(T) for r in set(rank_TK[t]) - {start_T[t]})
    return out_TD, anchor_T, dispatch, combine, prefill_T, cross


@pytest.mark.dist
@pytest.mark.parametrize("G", [1, 2, 4])
def test_dispatch_combine_matches_one_process_sum(dist_grid, G):
    grid, results = dist_grid(G)
    per_rank = [r["dispatch"] for r in results]
    for i, case in enumerate(grid.dispatch):
        out_TD, anchor_T, dispatch, combine, prefill_T, cross = _expected(case, G)
        overflow = [per_rank[r][i]["overflow"] for r in range(G)]
        if "overflows" in case.name and G > 1:   # some rank had more rows for a peer than fit: flagged, not lost
            assert any(overflow) and case.transport is Transport.FIXED, case.name
            continue
        # one rank has no buffer to overflow (comm/transport_local.py): no flag at all
        assert overflow == [None if case.transport is not Transport.FIXED or G == 1 else False] * G, case.name
        seen = {}
        for r in range(G):
            res = per_rank[r][i]
            for j, t in enumerate(res["token"]):
                assert t not in seen, f"{case.name}: token {t} anchored on ranks {seen[t]} and {r}"
                seen[t] = r
                np.testing.assert_allclose(res["out"][j], out_TD[t], rtol=1e-5, atol=1e-6, err_msg=case.name)
        assert seen == {t: int(anchor_T[t]) for t in range(case.tokens)}, case.name
        merged = CommCounters.merged([CommCounters.from_rows(per_rank[r][i]["counters"]) for r in range(G)])
        stat = lambda *phases: [merged.total(CollKind.ALL_TO_ALL, phase=p) for p in phases]  # noqa: E731
        d_stats, c_stats = stat("dispatch", "dispatch_intra"), stat("combine_intra", "combine")
        assert sum(s.rows for s in d_stats) == dispatch, case.name
        assert sum(s.rows for s in c_stats) == combine, case.name
        if case.transport is Transport.NODE_AWARE:   # every crossing is one per node, out and back
            back = sum(len({r // GPUS_PER_NODE[G] for r in set(e2r) } - {a // GPUS_PER_NODE[G]})
                       for e2r, a in _ranks_and_anchors(case, G, anchor_T))
            assert d_stats[0].cross_node_rows == cross and c_stats[1].cross_node_rows == back, case.name
            assert d_stats[1].cross_node_rows == c_stats[0].cross_node_rows == 0, case.name
        else:
            assert d_stats[0].cross_node_rows == cross, case.name
        if G == 1:
            assert merged.total().calls == 0  # nothing to talk to
            continue
        combine_calls = 0 if (case.strategy.coherent and case.top_k == 1 and not prefill_T.any()) else 1
        relay_calls = 1 if case.transport is Transport.NODE_AWARE else 0
        assert [s.calls for s in d_stats] == [1, relay_calls], case.name
        assert [s.calls for s in c_stats] == [combine_calls * relay_calls, combine_calls], case.name
        assert merged.total(CollKind.A2A_SPLITS).calls == (0 if case.transport is Transport.FIXED else 1)
        if not case.strategy.coherent and case.transport is not Transport.FIXED:
            # tokens at home: the combine mirrors the dispatch, so only the dispatch sizes are exchanged
            # (a2a: one int64 per peer; node_aware: + the P-wide forward counts inside the node)
            cols = 1 if case.transport is Transport.A2A else 1 + 2 * GPUS_PER_NODE[G]
            assert merged.total(CollKind.A2A_SPLITS).wire_bytes == G * (G - 1) * cols * 8, case.name
        assert sum(s.payload_bytes for s in d_stats) == dispatch * case.hidden * 4
        if case.transport is Transport.FIXED:   # the wire carries every slot of the fixed buffers
            assert d_stats[0].wire_bytes >= d_stats[0].payload_bytes, case.name


def _ranks_and_anchors(case: Case, G: int, anchor_T):
    e2r_E, ids_TK, *_ = problem(case, G)
    return [(e2r_E[ids_TK[t]], anchor_T[t]) for t in range(case.tokens)]
