"""Sampling: greedy, temperature, top-k, top-p; the draw depends only on (seed, position)."""

from __future__ import annotations

import math

import torch

from epserve.engine.plan import SamplingParams
from epserve.engine.sampling import filtered_probs_V, sample_rows, sample_token, token_seed


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 0.0, 0.0]])
    assert sample_rows(logits, [SamplingParams()] * 2, [3, 4]) == [1, 0]


def test_draw_depends_only_on_seed_and_position():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=42)
    draws = [sample_token(logits, p, pos) for pos in range(40)]
    assert draws == [sample_token(logits, p, pos) for pos in range(40)]       # any rank, any time
    batch = sample_rows(torch.stack([logits] * 3), [p] * 3, [5, 6, 7])
    assert batch == draws[5:8]                                                  # batch-independent
    other = [sample_token(logits, SamplingParams(temperature=1.0, seed=43), pos) for pos in range(40)]
    assert other != draws
    assert token_seed(42, 5) != token_seed(42, 6) and 0 <= token_seed(2**70, 3) < 2**63


def test_mixed_batch_rows_are_each_sampled_as_alone():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    hot = SamplingParams(temperature=1.5, top_k=20, seed=7)
    params = [SamplingParams(), hot, SamplingParams(), hot]
    got = sample_rows(logits, params, [3, 4, 5, 6])
    assert got == [int(logits[0].argmax()), sample_token(logits[1], hot, 4), int(logits[2].argmax()),
                   sample_token(logits[3], hot, 6)]


def test_temperature_frequencies_follow_softmax():
    logits = torch.tensor([0.0, math.log(3.0)])        # probabilities 1/4, 3/4
    p = SamplingParams(temperature=1.0, seed=7)
    ones = sum(sample_token(logits, p, pos) for pos in range(4000)) / 4000
    assert abs(ones - 0.75) < 0.03
    hot = SamplingParams(temperature=1e6, seed=7)       # nearly uniform
    assert abs(sum(sample_token(logits, hot, pos) for pos in range(4000)) / 4000 - 0.5) < 0.03


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probs_V(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs = filtered_probs_V(logits, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))  # 0.5 + 0.3 reaches 0.8
    probs = filtered_probs_V(logits, SamplingParams(temperature=1.0, top_p=0.81))
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    probs = filtered_probs_V(logits, SamplingParams(temperature=1.0, top_p=0.01))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))      # the top token always stays
    p = SamplingParams(temperature=1.0, top_k=2, seed=1)
    assert {sample_token(logits, p, pos) for pos in range(300)} == {0, 1}
