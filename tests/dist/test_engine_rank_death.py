"""A rank that dies mid-run (os._exit after a few steps, like a crash): the engine on rank 0 ends every open
stream with an ERROR delta naming the failure, health() turns not-ok, on_fatal is called, and new requests
are refused with EngineUnavailableError. Every wait is bounded.

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
from tests.dist._engine_cases import EngineCase, run_death_case

COLLECTIVE_TIMEOUT_S = 20.0
HARNESS_TIMEOUT_S = 90.0


def _run_rank0_despite_death(case: EngineCase, die_after_plans: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="epserve-death-") as out:
        procs = [ctx.Process(target=_rank_main, daemon=True, name=f"ep-rank{r}",
                             args=(run_death_case, r, 2, 2, port, (case, die_after_plans), out,
                                   COLLECTIVE_TIMEOUT_S)) for r in range(2)]
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
            procs[1].join(timeout=5)
            exit1 = procs[1].exitcode
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
    if not payload["ok"]:
        raise RuntimeError(f"rank 0 failed:\n{payload['error']}")
    return {**payload["result"], "rank1_exit": exit1}


@pytest.mark.dist
@pytest.mark.parametrize("strategy", [Strategy.TWO_A2A, Strategy.COHERENT])
def test_rank_death_ends_every_stream_with_error(tiny_checkpoint, tmp_path, strategy):
    case = EngineCase(strategy.value, tiny_checkpoint("mixtral"), strategy, tmp_path / "unused.npz")
    res = _run_rank0_despite_death(case, die_after_plans=4)
    assert res["rank1_exit"] == 1
    for deltas in res["deltas"]:
        *tokens, last = deltas
        assert 1 <= sum(len(d.token_ids) for d in tokens) + len(last.token_ids) < 40   # it ran, then stopped
        assert last.finish_reason.value == "error" and "engine step failed" in last.error, last
        assert all(d.finish_reason is None for d in tokens)
    assert res["ended_s"] < COLLECTIVE_TIMEOUT_S + 5
    assert not res["health"].ok and "engine step failed" in res["health"].reason
    assert len(res["fatal"]) == 1 and res["fatal"][0] == res["health"].reason
    assert res["refused"] == "EngineUnavailableError"
