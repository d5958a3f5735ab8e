"""Scheduler decisions, plan by plan: token budget and chunked prefill, decode first, KV admission with
whole-life reservations (per rank, and replicated), queue limit, refusals naming the field, cancel -> release,
EOS / stop ids / max_tokens endings. Also EngineConfig validation and the Stream's event handling."""

from __future__ import annotations

import asyncio

import pytest

from epserve.engine.api import Delta, FinishReason, GenerationRequest, QueueFullError
from epserve.engine.engine import EngineConfig
from epserve.engine.plan import GREEDY, SamplingParams, SeqWork, StepPlan, StepResult
from epserve.engine.request import Stream
from epserve.engine.scheduler import Scheduler, SchedulerConfig

P10 = tuple(range(10, 20))


def make(**kw) -> Scheduler:
    base = dict(world_size=2, vocab_size=100, max_model_len=64, eos_token_ids=(2,), kv_block_size=4,
                kv_blocks_per_rank=8, replicated_kv=False, max_running_seqs=3, max_batched_tokens=8, max_waiting=4,
                retry_after_s=3)
    base.update(kw)
    preferred = base.pop("preferred", None)
    return Scheduler(SchedulerConfig(**base), preferred_home=preferred)


def req(rid: str, prompt, max_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=tuple(prompt), max_tokens=max_tokens,
                             sampling=kw.pop("sampling", GREEDY), **kw)


def result(step: int, ids: dict[int, int]) -> StepResult:
    return StepResult(step=step, next_token_ids=ids)


def test_budget_chunks_prefill_and_decode_goes_first():
    s = make()
    s.add(req("a", P10, 3))
    s.add(req("b", (40, 41, 42), 2))
    p0 = s.schedule(0)
    assert p0 == StepPlan(step=0, work=(SeqWork(0, P10[:8], 0, 0, GREEDY, sample=False),))
    assert s.num_running == 1 and s.num_waiting == 1
    p1 = s.schedule(1)
    # a: last 2 prompt tokens; b: admitted on rank 1 (rank 0 holds a's 3 reserved blocks), whole prompt fits
    assert p1 == StepPlan(step=1, work=(SeqWork(0, P10[8:], 8, 0, GREEDY), SeqWork(1, (40, 41, 42), 0, 1, GREEDY)))
    assert s.on_result(p1, result(1, {0: 7, 1: 9})) == [("a", Delta((7,))), ("b", Delta((9,)))]
    assert s.reserved_blocks() == [3, 1]   # ceil((10 + 3 - 1) / 4), ceil((3 + 2 - 1) / 4)
    p2 = s.schedule(2)
    assert p2.work == (SeqWork(0, (7,), 10, 0, GREEDY), SeqWork(1, (9,), 3, 1, GREEDY))
    assert (s.prompt_tokens, s.generation_tokens) == (13, 2)


def test_eos_stop_ids_and_max_tokens_end_requests_and_release_next_plan():
    s = make()
    s.add(req("eos", (5,), 5))
    s.add(req("ign", (6,), 5, ignore_eos=True))
    s.add(req("stopid", (7,), 5, ignore_eos=True, extra_stop_token_ids=(33,)))
    p0 = s.schedule(0)
    assert [w.seq_id for w in p0.work] == [0, 1, 2]
    assert s.on_result(p0, result(0, {0: 2, 1: 2, 2: 33})) == [
        ("eos", Delta((2,), FinishReason.STOP)), ("ign", Delta((2,))), ("stopid", Delta((33,), FinishReason.STOP))]
    p1 = s.schedule(1)
    assert p1.release == (0, 2) and p1.work == (SeqWork(1, (2,), 1, 1, GREEDY),)   # homes 0, 1, 0
    assert s.schedule(2).release == ()


def test_max_tokens_gives_length():
    s = make()
    s.add(req("a", (5, 6), 2))
    p0 = s.schedule(0)
    assert s.on_result(p0, result(0, {0: 11})) == [("a", Delta((11,)))]
    p1 = s.schedule(1)
    assert s.on_result(p1, result(1, {0: 12})) == [("a", Delta((12,), FinishReason.LENGTH))]
    assert not s.schedule(2).work and not s.has_work


def test_admission_waits_for_kv_then_reuses_released_blocks():
    s = make()   # 8 blocks of 4 tokens per rank
    for rid in "abc":
        s.add(req(rid, P10, 11))           # 10 + 11 - 1 = 20 positions: 5 blocks each
    p0 = s.schedule(0)                      # a on rank 0 (8 tokens of budget)
    p1 = s.schedule(1)                      # a's last 2 prompt tokens, then b on rank 1 (6 tokens)
    assert [(w.seq_id, w.home_rank, len(w.token_ids)) for w in p0.work + p1.work] == [(0, 0, 8), (0, 0, 2),
                                                                                       (1, 1, 6)]
    assert s.reserved_blocks() == [5, 5] and s.num_waiting == 1
    s.on_result(p1, result(1, {0: 3}))
    p2 = s.schedule(2)                      # c does not fit on either rank: it waits (no work for it)
    assert [w.seq_id for w in p2.work] == [0, 1] and s.num_waiting == 1
    assert s.cancel("a") == [("a", Delta(finish_reason=FinishReason.CANCELLED))]
    assert s.on_result(p2, result(2, {0: 4, 1: 5})) == [("b", Delta((5,)))]   # a's token (in flight) dropped
    p3 = s.schedule(3)
    assert p3.release == (0,)
    assert [(w.seq_id, w.home_rank, w.start_pos, len(w.token_ids)) for w in p3.work] == [(1, 1, 10, 1), (2, 0, 0, 7)]
    assert s.reserved_blocks() == [5, 5]


def test_replicated_kv_is_one_pool_for_every_rank():
    s = make(replicated_kv=True)
    s.add(req("a", P10, 11))
    s.add(req("b", (1, 2), 3))
    s.schedule(0)
    p1 = s.schedule(1)
    s.on_result(p1, result(1, {0: 3, 1: 4}))
    # b needs 1 block: 5 + 1 <= 8 fits; homes alternate by reserved blocks (rank 1 is emptier)
    assert [(w.seq_id, w.home_rank) for w in p1.work] == [(0, 0), (1, 1)]
    assert s.reserved_blocks() == [6, 6]
    s.add(req("c", P10, 11))
    assert [w.seq_id for w in s.schedule(2).work] == [0, 1] and s.num_waiting == 1


def test_max_running_seqs_and_preferred_home():
    s = make(max_running_seqs=2, preferred=lambda prompt: 1 if prompt[0] == 50 else None)
    s.add(req("a", (50,), 4))
    s.add(req("b", (51,), 4))
    s.add(req("c", (52,), 4))
    p0 = s.schedule(0)
    assert [(w.seq_id, w.home_rank) for w in p0.work] == [(0, 1), (1, 0)]
    assert (s.num_running, s.num_waiting) == (2, 1)


def test_queue_full_raises_with_retry_after():
    s = make(max_waiting=2)
    s.add(req("a", (1,), 1))
    s.add(req("b", (1,), 1))
    with pytest.raises(QueueFullError, match="full") as info:
        s.add(req("c", (1,), 1))
    assert info.value.retry_after_s == 3


@pytest.mark.parametrize("prompt,max_tokens,field", [
    ((1,) * 64, 1, "prompt: 64 tokens"),              # no room left in max_model_len 64
    ((1,) * 60, 5, "max_tokens: 5"),                   # 65 > 64
    ((1,) * 33, 1, "prompt: 33 tokens exceed the KV cache"),
    ((1,) * 20, 14, "max_tokens: 14 .* KV cache"),     # 33 positions > 32 slots of a rank
    ((1, 100), 1, "prompt: token id 100"),
])
def test_refuses_requests_that_can_never_run(prompt, max_tokens, field):
    s = make()
    with pytest.raises(ValueError, match=field):
        s.add(req("x", prompt, max_tokens))
    assert not s.has_work


def test_duplicate_request_id_is_refused():
    s = make()
    s.add(req("x", (1,), 1))
    with pytest.raises(ValueError, match="request_id"):
        s.add(req("x", (2,), 1))


def test_cancel_waiting_has_nothing_to_release_and_unknown_is_a_no_op():
    s = make(max_running_seqs=1)
    s.add(req("a", (1,), 3))
    s.add(req("b", (1,), 3))
    s.on_result(s.schedule(0), result(0, {0: 3}))
    assert s.cancel("b") == [("b", Delta(finish_reason=FinishReason.CANCELLED))]
    assert s.cancel("b") == [] and s.cancel("nope") == []
    assert s.schedule(1).release == () and s.num_waiting == 0


def test_abort_all_errors_everyone_and_releases_running():
    s = make(max_running_seqs=1)
    s.add(req("a", (1,), 3))
    s.add(req("b", (1,), 3))
    s.schedule(0)
    events = s.abort_all("boom")
    assert events == [("a", Delta(finish_reason=FinishReason.ERROR, error="boom")),
                      ("b", Delta(finish_reason=FinishReason.ERROR, error="boom"))]
    assert s.schedule(1) == StepPlan(step=1, release=(0,)) and not s.has_work


def test_sampling_params_travel_in_the_plan():
    s = make()
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=5)
    s.add(req("a", (1, 2), 3, sampling=params))
    assert s.schedule(0).work[0].sampling == params


@pytest.mark.parametrize("kw,match", [
    (dict(max_model_len=0), "max_model_len"), (dict(heartbeat_s=0), "heartbeat_s"),
    (dict(max_running_seqs=9, max_batched_tokens=8), "max_running_seqs"), (dict(eos_token_ids=(-1,)), "eos"),
    (dict(heartbeat_s=5, stuck_after_s=5), "heartbeat_s"), (dict(model_name=""), "model_name"),
])
def test_engine_config_validation(kw, match):
    base = dict(model_name="m", max_model_len=64, eos_token_ids=(2,))
    with pytest.raises(ValueError, match=match):
        EngineConfig(**{**base, **kw})


def test_engine_config_from_the_default_model():
    from epserve.engine.builder import build_runner  # noqa: F401 - the checkout's package must import
    from tests.conftest import REPO_ROOT
    cfg = EngineConfig.from_model_dir(REPO_ROOT / "epserve/assets/default_model", max_waiting=7)
    assert (cfg.model_name, cfg.max_model_len, cfg.eos_token_ids, cfg.max_waiting) == ("default_model", 512, (1, 5), 7)


def test_stream_ends_after_its_final_delta_and_cancel_once():
    cancels = []

    async def main():
        stream = Stream(req("a", (1, 2), 3), asyncio.get_running_loop(), cancels.append)
        stream.push_threadsafe(Delta((4,)))
        stream.cancel()
        stream.cancel()
        stream.push_threadsafe(Delta(finish_reason=FinishReason.CANCELLED))
        stream.push_threadsafe(Delta((5,)))          # after the end: dropped
        got = [d async for d in stream]
        stream.cancel()                              # finished: no-op
        return stream, got

    stream, got = asyncio.run(main())
    assert got == [Delta((4,)), Delta(finish_reason=FinishReason.CANCELLED)]
    assert cancels == ["a"] and stream.num_prompt_tokens == 2 and stream.finished
