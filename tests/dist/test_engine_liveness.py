"""Liveness over 2 gloo ranks. An engine left idle for longer than the collective timeout keeps its follower
alive with heartbeat plans, then serves normally. A rank that dies mid-run (os._exit after a few steps, like a
crash): the engine on rank 0 ends every open stream with an ERROR delta naming the failure, health() turns
not-ok, on_fatal is called, and new requests are refused with EngineUnavailableError. A rank that hangs
(SIGSTOP): health() says no step finished, and the engine resumes when the rank does. Every wait is bounded.

spawn_ranks stops the whole group as soon as one rank dies, so this test runs its own small harness over the
same per-rank entry point (comm.spawn._rank_main): it waits for rank 0's result and ignores rank 1's death.
"""

from __future__ import annotations

import multiprocessing
import pickle
import tempfile
import time
from pathlib import Path

import pytest

from comm.spawn import _rank_main, free_port
from comm.strategy import Strategy
from tests.dist._engine_cases import GREEDY, EngineCase, run_death_case, run_idle_case, run_stall_case

COLLECTIVE_TIMEOUT_S = 20.0
HARNESS_TIMEOUT_S = 90.0


def _run_two_ranks(fn, args: tuple, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> dict:
    """Rank 0's result of fn(topology, *args) on 2 ranks (rank 1 may die), with rank 1's exit code."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="epserve-death-") as out:
        procs = [ctx.Process(target=_rank_main, daemon=True, name=f"ep-rank{r}",
                             args=(fn, r, 2, 2, port, args, out, collective_timeout_s)) for r in range(2)]
        for p in procs:
            p.start()
        result = Path(out) / "rank0.pkl"
        deadline = time.monotonic() + HARNESS_TIMEOUT_S
        try:
            while not result.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank 0 gave no result within {HARNESS_TIMEOUT_S:.0f} s")
                if not procs[0].is_alive() and not result.exists():
                    raise RuntimeError(f"rank 0 died with exit code {procs[0].exitcode}")
                time.sleep(0.05)
            payload = pickle.loads(result.read_bytes())
            procs[1].join(timeout=10)
            exit1 = procs[1].exitcode
            rank1 = Path(out) / "rank1.pkl"
            rank1_ok = rank1.exists() and pickle.loads(rank1.read_bytes())["ok"]
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
    if not payload["ok"]:
        raise RuntimeError(f"rank 0 failed:\n{payload['error']}")
    return {**payload["result"], "rank1_exit": exit1, "rank1_ok": rank1_ok}


@pytest.mark.dist
@pytest.mark.parametrize("strategy", [Strategy.TWO_A2A, Strategy.COHERENT])
def test_rank_death_ends_every_stream_with_error(tiny_checkpoint, tmp_path, strategy):
    case = EngineCase(strategy.value, tiny_checkpoint("mixtral"), strategy, tmp_path / "unused.npz")
    res = _run_two_ranks(run_death_case, (case, 4))
    assert res["rank1_exit"] == 1 and not res["rank1_ok"]
    for deltas in res["deltas"]:
        *tokens, last = deltas
        assert 1 <= sum(len(d.token_ids) for d in tokens) + len(last.token_ids) < 40   # it ran, then stopped
        assert last.finish_reason.value == "error" and "engine step failed" in last.error, last
        assert all(d.finish_reason is None for d in tokens)
    assert res["ended_s"] < COLLECTIVE_TIMEOUT_S + 5
    assert not res["health"].ok and "engine step failed" in res["health"].reason
    assert len(res["fatal"]) == 1 and res["fatal"][0] == res["health"].reason
    assert res["refused"] == "EngineUnavailableError"


@pytest.mark.dist
@pytest.mark.slow
def test_idle_engine_heartbeats_keep_followers_inside_the_timeout(tiny_checkpoint, tmp_path):
    from epserve.model.loader import load_model
    ckpt = tiny_checkpoint("mixtral")
    case = EngineCase("two_a2a", ckpt, Strategy.TWO_A2A, tmp_path / "unused.npz")
    timeout_s = 4.0
    res = _run_two_ranks(run_idle_case, (case, 2.0 * timeout_s), collective_timeout_s=timeout_s)
    assert res["rank1_exit"] == 0 and res["rank1_ok"] and res["health"].ok
    prompt, n = GREEDY["g0"]
    model, _ = load_model(ckpt)
    assert res["tokens"] == model.greedy_reference([list(prompt)], n)[0] and res["finish"] == "length"


@pytest.mark.dist
def test_stalled_rank_fails_health_then_the_engine_resumes(tiny_checkpoint, tmp_path):
    from epserve.model.loader import load_model
    ckpt = tiny_checkpoint("mixtral")
    case = EngineCase("coherent", ckpt, Strategy.COHERENT, tmp_path / "unused.npz")
    res = _run_two_ranks(run_stall_case, (case, str(tmp_path)))
    health, after_s = res["stalled"]
    assert not health.ok and health.reason.startswith("no step finished for") and after_s < 10
    model, _ = load_model(ckpt)
    assert res["tokens"] == model.greedy_reference([[7, 8, 9]], 30)[0] and res["finish"] == "length"
    assert res["rank1_ok"]
