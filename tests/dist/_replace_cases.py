"""Rank-side code of tests/dist/test_replace_live.py: generation with live placement swaps mid-run.

Each rank builds its Runner on the start placement, then ``generate`` runs with a boundary hook that plays,
at fixed steps, REPLACE_BEGIN (rank 0's bundle broadcast) --> each changed layer --> REPLACE_COMMIT for every
placement of the case in turn, while the prompts are being decoded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from comm.counters import CollKind
from comm.strategy import Strategy
from epserve.engine.builder import build_runner
from epserve.engine.control import ControlChannel
from epserve.engine.generate import generate
from epserve.engine.plan import REPLACE_BEGIN, REPLACE_COMMIT, REPLACE_NONE
from epserve.engine.replace import Bundle, LiveReplacement, expert_bytes_of
from epserve.model.loader import load_model
from placement.cluster import ClusterShape
from placement.moves import plan_moves
from placement.placement import Placement
from placement.transport import Transport
from tests.dist._runner_cases import DTYPES

PROMPTS = ((5, 6, 7, 8, 9, 10, 11), (12, 13), (3,), (40, 41, 42, 43, 44))
NEW = 32
WINDOW = 24                  # tokens of the live routing window (ring recorder)
FIRST_SWAP_STEP = 2          # after the prefill step and one decode step: every sequence is mid-flight


@dataclass(frozen=True)
class ReplaceCase:
    name: str
    ckpt: Path
    strategy: Strategy
    start: Placement
    targets: tuple[Placement, ...]     # swapped in one after the other
    transport: Transport = Transport.A2A
    dtype: str = "float32"
    step_experts: int | None = None    # the swap's byte budget per step, in expert copies (None: a layer)


def schedule(start: Placement, targets, *, expert_bytes: int, step_bytes: int | None
             ) -> dict[int, tuple[int, Bundle | None]]:
    """step -> (replace op, bundle): BEGIN, each schedule step, COMMIT; the next swap right after."""
    ops, step, current = {}, FIRST_SWAP_STEP, start
    for version, target in enumerate(targets, start=2):
        bundle = Bundle(target, None, version).scheduled(current, expert_bytes=expert_bytes, step_bytes=step_bytes)
        ops[step] = (REPLACE_BEGIN, bundle)
        step += 1
        for i in range(len(bundle.schedule)):
            ops[step] = (i, None)
            step += 1
        ops[step] = (REPLACE_COMMIT, None)
        step += 1
        current = target
    return ops


def run_replace_cases(topology, cases: list[ReplaceCase]) -> list[dict]:
    out = []
    for case in cases:
        runner = build_runner(case.ckpt, topology, strategy=case.strategy, placement=case.start,
                              kv_cache_tokens=512, kv_block_size=4, check_splits=True, transport=case.transport,
                              dtype=DTYPES[case.dtype], record_tokens=4096, window_tokens=WINDOW)
        live = LiveReplacement(runner, ControlChannel(topology, counters=runner.counters))
        per_expert = expert_bytes_of(runner)
        ops = schedule(case.start, case.targets, expert_bytes=per_expert,
                       step_bytes=None if case.step_experts is None else case.step_experts * per_expert)
        seen = []

        def hook(plan):
            op, bundle = ops.get(plan.step, (REPLACE_NONE, None))
            plan = dataclasses.replace(plan, replace=op)
            live.boundary(plan, bundle=bundle if topology.rank == 0 else None)
            seen.append((plan.step, op, len(plan.work)))
            return plan

        gen = generate(runner, [list(p) for p in PROMPTS], NEW, before_step=hook)
        final = case.targets[-1]
        want = {m: final.experts_on(topology.rank)[m].tolist() for m in range(final.num_layers)}
        ref, _ = load_model(case.ckpt, experts=want, dtype=DTYPES[case.dtype])
        same_weights = all(torch.equal(a.experts.gate_up_proj, b.experts.gate_up_proj)
                           and torch.equal(a.experts.down_proj, b.experts.down_proj)
                           for a, b in zip(runner.model.moe_blocks(), ref.moe_blocks()))
        moved = runner.counters.total(CollKind.WEIGHTS)
        full, window = runner.recorder.gather(runner.coll), runner.window.gather(runner.coll)   # collectives
        out.append({"tokens": gen.tokens, "loaded": {m: list(ids) for m, ids in runner.model.loaded_experts.items()},
                    "want": want, "same_weights": same_weights, "version": live.version,
                    "placement_is_final": runner.placement is final or np.array_equal(
                        runner.placement.copies_LEG, final.copies_LEG),
                    "table": runner.dispatcher.expert_to_rank_LE.cpu().numpy(),
                    "all_ops_ran": max(ops) < gen.steps, "moved_rows": moved.rows, "moved_payload": moved.payload_bytes, "steps": seen,
                    "busy_steps": [s for s, op, n in seen if op != REPLACE_NONE and n > 0],
                    "window_is_the_latest_routing": _window_is_tail(window, full)})
    return out


def _window_is_tail(window, full) -> bool:
    """The ring recorder holds the last WINDOW tokens the run fed, oldest first, as the first-N recorder does."""
    n = window.num_tokens
    return n == min(WINDOW, full.num_tokens) and all(
        np.array_equal(getattr(window, a), getattr(full, a)[-n:])
        for a in ("experts_TLK", "weights_TLK", "token_ids_T", "seq_ids_T", "positions_T"))


def expected_sent_rows(case: ReplaceCase, rank: int) -> int:
    """Expert copies ``rank`` sends over all the case's swaps (placement/moves.py's plan)."""
    total, current = 0, case.start
    for target in case.targets:
        plan = plan_moves(current.copies_LEG, target.copies_LEG, current.cluster.gpus_per_node)
        total += sum(mv.src == rank for moves in plan for mv in moves)
        current = target
    return total


def permuted(start: Placement, seed: int) -> Placement:
    g = np.random.default_rng(seed)
    return Placement(np.stack([g.permutation(row) for row in start.expert_to_gpu_LE]), start.cluster,
                     solver={"name": "permuted", "seed": seed})


def with_replicas(start: Placement, seed: int) -> Placement:
    """One extra slot per GPU holding a random expert it lacks (schema v2: replicas)."""
    g = np.random.default_rng(seed)
    copies = start.copies_LEG.copy()
    L, E, G = copies.shape
    for l in range(L):
        for gpu in range(G):
            copies[l, g.choice(np.flatnonzero(~copies[l, :, gpu])), gpu] = True
    return Placement.from_copies(copies, start.cluster, solver={"name": "replicas", "seed": seed})


def cluster_of(G: int, gpus_per_node: int) -> ClusterShape:
    return ClusterShape(nodes=G // gpus_per_node, gpus_per_node=gpus_per_node)
