"""The engine at world size 1, in this process (no torch.distributed): live trace recording (saved when the
recorder fills, and at shutdown), shutdown failing what still runs, refusals through submit (ValueError naming
the field, QueueFullError, EngineUnavailableError after shutdown)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from comm.strategy import Strategy
from comm.topology import EPTopology
from epserve.engine.api import EngineUnavailableError, GenerationRequest, QueueFullError
from epserve.engine.builder import build_runner
from epserve.engine.engine import EngineConfig, start_engine
from epserve.engine.plan import SamplingParams
from epserve.model.loader import load_model
from placement.trace import RoutingTrace

WAIT_S = 20.0
PROMPT = tuple(range(10, 20))


def _engine(ckpt, *, record_tokens=0, trace=None, **kw):
    runner = build_runner(ckpt, EPTopology.single(), strategy=Strategy.TWO_A2A, kv_cache_tokens=256,
                          kv_block_size=4, record_tokens=record_tokens)
    kw = dict(dict(heartbeat_s=0.1, stats_interval_steps=1, stats_min_interval_s=0.0), **kw)
    return runner, start_engine(runner, EngineConfig.from_model_dir(ckpt, record_trace_path=trace, **kw))


def _req(rid, prompt=PROMPT, max_tokens=8, **kw):
    return GenerationRequest(request_id=rid, prompt_ids=tuple(prompt), max_tokens=max_tokens,
                             sampling=SamplingParams(), ignore_eos=True, **kw)


async def _collect(stream, timeout_s=WAIT_S):
    async def run():
        return [d async for d in stream]
    return await asyncio.wait_for(run(), timeout_s)


async def _until(cond, what, timeout_s=WAIT_S):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        await asyncio.sleep(0.01)


def test_trace_saved_when_the_recorder_fills_then_not_again(tiny_checkpoint, tmp_path):
    ckpt, path = tiny_checkpoint("mixtral"), tmp_path / "live.npz"
    runner, engine = _engine(ckpt, record_tokens=12, trace=str(path))

    async def main():
        deltas = await _collect(engine.submit(_req("a")))
        await _until(path.exists, "the trace file")
        return [t for d in deltas for t in d.token_ids]

    tokens = asyncio.run(main())
    written = path.stat().st_mtime_ns
    engine.shutdown()
    trace = RoutingTrace.load(path)
    assert trace.experts_TLK.shape[0] == 12 and path.stat().st_mtime_ns == written
    assert trace.token_ids_T.tolist() == list(PROMPT) + tokens[:2]     # the first 12 tokens fed
    model, _ = load_model(ckpt)
    assert tokens == model.greedy_reference([list(PROMPT)], 8)[0]


def test_trace_saved_at_shutdown_when_not_full(tiny_checkpoint, tmp_path):
    ckpt, path = tiny_checkpoint("mixtral"), tmp_path / "live.npz"
    runner, engine = _engine(ckpt, record_tokens=1000, trace=str(path))

    async def main():
        return await _collect(engine.submit(_req("a", max_tokens=5)))

    asyncio.run(main())
    assert not path.exists()
    engine.shutdown()
    trace = RoutingTrace.load(path)
    assert trace.experts_TLK.shape[0] == len(PROMPT) + 4
    snap = engine.snapshot()
    for m, layer in enumerate(snap.layers):
        assert layer.expert_load == tuple(np.bincount(trace.experts_TLK[:, m].ravel(), minlength=8).tolist())


def test_shutdown_fails_running_requests_and_refuses_new_ones(tiny_checkpoint):
    runner, engine = _engine(tiny_checkpoint("mixtral"))

    async def main():
        stream = engine.submit(_req("long", prompt=(3, 4), max_tokens=120))
        got = []
        async for delta in stream:
            got.append(delta)
            if len(got) == 2:
                await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            engine.submit(_req("late"))
        return got

    got = asyncio.run(asyncio.wait_for(main(), WAIT_S))
    assert got[-1].finish_reason.value == "error" and got[-1].error == "the engine is shutting down"
    assert 2 <= len(got) < 120
    assert engine.health().reason == "shutting down" and engine.join(5.0)
    engine.shutdown()   # idempotent
    assert all(r.used_blocks == 0 for r in runner.kv_stats().per_rank)


def test_submit_refusals(tiny_checkpoint):
    runner, engine = _engine(tiny_checkpoint("mixtral"), max_running_seqs=1, max_waiting=1)

    async def main():
        with pytest.raises(ValueError, match="max_tokens: 200"):
            engine.submit(_req("big", max_tokens=200))     # max_model_len 128
        first = engine.submit(_req("a", prompt=(3,), max_tokens=120))
        it = first.__aiter__()
        await asyncio.wait_for(it.__anext__(), WAIT_S)      # "a" runs: the only seat is taken
        engine.submit(_req("b"))                            # waits
        with pytest.raises(QueueFullError) as info:
            engine.submit(_req("c"))
        first.cancel()
        rest = [d async for d in it]
        assert rest[-1].finish_reason.value == "cancelled"
        return info.value.retry_after_s

    assert asyncio.run(asyncio.wait_for(main(), WAIT_S)) == 1
    engine.shutdown()
    assert engine.join(5.0)
