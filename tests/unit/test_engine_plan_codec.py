"""The step plan's compact wire encoding (epserve/engine/control.py): exact round trips, its size for decode
steps (what the control group carries every step), the pickle fallback, and malformed input."""

from __future__ import annotations

import pickle
import random
from dataclasses import fields

import pytest

from epserve.engine.control import (_CARRIED, COMPACT, FRAME_BYTES, MAX_FRAME_BYTES, PICKLED, decode_plan,
                                    encode_plan, next_frame_bytes)
from epserve.engine.plan import GREEDY, SamplingParams, SeqWork, StepPlan


def _decode_step(n: int, *, sampled: bool) -> StepPlan:
    """n decode sequences: ids 1000.., one token < 2^17 each, positions 200.., homes over 4 ranks."""
    rng = random.Random(n)
    return StepPlan(step=123_456, work=tuple(
        SeqWork(1000 + s, (rng.randrange(150_000),), 200 + s, s % 4,
                SamplingParams(temperature=0.7, top_p=0.9, seed=rng.getrandbits(63)) if sampled else GREEDY)
        for s in range(n)))


def _random_plan(rng: random.Random, step: int) -> StepPlan:
    work = []
    for i in range(rng.randrange(0, 12)):
        sampling = GREEDY if rng.random() < 0.5 else SamplingParams(
            temperature=rng.choice([0.0, 0.3, 1.7]), top_p=rng.choice([1.0, 0.95]), top_k=rng.choice([0, 5, 300]),
            seed=rng.randrange(-2 ** 63, 2 ** 63))
        n = rng.choice([1, 1, 3, 700])
        work.append(SeqWork(rng.randrange(0, 2 ** rng.choice([4, 20, 40])) * 16 + i,
                            tuple(rng.randrange(0, 2 ** rng.choice([7, 15, 31])) for _ in range(n)),
                            rng.randrange(0, 40_000), rng.randrange(0, 64), sampling, rng.random() < 0.8))
    return StepPlan(step=step, work=tuple(work), release=tuple(rng.sample(range(10 ** 6), rng.randrange(0, 5))),
                    shutdown=rng.random() < 0.1, stats=rng.random() < 0.3,
                    save_trace_to=rng.choice([None, "/tmp/trace.npz", "/tmp/träce ü.npz"]))


def test_random_plans_round_trip_exactly_without_pickle():
    rng = random.Random(0)
    for step in range(300):
        plan = _random_plan(rng, step)
        data = encode_plan(plan)
        assert data[0] == COMPACT and decode_plan(data) == plan


def test_decode_step_sizes():
    # header 26 bytes, then 1 width byte per integer column: 6 per-work columns (seq_id, start_pos i2;
    # home, count, sampling index, sample i1), tokens i4, release (empty); the sampling table: temperature
    # and top_p f8, top_k i1, seed (i1 for greedy's 0, i8 for a drawn one)
    header, columns = 26, 6 + 1 + 1 + 2
    for n in (8, 64):
        assert len(encode_plan(_decode_step(n, sampled=False))) == header + columns + 8 * n + 4 * n + 16 + 1 + 1
        assert len(encode_plan(_decode_step(n, sampled=True))) == header + columns + 8 * n + 4 * n + 16 * n + 9 * n
    assert len(encode_plan(_decode_step(8, sampled=False))) == 150
    assert len(encode_plan(_decode_step(64, sampled=False))) == 822
    # the same plans pickled (the encoding before; 577 and 2707 bytes on CPython 3.11) are over 3x larger
    for n in (8, 64):
        plan = _decode_step(n, sampled=False)
        assert len(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)) > 3 * len(encode_plan(plan))
    assert len(encode_plan(StepPlan(step=7))) == 36                                    # a heartbeat


def test_next_frame_follows_the_message_with_headroom():
    # u32 length prefix + message + 25%, up to a multiple of 64, within [FRAME_BYTES, MAX_FRAME_BYTES]
    assert FRAME_BYTES == 128
    assert next_frame_bytes(4 + 36) == 128                  # heartbeat
    assert next_frame_bytes(4 + 150) == 256                 # decode, 8 greedy sequences
    assert next_frame_bytes(4 + 822) == 1088                # decode, 64 greedy sequences
    assert next_frame_bytes(10 ** 6) == MAX_FRAME_BYTES
    assert next_frame_bytes(40, min_frame_bytes=512) == 512


def test_plans_outside_the_compact_format_go_pickled():
    for plan in (StepPlan(step=1, work=(SeqWork(1, (2,), 0, 0, SamplingParams(seed=2 ** 64)),)),
                 StepPlan(step=2 ** 63),
                 StepPlan(step=3, work=(SeqWork(1, (2.5,), 0, 0),)),
                 StepPlan(step=4, work=(SeqWork(1, ("2",), 0, 0),)),
                 StepPlan(step=5, work=(SeqWork(1, (2,), 0, 0, SamplingParams(top_k=1.5)),))):
        data = encode_plan(plan)
        assert data[0] == PICKLED and decode_plan(data) == plan


def test_integer_floats_numpy_ints_and_int_flags_round_trip_equal():
    import numpy as np
    plan = StepPlan(step=1, work=(SeqWork(np.int64(5), (np.int32(7), 8), 3, 1, SamplingParams(temperature=1),
                                          sample=1),))
    data = encode_plan(plan)
    assert data[0] == COMPACT and decode_plan(data) == plan


def test_malformed_plans_raise_naming_the_channel():
    data = encode_plan(_decode_step(8, sampled=True))
    for bad in (b"", bytes([9]) + data[1:], data[:-1], data + b"\0", data[:30]):
        with pytest.raises(RuntimeError, match="control channel"):
            decode_plan(bad)
    with pytest.raises(RuntimeError, match="expected a StepPlan"):
        decode_plan(bytes([PICKLED]) + pickle.dumps({"step": 1}))


def test_the_codec_carries_every_plan_field():
    for cls, names in _CARRIED.items():
        assert {f.name for f in fields(cls)} == names, cls.__name__
