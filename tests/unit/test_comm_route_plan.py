"""Route plans (pure functions), the packed wire rows and the counters, on hand-made examples."""

from __future__ import annotations

import pytest
import torch

from comm.counters import CollKind, CommCounters
from comm.route_plan import destinations_NG, plan_combine, plan_dispatch
from comm.wire import dispatch_codec

T = lambda *a: torch.tensor(a, dtype=torch.long)  # noqa: E731


def test_dispatch_sends_each_token_once_per_other_expert_rank_grouped_by_destination():
    # rank 1 of 3 holds tokens 4, 7, 9 with top-2 expert ranks:
    rank_NK = T([2, 0], [1, 1], [0, 2])
    plan = plan_dispatch(rank_NK, T(4, 7, 9), me=1, world_size=3)
    assert plan.send_counts == [2, 0, 2]               # to 0: tokens 4, 9; to 2: tokens 4, 9; token 7 stays
    assert plan.send_index_S.tolist() == [0, 2, 0, 2]
    assert destinations_NG(T([1, 1]), 3).tolist() == [[False, True, False]]  # deduplicated per rank


def test_combine_plan_both_ends_agree_on_sizes_and_order():
    # Rank 0 of 3 handles tokens 3 (held, anchor 0), 5 (received, anchor 2), 8 (received, anchor 0).
    rank_HK = T([0, 1], [0, 2], [1, 0])
    token_H, anchor_H = T(3, 5, 8), T(0, 2, 0)
    batch_M, p = plan_combine(rank_HK, token_H, anchor_H, me=0, world_size=3)
    assert batch_M.tolist() == [0, 1, 2]               # every token has an expert here
    assert p.send_counts == [0, 0, 1] and p.send_index_S.tolist() == [1]   # token 5's partial goes to 2
    assert p.anchored_A.tolist() == [0, 2]             # tokens 3 and 8 are summed here
    assert p.recv_counts == [0, 2, 0]                  # one partial each from rank 1, by token index
    assert p.recv_slot_R.tolist() == [0, 1]
    assert p.own_slot_A.tolist() == [0, 2]


def test_combine_plan_anchor_without_local_expert():
    # two_a2a: the home rank sums a token none of whose experts it holds.
    batch_M, p = plan_combine(T([1, 2]), T(0), T(0), me=0, world_size=3)
    assert batch_M.tolist() == [] and p.own_slot_A.tolist() == [-1]
    assert p.recv_counts == [0, 1, 1] and p.send_counts == [0, 0, 0]


def test_wire_rows_round_trip_bit_for_bit():
    codec = dispatch_codec(hidden_size=5, top_k=2, dtype=torch.bfloat16)
    x = torch.randn(3, 5).to(torch.bfloat16)
    vals = dict(x=x, topk_ids=T([1, 2], [3, 4], [5, 6]), topk_weights=torch.rand(3, 2),
                token=T([7], [8], [9]), anchor=T([0], [1], [2]))
    rows = codec.pack(torch.device("cpu"), **vals)
    assert rows.dtype == torch.uint8 and rows.shape == (3, codec.row_bytes) and codec.row_bytes == 5 * 2 + 8 + 8 + 4 + 4
    back = codec.unpack(rows)
    assert torch.equal(back["x"], x) and torch.equal(back["topk_weights"], vals["topk_weights"])
    assert back["topk_ids"].tolist() == [[1, 2], [3, 4], [5, 6]] and back["token"][:, 0].tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="pack needs fields"):
        codec.pack(torch.device("cpu"), x=x)


def test_counters_merge_sums_rows_and_keeps_collective_calls():
    a, b = CommCounters(), CommCounters()
    a.record(CollKind.ALL_TO_ALL, phase="dispatch", layer=0, rows=3, cross_node_rows=2, payload_bytes=12,
             wire_bytes=20)
    b.record(CollKind.ALL_TO_ALL, phase="dispatch", layer=0, rows=1, payload_bytes=4, wire_bytes=9)
    m = CommCounters.merged([a, b])
    assert m.total(CollKind.ALL_TO_ALL, layer=0).to_dict() == {"calls": 1, "rows": 4, "cross_node_rows": 2,
                                                                 "payload_bytes": 16, "wire_bytes": 29}
    assert m.data_all_to_all_calls(0) == 1 and m.layers() == [0]
    assert CommCounters.from_rows(m.to_rows()).to_rows() == m.to_rows()
    b.record(CollKind.ALL_TO_ALL, phase="dispatch", layer=0)
    with pytest.raises(ValueError, match="disagree"):
        CommCounters.merged([a, b])
