"""The multi-rank grid: built and spawned once per world size per session, shared by the dist tests."""

from __future__ import annotations

import pytest

from comm.spawn import spawn_ranks
from tests.dist._dispatch_cases import dispatch_cases
from tests.dist._grid import GPUS_PER_NODE, Grid, run_grid
from tests.dist._runner_cases import runner_cases


@pytest.fixture(scope="session")
def dist_models(tiny_checkpoint) -> dict:
    return {
        "mixtral_top2": tiny_checkpoint("mixtral"),
        "mixtral_top1": tiny_checkpoint("mixtral", num_experts_per_tok=1),
        # shared expert; dense first and last layers around one MoE layer (a trailing K/V group)
        "qwen2_dense_shared": tiny_checkpoint("qwen2_moe", mlp_only_layers=[0, 2]),
        "qwen3_top2": tiny_checkpoint("qwen3_moe"),
        # top-k >= 3: partial sums from several ranks per token (16 experts: 4 per rank at 4 ranks)
        "qwen3_top8": tiny_checkpoint("qwen3_moe", num_experts=16, num_experts_per_tok=8),
        # MLA (latent K/V cache), sigmoid group-limited top-4 router, shared expert, a first dense layer
        "deepseek_v3": tiny_checkpoint("deepseek_v3"),
        # fewer experts than ranks (Mixtral's 8 experts on 16 GPUs, in small): only replicated placements fit
        "mixtral_2experts": tiny_checkpoint("mixtral", num_local_experts=2, num_experts_per_tok=1),
    }


@pytest.fixture(scope="session")
def dist_grid(dist_models, tmp_path_factory):
    """``G -> (Grid, per_rank_results)``; results[r]["dispatch" | "runner"][i] belongs to the i-th case."""
    done: dict[int, tuple[Grid, list]] = {}

    def get(G: int):
        if G not in done:
            grid = Grid(G, tuple(dispatch_cases(G, G // GPUS_PER_NODE[G])), tuple(runner_cases(dist_models, G, GPUS_PER_NODE[G], tmp_path_factory.mktemp(f"grid{G}"))))
            done[G] = (grid, spawn_ranks(run_grid, G, (grid,), gpus_per_node=GPUS_PER_NODE[G], timeout_s=420))
        return done[G]

    return get
