"""Routes (sync-free device functions), the packed wire rows and the counters, on hand-made examples."""

from __future__ import annotations

import pytest
import torch

from comm.counters import CollKind, CommCounters
from comm.routes import (BIG, bitmap_tokens, destinations_NG, flows_GG, group_pick_NQ, group_targets_NQ,
                         order_by_destination, token_bitmap_W)
from tests.sync_counter import SyncCounter
from comm.wire import dispatch_codec

T = lambda *a: torch.tensor(a, dtype=torch.long)  # noqa: E731


def test_destinations_are_deduplicated_and_ordered_by_destination_then_token():
    # rank 1 of 3 holds tokens 4, 7, 9 with top-2 expert ranks:
    rank_NK = T([2, 0], [1, 1], [0, 2])
    dest_NG = destinations_NG(rank_NK, 3)
    dest_NG[:, 1] = False
    row_X, g_X, counts_G = order_by_destination(dest_NG, T(4, 7, 9), num_step_tokens=10)
    S = int(counts_G.sum())
    assert counts_G.tolist() == [2, 0, 2]               # to 0: tokens 4, 9; to 2: tokens 4, 9; token 7 stays
    assert row_X[:S].tolist() == [0, 2, 0, 2] and g_X[:S].tolist() == [0, 0, 2, 2]
    assert destinations_NG(T([1, 1]), 3).tolist() == [[False, True, False]]


def test_node_relays_and_combine_targets_follow_the_traffic_model():
    # 2 groups of 2 ranks. Token 0: experts on ranks 1, 2, 3, anchor 3; token 1: experts on 2, 3, anchor 0 (home).
    # Both are held on rank 1.
    rank_NK, anchor_N = T([1, 2, 3], [2, 3, 3]), T(3, 0)
    in_R_N = destinations_NG(rank_NK, 4).gather(1, anchor_N[:, None])[:, 0]
    from_c = group_pick_NQ(rank_NK, T(1, 1), 2, 2)
    from_a = group_pick_NQ(rank_NK, anchor_N, 2, 2)
    assert from_c.tolist() == [[1, 3], [BIG, 3]]      # from local index 1: rank 3 comes first on node 1
    assert from_a.tolist() == [[1, 3], [BIG, 2]]      # from local index 0: rank 2 comes first on node 1
    relay_NQ, target_NQ = group_targets_NQ(from_c, from_a, anchor_N, in_R_N, 2)
    assert relay_NQ[0].tolist() == [1, 3] and target_NQ[0].tolist() == [1, 3]   # the anchor relays its node
    assert relay_NQ[1, 1] == 3 and target_NQ[1].tolist() == [0, 2]   # node 1's sum is made on 2, crosses to 0
    flows = flows_GG(from_a, anchor_N[:, None].expand_as(from_a),
                     (from_a < BIG) & (torch.arange(2)[None, :] != (anchor_N // 2)[:, None]), 4)
    assert flows.nonzero().tolist() == [[1, 3], [2, 0]] and int(flows.sum()) == 2


def test_token_bitmaps_round_trip_on_the_host():
    tokens = [0, 5, 61, 62, 63, 130, 199]
    words = token_bitmap_W(torch.tensor(tokens), torch.ones(len(tokens), dtype=torch.bool), 200)
    assert len(words) == 4 and bitmap_tokens(words.tolist(), 200) == tokens


def test_route_math_needs_no_host_sync():
    """The functions the transports call between two collectives read nothing on the host."""
    rank_NK, token_N = T([0, 3], [2, 2], [1, 0]), T(0, 4, 9)
    with SyncCounter() as sync:
        dest_NG = destinations_NG(rank_NK, 4)
        order_by_destination(dest_NG, token_N, 10)
        pick_NQ = group_pick_NQ(rank_NK, T(0, 2, 1), 2, 2)
        group_targets_NQ(pick_NQ, pick_NQ, T(0, 2, 1), dest_NG.gather(1, T(0, 2, 1)[:, None])[:, 0], 2)
        flows_GG(rank_NK, rank_NK, rank_NK > 0, 4)
        token_bitmap_W(token_N, token_N > 0, 10)
    assert sync.count == 0, sync.ops


def test_wire_rows_round_trip_bit_for_bit():
    codec = dispatch_codec(hidden_size=5, top_k=2, dtype=torch.bfloat16)
    x = torch.randn(3, 5).to(torch.bfloat16)
    vals = dict(x=x, topk_ids=T([1, 2], [3, 4], [5, 6]), topk_weights=torch.rand(3, 2),
                ranks=T([0, 3], [2, 2], [1, 0]), token=T([7], [8], [9]), anchor=T([0], [1], [2]))
    rows = codec.pack(torch.device("cpu"), **vals)
    assert rows.dtype == torch.uint8 and rows.shape == (3, codec.row_bytes)
    assert codec.row_bytes == 5 * 2 + 8 + 8 + 8 + 4 + 4   # x, ids, weights, chosen copies, token, anchor
    back = codec.unpack(rows)
    assert back["ranks"].tolist() == [[0, 3], [2, 2], [1, 0]]
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


def test_sync_counter_tells_device_reads_from_host_metadata():
    with SyncCounter() as sync:
        dev = torch.arange(6, device="cpu")                     # made with device=: device data
        host = torch.tensor([3, 1, 2])                          # from Python: host data
        host.tolist(), host[host > 1], int(host.sum())          # host metadata: free
        moved = host.to("cpu")                                  # to a device: still no sync
        dev.tolist()                                            # 1: a copy to the host
        dev[dev > 2]                                            # 2: a boolean mask sizes the output
        torch.nonzero(dev)                                      # 3
        torch.repeat_interleave(dev[:3], moved)                 # 4: sizes from data
        torch.repeat_interleave(dev[:3], moved, output_size=6)  # given: free
        dev.cpu().tolist()                                      # 5 (the .cpu(); tolist of its result is free)
    assert sync.count == 5, sync.ops
