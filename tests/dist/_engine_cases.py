"""Rank-side code of the engine tests (tests/dist/test_engine_serving.py, test_engine_liveness.py).

    every rank: build_runner(case) --> rank 0: start_engine + an asyncio client (_serve)
                                       ranks > 0: follow(runner) until the shutdown plan
    rank 0's client: 3 requests at once, 2 more once the first has a token, 1 more later, 2 seeded-sampling
    requests, 1 long request cancelled after 3 tokens; waits (bounded) until the engine is idle with its KV
    free, then shuts the engine down (final stats + routing trace) and returns what every stream saw.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from comm.strategy import Strategy
from epserve.engine.api import GenerationRequest
from epserve.engine.builder import build_runner
from epserve.engine.control import ControlChannel
from epserve.engine.engine import EngineConfig, after_step, attach_live_stats, start_engine
from epserve.engine.plan import SamplingParams
from placement.placement import Placement
from placement.trace import RoutingTrace

GREEDY = {f"g{i}": (p, n) for i, (p, n) in enumerate([
    (tuple(range(5, 17)), 6), ((20, 21), 5), ((3,), 7), ((40, 41, 42, 43, 44), 4),
    ((60, 61, 62, 63, 64, 65, 66, 67, 68), 6), ((90, 91, 92), 5)])}
SAMPLED = {"s0": ((7, 8, 9), 6, SamplingParams(temperature=0.8, top_p=0.9, seed=1234)),
           "s1": ((100, 101), 6, SamplingParams(temperature=1.2, top_k=20, seed=99))}
CANCEL_ID, CANCEL_PROMPT, CANCEL_AFTER = "c0", (50, 51, 52, 53), 3
ENGINE_KW = dict(max_batched_tokens=8, max_running_seqs=3, max_waiting=16, stats_interval_steps=1,
                 stats_min_interval_s=0.0, heartbeat_s=0.2, stuck_after_s=30.0, shutdown_timeout_s=20.0)
WAIT_S = 30.0


@dataclass(frozen=True)
class EngineCase:
    name: str
    ckpt: Path
    strategy: Strategy
    trace_path: Path
    placement: Placement | None = None
    predictor_path: Path | None = None


def _runner(topology, case: EngineCase):
    return build_runner(case.ckpt, topology, strategy=case.strategy, placement=case.placement,
                        predictor_path=case.predictor_path, kv_cache_tokens=256, kv_block_size=4,
                        record_tokens=4096, check_splits=True)


def run_engine_cases(topology, cases: list[EngineCase]) -> list[dict]:
    out = []
    for case in cases:
        runner = _runner(topology, case)
        if topology.rank == 0:
            res = asyncio.run(_serve(runner, case))
        else:
            from epserve.engine.engine import follow
            res = {"plans": follow(runner)}
        res.update(counters=runner.counters.to_rows(), kv=runner.kv_stats())
        out.append(res)
    return out


async def _until(cond, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        await asyncio.sleep(0.01)


async def _serve(runner, case: EngineCase) -> dict:
    config = EngineConfig.from_model_dir(case.ckpt, record_trace_path=str(case.trace_path), **ENGINE_KW)
    engine = start_engine(runner, config)
    tokens: dict[str, list[int]] = {}
    finals: dict[str, tuple] = {}
    tasks = []

    async def consume(stream):
        tokens[stream.request_id] = []
        async for delta in stream:
            tokens[stream.request_id] += delta.token_ids
            if delta.finish_reason is not None:
                finals[stream.request_id] = (delta.finish_reason.value, delta.error)

    def submit(rid, prompt, max_tokens, sampling=SamplingParams(), ignore_eos=False):
        stream = engine.submit(GenerationRequest(request_id=rid, prompt_ids=prompt, max_tokens=max_tokens,
                                                 sampling=sampling, ignore_eos=ignore_eos))
        tasks.append(asyncio.create_task(consume(stream)))
        return stream

    health_idle = engine.health()
    for rid in ("g0", "g1", "g2"):
        submit(rid, *GREEDY[rid])
    await _until(lambda: len(tokens.get("g0", ())) >= 1, "g0's first token")
    for rid in ("g3", "g4"):
        submit(rid, *GREEDY[rid])
    cancelled = submit(CANCEL_ID, CANCEL_PROMPT, 60, ignore_eos=True)
    await _until(lambda: len(tokens.get("g1", ())) >= 2 or "g1" in finals, "g1's second token")
    submit("g5", *GREEDY["g5"])
    for rid, (prompt, n, sampling) in SAMPLED.items():
        submit(rid, prompt, n, sampling, ignore_eos=True)
    health_busy = engine.health()
    await _until(lambda: len(tokens.get(CANCEL_ID, ())) >= CANCEL_AFTER, "the long request's tokens")
    cancelled.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    await _until(lambda: _idle(engine.snapshot()), "the engine to go idle with its KV free")
    idle = engine.snapshot()
    engine.shutdown()
    return {"tokens": tokens, "finals": finals, "snapshot": engine.snapshot(), "idle": idle,
            "health": (health_idle, health_busy, engine.health()), "stopped": engine.join(5.0),
            "trace": RoutingTrace.load(case.trace_path), "placement": engine.placement_document()}


def _idle(snap) -> bool:
    return snap.running == 0 and snap.waiting == 0 and snap.kv_used_tokens == 0


# ---- a rank that dies mid-run ------------------------------------------------------------------------------

def run_death_case(topology, case: EngineCase, die_after_plans: int) -> dict:
    runner = _runner(topology, case)
    if topology.rank != 0:
        _follow_then_die(runner, die_after_plans)
        return {}
    return asyncio.run(_serve_until_death(runner, case))


def _follow_then_die(runner, die_after_plans: int) -> None:
    """follow(), except that this rank exits hard (no clean-up, like a crash) after some plans with work."""
    channel = ControlChannel(runner.topology)
    attach_live_stats(runner)
    worked = 0
    while True:
        plan = channel.recv()
        runner.execute(plan)
        after_step(runner, plan)
        worked += bool(plan.work)
        if worked >= die_after_plans:
            os._exit(1)


async def _serve_until_death(runner, case: EngineCase) -> dict:
    fatal: list[str] = []
    config = EngineConfig.from_model_dir(case.ckpt, **ENGINE_KW)
    engine = start_engine(runner, config, on_fatal=fatal.append)
    streams = [engine.submit(GenerationRequest(request_id=f"d{i}", prompt_ids=(10 + i, 11, 12), max_tokens=40,
                                               sampling=SamplingParams(), ignore_eos=True)) for i in range(3)]

    async def consume(stream):
        return [d async for d in stream]

    t0 = time.monotonic()
    deltas = await asyncio.wait_for(asyncio.gather(*(consume(s) for s in streams)), WAIT_S)
    ended_s = time.monotonic() - t0
    await _until(lambda: not engine.health().ok, "health() to fail", 5.0)
    refused = None
    try:
        engine.submit(GenerationRequest(request_id="late", prompt_ids=(1,), max_tokens=1,
                                        sampling=SamplingParams()))
    except Exception as exc:  # noqa: BLE001 - the test checks the type by name
        refused = type(exc).__name__
    engine.shutdown()
    return {"deltas": deltas, "ended_s": ended_s, "health": engine.health(), "fatal": fatal, "refused": refused}


# ---- an idle engine keeps its followers inside the collective timeout -----------------------------------------

def run_idle_case(topology, case: EngineCase, idle_s: float) -> dict:
    runner = _runner(topology, case)
    if topology.rank != 0:
        from epserve.engine.engine import follow
        return {"plans": follow(runner)}
    return asyncio.run(_serve_after_idle(runner, case, idle_s))


async def _serve_after_idle(runner, case: EngineCase, idle_s: float) -> dict:
    engine = start_engine(runner, EngineConfig.from_model_dir(case.ckpt, heartbeat_s=0.5))
    await asyncio.sleep(idle_s)
    health = engine.health()
    prompt, n = GREEDY["g0"]
    stream = engine.submit(GenerationRequest(request_id="after-idle", prompt_ids=prompt, max_tokens=n,
                                             sampling=SamplingParams()))

    async def consume():
        return [d async for d in stream]

    deltas = await asyncio.wait_for(consume(), WAIT_S)
    engine.shutdown()
    return {"health": health, "tokens": [t for d in deltas for t in d.token_ids],
            "finish": deltas[-1].finish_reason.value}


# ---- a rank that hangs (SIGSTOP): health() says so, and the engine resumes when it does ----------------------

def run_stall_case(topology, case: EngineCase, pid_dir: str) -> dict:
    runner = _runner(topology, case)
    pid_file = Path(pid_dir) / "rank1.pid"
    if topology.rank != 0:
        pid_file.write_text(str(os.getpid()))
        from epserve.engine.engine import follow
        return {"plans": follow(runner)}
    return asyncio.run(_serve_through_stall(runner, case, pid_file))


async def _serve_through_stall(runner, case: EngineCase, pid_file: Path) -> dict:
    import signal
    engine = start_engine(runner, EngineConfig.from_model_dir(case.ckpt, heartbeat_s=0.2, stuck_after_s=1.5))
    stream = engine.submit(GenerationRequest(request_id="stall", prompt_ids=(7, 8, 9), max_tokens=30,
                                             sampling=SamplingParams(), ignore_eos=True))
    it = stream.__aiter__()
    first = await asyncio.wait_for(it.__anext__(), WAIT_S)
    await _until(pid_file.exists, "rank 1's pid")
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        await _until(lambda: not engine.health().ok, "health() to report the stall", 10.0)
        stalled = (engine.health(), time.monotonic() - t0)
    finally:
        os.kill(pid, signal.SIGCONT)
    rest = await asyncio.wait_for(_drain(it), WAIT_S)
    await _until(lambda: engine.health().ok, "health() to recover", 10.0)
    engine.shutdown()
    return {"stalled": stalled, "tokens": [t for d in [first, *rest] for t in d.token_ids],
            "finish": rest[-1].finish_reason.value}


async def _drain(it) -> list:
    return [d async for d in it]
