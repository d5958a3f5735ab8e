"""Device-to-host syncs per decoder layer on the decode path (the whole layer: attention over the paged cache,
router, dispatch, grouped experts, combine, shared expert; every policy), counted on real ranks with
tests/sync_counter.py. The model side adds none, so the budget is the transport's: at most one with the counted transports (a2a, node_aware: the counts
exchange is read once), none with ``fixed`` when tokens stay home, and one with ``fixed`` when they move (the
list of tokens that now live on the rank, which attention reads on the host)."""

from __future__ import annotations

import pytest

from placement.transport import Transport

BUDGET = {Transport.A2A: (1, 1), Transport.NODE_AWARE: (1, 1), Transport.FIXED: (0, 1)}  # (stay home, move)


@pytest.mark.dist
@pytest.mark.parametrize("G", [2, 4])
def test_decode_path_host_syncs_per_moe_layer(dist_grid, G):
    grid, per_rank = dist_grid(G)
    seen = set()
    for i, case in enumerate(grid.runner):
        if not case.count_syncs:
            continue
        home, moved = BUDGET[case.transport]
        budget = moved if case.strategy.coherent else home
        for r in range(G):
            decode = [(n, ops) for prefill, n, ops in per_rank[r]["runner"][i]["syncs"] if not prefill]
            assert decode, case.name
            assert max(n for n, _ in decode) == budget, f"{case.name} rank {r}: {decode[:3]}"
        seen.add(case.transport)
    assert seen == ({Transport.A2A, Transport.FIXED, Transport.NODE_AWARE} if G == 4 else
                    {Transport.A2A, Transport.FIXED})
