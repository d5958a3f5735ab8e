"""Refusals of the runner and its builder at world size 1: each names what is wrong, before anything runs."""

from __future__ import annotations

import numpy as np
import pytest

from comm.strategy import Strategy
from comm.topology import EPTopology
from epserve.engine.builder import build_runner
from epserve.engine.generate import generate
from epserve.engine.kv_cache import KVCacheFullError
from epserve.engine.plan import SeqWork, StepPlan
from placement.cluster import ClusterShape
from placement.errors import InputError, PlacementError
from placement.placement import Placement


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


def test_placement_that_does_not_fit_is_refused_by_name(mixtral):
    two_gpus = Placement(np.tile(np.arange(8) // 4, (2, 1)), ClusterShape(gpus_per_node=2))
    with pytest.raises(PlacementError, match="placement is for 2 GPUs, but the EP group has 1 ranks"):
        build_runner(mixtral, EPTopology.single(), strategy=Strategy.TWO_A2A, placement=two_gpus)
    three_layers = Placement(np.zeros((3, 8), dtype=np.int64), ClusterShape(gpus_per_node=1))
    with pytest.raises(PlacementError, match="placement is for 3 MoE layers x 8 experts, but the model has 2 x 8"):
        build_runner(mixtral, EPTopology.single(), strategy=Strategy.TWO_A2A, placement=three_layers)


def test_speculative_without_predictor_is_refused(mixtral):
    with pytest.raises(InputError, match="speculative needs a predictor"):
        build_runner(mixtral, EPTopology.single(), strategy=Strategy.SPECULATIVE)


def test_full_kv_cache_and_bad_plans_are_refused_before_the_step_runs(mixtral):
    runner = build_runner(mixtral, EPTopology.single(), strategy=Strategy.COHERENT, kv_cache_tokens=8,
                          kv_block_size=4)
    with pytest.raises(KVCacheFullError, match="needs 3 more blocks of 4 tokens, 2 of 2 are free"):
        runner.execute(StepPlan(step=0, work=(SeqWork(0, tuple(range(9)), 0, 0),)))
    assert runner.kv_stats().per_rank[0].used_blocks == 0            # nothing was reserved
    with pytest.raises(ValueError, match="seq 3: token id 999 is not in"):
        runner.execute(StepPlan(step=0, work=(SeqWork(3, (1, 999), 0, 0),)))
    with pytest.raises(ValueError, match="seq 4: home rank 1 is not in"):
        runner.execute(StepPlan(step=0, work=(SeqWork(4, (1,), 0, 1),)))
    with pytest.raises(ValueError, match="seq 5: the plan feeds positions from 2, but the KV cache of rank 0 holds 0"):
        runner.execute(StepPlan(step=0, work=(SeqWork(5, (1,), 2, 0),)))


def test_world_size_one_generate_matches_reference_and_frees_its_cache(mixtral):
    from epserve.model.loader import load_model
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    ref = load_model(mixtral)[0].greedy_reference(prompts, 4)
    for strategy in (Strategy.TWO_A2A, Strategy.COHERENT):
        runner = build_runner(mixtral, EPTopology.single(), strategy=strategy, kv_cache_tokens=64, kv_block_size=4)
        assert generate(runner, prompts, 4).tokens == ref
        stats = runner.kv_stats()
        assert stats.replicated == strategy.coherent and stats.per_rank[0].used_blocks == 0
        assert runner.counters.total().calls == 0                      # world size 1: nothing on the wire
