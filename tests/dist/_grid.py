"""Everything the multi-rank tests run, in ONE spawned group per world size (spawning costs seconds per rank;
a case costs a fraction of one). tests/dist/conftest.py spawns each group once per session; the test modules
check their part of the results.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.dist._dispatch_cases import Case, run_dispatch_cases
from tests.dist._runner_cases import RunCase, run_runner_cases

GPUS_PER_NODE = {1: 1, 2: 2, 4: 2}   # 4 ranks run as 2 nodes x 2 GPUs, so cross-node counts are exercised


@dataclass(frozen=True)
class Grid:
    world_size: int
    dispatch: tuple[Case, ...]
    runner: tuple[RunCase, ...]

    def runner_index(self, name: str) -> int:
        return [c.name for c in self.runner].index(name)


def run_grid(topology, grid: Grid) -> dict:
    return {"dispatch": run_dispatch_cases(topology, list(grid.dispatch)),
            "runner": run_runner_cases(topology, list(grid.runner))}
