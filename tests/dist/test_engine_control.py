"""ControlChannel over 2 gloo ranks: plans arrive intact and in order, including one larger than a frame (sent
as a frame plus a second broadcast) and a shutdown plan with engine flags."""

from __future__ import annotations

import pytest

from comm.spawn import spawn_ranks
from epserve.engine.control import FRAME_BYTES, ControlChannel
from epserve.engine.plan import SamplingParams, SeqWork, StepPlan

PLANS = (
    StepPlan(step=0),
    StepPlan(step=1, work=(SeqWork(3, (1, 2, 3), 0, 1, SamplingParams(temperature=0.5, top_p=0.9, seed=7)),),
             release=(1, 2), stats=True),
    StepPlan(step=2, work=tuple(SeqWork(s, tuple(range(1000)), 0, s % 2) for s in range(4))),   # > one frame
    StepPlan(step=3, release=(3,), shutdown=True, stats=True, save_trace_to="/tmp/x.npz"),
)


def _exchange(topology, plans):
    channel = ControlChannel(topology)
    if topology.rank == 0:
        for plan in plans:
            channel.send(plan)
        return channel.sent
    return [channel.recv() for _ in plans]


@pytest.mark.dist
def test_plans_arrive_intact_in_order():
    import pickle
    assert len(pickle.dumps(PLANS[2])) > FRAME_BYTES
    sent, received = spawn_ranks(_exchange, 2, (PLANS,), timeout_s=60)
    assert sent == len(PLANS) and tuple(received) == PLANS


def test_world_size_1_sends_nothing_and_cannot_receive():
    from comm.topology import EPTopology
    channel = ControlChannel(EPTopology.single())
    channel.send(PLANS[0])
    assert channel.sent == 1
    with pytest.raises(RuntimeError, match="ranks > 0"):
        channel.recv()
