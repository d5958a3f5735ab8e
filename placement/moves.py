"""Expert moves: which GPU sends which expert's weights to which GPU when a running placement is replaced.

    old copies_LEG + new copies_LEG --plan_moves--> per MoE layer, the (expert, source, destination) moves:
        every copy the new placement puts on a GPU that did not hold that expert before is one move; a GPU that
        keeps an expert keeps its weights (no move). The source is an old copy of the expert: on the
        destination's node when there is one, else anywhere; among those, the one given the fewest sends so
        far in this layer (ties: the lowest GPU), so one GPU does not serve a layer's whole reshuffle alone.

    plan + a byte budget per step --swap_schedule--> SwapSteps: a layer's moves in chunks such that no GPU sends
        or receives more than ``step_bytes`` in one step (at least one expert copy per step); the layer switches
        to the new placement at its last chunk (a layer whose copies only shrink: one step, no moves)

The plan is a pure function of the two placements, so every rank computes the same one without talking: send
and receive sizes are known on both ends (an uneven all-to-all needs them).

Shapes: L MoE layers, E experts, G GPUs, P GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.errors import PlacementError


@dataclass(frozen=True)
class ExpertMove:
    expert: int
    src: int      # GPU that sends the weights (holds the expert in the old placement)
    dst: int      # GPU that receives them (holds it in the new placement, not in the old)


def check_replaceable(old, new) -> None:
    """Raise PlacementError, naming the field, unless ``new`` can replace ``old`` while serving: the same MoE
    layers, experts and cluster (``old``/``new``: placement.placement.Placement)."""
    if new.num_layers != old.num_layers:
        raise PlacementError(f"num_layers: the new placement has {new.num_layers} MoE layers, the running one "
                             f"{old.num_layers}")
    if new.num_experts != old.num_experts:
        raise PlacementError(f"num_experts: the new placement has {new.num_experts} experts, the running one "
                             f"{old.num_experts}")
    for name in ("nodes", "gpus_per_node"):
        if getattr(new.cluster, name) != getattr(old.cluster, name):
            raise PlacementError(f"cluster.{name}: the new placement has {getattr(new.cluster, name)}, the "
                                 f"running cluster {getattr(old.cluster, name)}")


def plan_moves(old_copies_LEG: np.ndarray, new_copies_LEG: np.ndarray, gpus_per_node: int
               ) -> list[list[ExpertMove]]:
    """Per layer, the moves sorted by (expert, destination). Both tables are bool [L, E, G]."""
    old, new = np.asarray(old_copies_LEG, dtype=bool), np.asarray(new_copies_LEG, dtype=bool)
    if old.shape != new.shape or old.ndim != 3:
        raise ValueError(f"copy tables must have one [L, E, G] shape, got {old.shape} and {new.shape}")
    L, E, G = old.shape
    P = gpus_per_node
    plan = []
    for l in range(L):
        sends_G = np.zeros(G, dtype=np.int64)
        moves = []
        for e, dst in np.argwhere(new[l] & ~old[l]):
            holders = np.flatnonzero(old[l, e])
            near = holders[holders // P == dst // P]
            pool = near if len(near) else holders
            src = int(pool[np.argmin(sends_G[pool])])   # argmin: first (lowest GPU) among the least used
            sends_G[src] += 1
            moves.append(ExpertMove(int(e), src, int(dst)))
        plan.append(moves)
    return plan


def moves_summary(plan: list[list[ExpertMove]], gpus_per_node: int, expert_bytes: int) -> dict:
    """Counts for reports: moves per layer, the largest, and the bytes (``expert_bytes`` per expert copy)."""
    per_layer = [len(m) for m in plan]
    cross = sum(mv.src // gpus_per_node != mv.dst // gpus_per_node for m in plan for mv in m)
    return {"moves": sum(per_layer), "moves_per_layer": per_layer, "max_moves_in_a_layer": max(per_layer, default=0),
            "cross_node_moves": int(cross), "bytes": sum(per_layer) * expert_bytes,
            "max_bytes_in_a_layer": max(per_layer, default=0) * expert_bytes}


@dataclass(frozen=True)
class SwapStep:
    """One step boundary's share of a swap: these moves of ``layer``; the layer switches after them if ``last``."""

    layer: int
    moves: tuple[ExpertMove, ...]
    last: bool


def swap_schedule(old_copies_LEG: np.ndarray, new_copies_LEG: np.ndarray, gpus_per_node: int, *,
                  expert_bytes: int, step_bytes: int | None) -> list[SwapStep]:
    """The steps of a swap, layer by layer in order (layers whose copies do not change take none). A chunk
    takes moves in plan order while every GPU's sent and received bytes stay within ``step_bytes`` (None: a
    whole layer per step)."""
    old, new = np.asarray(old_copies_LEG, dtype=bool), np.asarray(new_copies_LEG, dtype=bool)
    G = old.shape[2]
    steps = []
    for layer, moves in enumerate(plan_moves(old, new, gpus_per_node)):
        if np.array_equal(old[layer], new[layer]):
            continue
        chunks, chunk = [], []
        sent_G, recv_G = np.zeros(G, dtype=np.int64), np.zeros(G, dtype=np.int64)
        for mv in moves:
            over = step_bytes is not None and chunk and (
                sent_G[mv.src] + expert_bytes > step_bytes or recv_G[mv.dst] + expert_bytes > step_bytes)
            if over:
                chunks.append(chunk)
                chunk, sent_G[:], recv_G[:] = [], 0, 0
            chunk.append(mv)
            sent_G[mv.src] += expert_bytes
            recv_G[mv.dst] += expert_bytes
        chunks.append(chunk)
        steps += [SwapStep(layer, tuple(c), i == len(chunks) - 1) for i, c in enumerate(chunks)]
    return steps
