"""ControlChannel and the counted host collectives over 4 gloo ranks (2 nodes x 2), in one spawned group:
plans arrive intact and in order (a heartbeat, flags, one plan longer than a frame, one that only a pickle
holds, a run of decode steps, a shutdown plan), the frame follows the plans (a run of similar decode steps
costs one broadcast each), byte payloads at the frame boundary take one broadcast or two, the stats all-gather
returns every rank's vector, and every call is counted as control / stats traffic with layer None, exactly,
on every rank."""

from __future__ import annotations

import pytest
import torch

from comm.counters import CollKind, CommCounters
from comm.host_collectives import LEN_BYTES, HostCollectives
from comm.spawn import spawn_ranks
from epserve.engine.control import FRAME_BYTES, PICKLED, ControlChannel, encode_plan, next_frame_bytes
from epserve.engine.live_stats import STATS_PHASE, LiveStats
from epserve.engine.plan import SamplingParams, SeqWork, StepPlan

G, PER_NODE = 4, 2
REMOTE = G - PER_NODE     # ranks on the other node
PLANS = (
    StepPlan(step=0),
    StepPlan(step=1, work=(SeqWork(3, (1, 2, 3), 0, 1, SamplingParams(temperature=0.5, top_p=0.9, seed=7)),),
             release=(1, 2), stats=True),
    StepPlan(step=2, work=tuple(SeqWork(s, tuple(range(1000)), 0, s % 2) for s in range(4))),   # > one frame
    StepPlan(step=3, work=(SeqWork(9, (5,), 4, 2, SamplingParams(temperature=1.0, seed=2 ** 70)),)),  # pickled
    *(StepPlan(step=4 + i, work=tuple(SeqWork(s, (7 * s,), 100 + i, s % G) for s in range(20 + i)))   # decode
      for i in range(6)),
    StepPlan(step=10, release=(3,), shutdown=True, stats=True, save_trace_to="/tmp/x.npz"),
)
DECODE = slice(4, 10)
PAYLOADS = (b"", b"x" * (FRAME_BYTES - LEN_BYTES), b"y" * (FRAME_BYTES - LEN_BYTES + 1), bytes(range(256)) * 20)


def _exchange(topology, plans, payloads):
    counters = CommCounters()
    channel = ControlChannel(topology, counters=counters)
    if topology.rank == 0:
        for plan in plans:
            channel.send(plan)
        received = channel.sent
    else:
        received = [channel.recv() for _ in plans]
    host = HostCollectives(topology, CommCounters())
    echoed = [host.broadcast_bytes(p if topology.rank == 0 else None, phase="raw", frame_bytes=FRAME_BYTES)
              for p in payloads]
    gathered = host.all_gather_int64(torch.arange(4, dtype=torch.int64) + 10 * topology.rank, phase="vec")
    # LiveStats: one data entry per layer (as the dispatcher would record), then the counted gather
    stats_counters = CommCounters()
    for m in range(2):
        stats_counters.record(CollKind.ALL_TO_ALL, phase="dispatch", layer=m, rows=m + 1, payload_bytes=8 * (m + 1))
    live = LiveStats(topology=topology, expert_to_rank_LE=torch.tensor([[0, 1, 2], [2, 1, 0]]))
    live.record(0, torch.tensor([[0, 1]]))
    before_X = live.vector_X(stats_counters)
    traffic = live.gather(stats_counters)
    return {"received": received, "control": counters.to_rows(), "echoed": echoed, "host": host.counters.to_rows(),
            "gathered": gathered, "stats": stats_counters.to_rows(),
            "unchanged": bool(torch.equal(before_X, live.vector_X(stats_counters))), "traffic": traffic}


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(_exchange, G, (PLANS, PAYLOADS), gpus_per_node=PER_NODE, timeout_s=120)


@pytest.mark.dist
def test_plans_arrive_intact_in_order(results):
    assert encode_plan(PLANS[3])[0] == PICKLED
    assert len(encode_plan(PLANS[2])) > FRAME_BYTES
    assert results[0]["received"] == len(PLANS)
    assert all(tuple(r["received"]) == PLANS for r in results[1:])


@pytest.mark.dist
def test_control_traffic_is_counted_exactly_on_every_rank(results):
    frames, heads, tails, frame = [], [], [], FRAME_BYTES
    for plan in PLANS:              # each message: u32 next frame size + the plan; the frame follows the plans
        n = 4 + len(encode_plan(plan))
        frames.append(frame)
        heads.append(min(n, frame - LEN_BYTES))
        tails.append(n - heads[-1])
        frame = next_frame_bytes(n)
    assert [t > 0 for t in tails] == [False, False, True] + [False] * 8    # only the 8 KB prefill outgrows its frame
    assert frames[DECODE][1:] == [320] * 5                 # decode steps of 21-25 sequences: 226-258 bytes
    tails = [t for t in tails if t]
    want0 = [
        {"kind": "control", "phase": "plan", "layer": None, "calls": len(PLANS), "rows": len(PLANS) * (G - 1),
         "cross_node_rows": len(PLANS) * REMOTE, "payload_bytes": (G - 1) * sum(heads),
         "wire_bytes": (G - 1) * sum(frames)},
        {"kind": "control", "phase": "plan_tail", "layer": None, "calls": len(tails), "rows": len(tails) * (G - 1),
         "cross_node_rows": len(tails) * REMOTE, "payload_bytes": (G - 1) * sum(tails),
         "wire_bytes": (G - 1) * sum(tails)},
    ]
    assert results[0]["control"] == want0
    for r in results[1:]:   # receivers: the same calls, nothing sent
        assert r["control"] == [{**row, "rows": 0, "cross_node_rows": 0, "payload_bytes": 0, "wire_bytes": 0}
                                for row in want0]
    merged = CommCounters.merged([CommCounters.from_rows(r["control"]) for r in results])
    assert merged.total(CollKind.CONTROL, layer=None).wire_bytes == (G - 1) * (sum(frames) + sum(tails))
    assert merged.layers() == []


@pytest.mark.dist
def test_byte_payloads_take_one_broadcast_or_two(results):
    for r in results:
        assert r["echoed"] == list(PAYLOADS)
    rows = {(row["kind"], row["phase"]): row for row in results[0]["host"]}
    assert rows[("control", "raw")]["calls"] == len(PAYLOADS)
    assert rows[("control", "raw_tail")]["calls"] == 2        # the payloads one byte over the frame and longer
    assert rows[("control", "raw_tail")]["wire_bytes"] == (G - 1) * (1 + len(PAYLOADS[3]) - FRAME_BYTES + LEN_BYTES)
    assert rows[("stats", "vec")] == {"kind": "stats", "phase": "vec", "layer": None, "calls": 1, "rows": G - 1,
                                      "cross_node_rows": REMOTE, "payload_bytes": (G - 1) * 32,
                                      "wire_bytes": (G - 1) * 32}


@pytest.mark.dist
def test_stats_gather_is_counted_apart_from_the_data(results):
    want = torch.arange(4, dtype=torch.int64)[None] + 10 * torch.arange(G)[:, None]
    for r in results:
        assert torch.equal(r["gathered"], want)
        assert r["unchanged"]                                  # the STATS entry is not in any layer's figures
        stats = [row for row in r["stats"] if row["kind"] == "stats"]
        assert stats == [{"kind": "stats", "phase": STATS_PHASE, "layer": None, "calls": 1, "rows": G - 1,
                          "cross_node_rows": REMOTE, "payload_bytes": (G - 1) * 2 * (6 + 3) * 8,
                          "wire_bytes": (G - 1) * 2 * (6 + 3) * 8}]   # 2 layers x (6 counters + 3 experts)
        layers = r["traffic"].layers
        assert [(t.a2a_calls, t.transfers, t.a2a_bytes) for t in layers] == [(1, G, 8 * G), (1, 2 * G, 16 * G)]
        assert layers[0].expert_load == (G, G, 0) and layers[0].local_activations == 2   # ranks 0 and 1


def test_world_size_1_sends_nothing_and_cannot_receive():
    from comm.topology import EPTopology
    channel = ControlChannel(EPTopology.single())
    channel.send(PLANS[0])
    assert channel.sent == 1 and channel.counters.total().calls == 0
    with pytest.raises(RuntimeError, match="ranks > 0"):
        channel.recv()
    host = HostCollectives(EPTopology.single(), CommCounters())
    assert host.broadcast_bytes(b"abc", phase="p") == b"abc"
    assert torch.equal(host.all_gather_int64(torch.tensor([1, 2]), phase="v"), torch.tensor([[1, 2]]))
    assert host.counters.total().calls == 0
    with pytest.raises(ValueError, match="not all_to_all"):
        host.broadcast_bytes(b"", phase="p", kind=CollKind.ALL_TO_ALL)
    with pytest.raises(ValueError, match="int64"):
        host.all_gather_int64(torch.tensor([1.0]), phase="v")
