"""Live re-placement, the part every rank runs: a new placement swapped in at step boundaries, one MoE layer
per step, expert weights moved between ranks (never re-read from disk), requests in flight untouched.

    every rank, at the boundary of a plan whose ``replace`` is set, before the step's tokens run:
      REPLACE_COLLECT  the live routing window --all-gather--> a RoutingTrace (rank 0 solves on it, in the
                       background: epserve/engine/replace_control.py)
      REPLACE_BEGIN    rank 0's bundle (new placement + predictor + version + the swap schedule: placement/moves.py,
                       each layer's expert moves in chunks of at most ``step_bytes`` per rank) --broadcast (CPU
                       group)--> every rank checks it; every send and receive size is in the schedule
      step i >= 0      schedule[i]: its moved experts as [gate_up | down] rows --ONE uneven all-to-all (counted:
                       CollKind.WEIGHTS, phase "replace")--> staged; at the layer's last chunk: the rank's new
                       stacked experts for the layer (kept experts copied, staged ones placed) --> the layer's
                       copy-choice row, anchor row and live-stats row switch; the next step routes it by the
                       new placement
      REPLACE_COMMIT   every table from the new placement (layers without moves too), the predictor, the
                       runner's placement: the swap is done

Why tokens do not change: every placement gives the one-process model's tokens (the lossless grid), and a
step boundary is where no hidden state is in flight; between the first and last layer a step runs some layers
by the old placement and others by the new, which is again just a placement. A stale predictor during the swap
only mispredicts (a wrong guess costs a transfer, never a token).

Legend: L MoE layers, E experts, G ranks, S slots (experts held here), D hidden, I expert intermediate size,
F = 2I x D + D x I (one expert's weights as one row).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
import torch

from comm.counters import CollKind
from epserve.engine.plan import REPLACE_BEGIN, REPLACE_COLLECT, REPLACE_COMMIT, REPLACE_NONE, StepPlan
from epserve.engine.runner import Runner
from epserve.model.experts import GroupedExperts
from placement.moves import ExpertMove, SwapStep, check_replaceable, swap_schedule
from placement.placement import Placement
from placement.trace import RoutingTrace

BUNDLE_PHASE = "replace_bundle"
WEIGHTS_PHASE = "replace"


@dataclass(frozen=True)
class Bundle:
    """What rank 0 broadcasts at REPLACE_BEGIN (pickled: it comes from rank 0 of the same job)."""

    placement: Placement
    predictor: object | None   # placement.predictor.SpeculativePredictor fitted for ``placement``, or None
    version: int
    schedule: tuple[SwapStep, ...] = field(default=())   # filled by ``scheduled`` before REPLACE_BEGIN

    def scheduled(self, old: Placement, *, expert_bytes: int, step_bytes: int | None) -> "Bundle":
        """This bundle with the schedule of its swap from ``old`` (placement/moves.py ``swap_schedule``)."""
        steps = swap_schedule(old.copies_LEG, self.placement.copies_LEG, old.cluster.gpus_per_node,
                              expert_bytes=expert_bytes, step_bytes=step_bytes)
        return Bundle(self.placement, self.predictor, self.version, tuple(steps))


def expert_bytes_of(runner: Runner) -> int:
    """Bytes of one routed expert's weights as served (gate, up, down)."""
    block = runner.model.moe_blocks()[0].experts
    per_expert = block.gate_up_proj.shape[1:].numel() + block.down_proj.shape[1:].numel()
    return per_expert * block.down_proj.element_size()


class LiveReplacement:
    """One rank's side of every swap during a run. Rank 0 passes the bundle at REPLACE_BEGIN; the others
    receive it. ``boundary`` returns the gathered trace at REPLACE_COLLECT (every rank), else None."""

    def __init__(self, runner: Runner, channel) -> None:
        self.runner, self.channel = runner, channel
        self.version = 1
        self._new: Bundle | None = None
        self._staged: dict[int, tuple] = {}   # experts received for the layer being moved (switches at its last)
        self.moved_bytes = 0      # expert weights this rank sent during the current / last swap

    @property
    def swapping(self) -> bool:
        return self._new is not None

    def boundary(self, plan: StepPlan, *, bundle: Bundle | None = None) -> RoutingTrace | None:
        op = plan.replace
        if op == REPLACE_NONE:
            return None
        if op == REPLACE_COLLECT:
            if self.runner.window is None:
                raise RuntimeError(f"rank {self.runner.topology.rank}: asked for the live routing window, but the "
                                   f"runner records none (build_runner(window_tokens=...))")
            return self.runner.window.gather(self.runner.coll)
        if op == REPLACE_BEGIN:
            self._begin(bundle)
        elif op == REPLACE_COMMIT:
            self._commit()
        elif op >= 0:
            self._swap_step(op)
        else:
            raise RuntimeError(f"step {plan.step}: unknown replace op {op}")
        return None

    # ---- the steps of a swap ----------------------------------------------------------------------------
    def _begin(self, bundle: Bundle | None) -> None:
        if self._new is not None:
            raise RuntimeError("a placement swap began while another one is running")
        rank = self.runner.topology.rank
        if rank == 0:
            if bundle is None:
                raise RuntimeError("rank 0 began a placement swap without a bundle")
            payload = pickle.dumps(bundle, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            payload = None
        if self.runner.topology.is_distributed:
            payload = self.channel.host.broadcast_bytes(payload, phase=BUNDLE_PHASE)
        bundle = pickle.loads(payload)
        old = self.runner.placement
        check_replaceable(old, bundle.placement)
        self._new, self._staged = bundle, {}
        # this rank's column of the new placement's copy rule, once per swap (every layer switch reads it)
        self._choice_LE = torch.as_tensor(bundle.placement.copy_choice_LEG[:, :, self.runner.topology.rank])
        self.moved_bytes = 0

    def _swap_step(self, i: int) -> None:
        step, new = self._new.schedule[i], self._new.placement
        block = self.runner.model.moe_blocks()[step.layer]
        self._staged.update(self._exchange(block.experts, step.moves, step.layer))
        if step.last:
            block.experts = _restacked(block.experts, new.experts_on(self.runner.topology.rank)[step.layer],
                                       self._staged)
            self._staged = {}
            self._switch_tables(new, layers=[step.layer])

    def _commit(self) -> None:
        bundle = self._new
        self._switch_tables(bundle.placement, layers=range(bundle.placement.num_layers))
        policy = self.runner.dispatcher.policy
        if bundle.predictor is not None and policy.predictor is not None:
            policy.predictor = bundle.predictor
        self.runner.placement = bundle.placement
        self.version, self._new = bundle.version, None

    # ---- pieces -----------------------------------------------------------------------------------------
    def _exchange(self, experts: GroupedExperts, moves: tuple[ExpertMove, ...], m: int) -> dict[int, tuple]:
        """Send the experts this rank gives away in ``moves`` (of layer m), receive the ones it gains: {expert:
        (gate_up, down)}. No call when nothing moves (every rank knows it from the schedule)."""
        if not moves:
            return {}
        coll, me, G = self.runner.coll, self.runner.topology.rank, self.runner.topology.world_size
        sends = sorted((mv for mv in moves if mv.src == me), key=lambda mv: (mv.dst, mv.expert))
        recvs = sorted((mv for mv in moves if mv.dst == me), key=lambda mv: (mv.src, mv.expert))
        gate_up, down = experts.gate_up_proj, experts.down_proj
        F2, I = gate_up[0].numel(), down.shape[-1]
        rows = [torch.cat([gate_up[experts.expert_ids.index(mv.expert)].reshape(-1),
                           down[experts.expert_ids.index(mv.expert)].reshape(-1)]) for mv in sends]
        send_SF = torch.stack(rows) if rows else gate_up.new_zeros(0, F2 + down[0].numel())
        send_counts = np.bincount([mv.dst for mv in sends], minlength=G).tolist()
        recv_counts = np.bincount([mv.src for mv in recvs], minlength=G).tolist()
        recv_RF, _ = coll.all_to_all_rows(send_SF, send_counts, recv_counts, kind=CollKind.WEIGHTS,
                                          phase=WEIGHTS_PHASE, layer=m,
                                          payload_bytes_per_row=send_SF.shape[1] * send_SF.element_size())
        self.moved_bytes += send_SF.numel() * send_SF.element_size()
        D = down.shape[1]
        return {mv.expert: (recv_RF[r, :F2].view(2 * I, D), recv_RF[r, F2:].view(D, I))
                for r, mv in enumerate(recvs)}

    def _switch_tables(self, new: Placement, *, layers) -> None:
        """The dispatcher's copy choice, the policy's anchor rows and the live stats' table for ``layers``."""
        runner, choice_LE = self.runner, self._choice_LE
        policy, stats = runner.dispatcher.policy, runner.live_stats
        table = runner.dispatcher.expert_to_rank_LE
        if new.anchors is not None and policy.anchor_score_LEG is None:   # an all-zero row: the top-1 rule
            policy.anchor_score_LEG = torch.zeros(new.anchors.shape, dtype=torch.long, device=table.device)
        for m in layers:
            table[m].copy_(choice_LE[m])
            if stats is not None and stats.expert_to_rank_LE is not table:
                stats.expert_to_rank_LE[m].copy_(choice_LE[m])
            if policy.anchor_score_LEG is None:
                continue
            if new.anchors is None:
                policy.anchor_score_LEG[m].zero_()
            else:
                policy.anchor_score_LEG[m].copy_(torch.as_tensor(new.anchors.score_LEG[m]))


def _restacked(old: GroupedExperts, new_ids: np.ndarray, received: dict[int, tuple]) -> GroupedExperts:
    """Layer m's experts for the new placement: kept experts copied from ``old``, gained ones from
    ``received``; one new [S', 2I, D] / [S', D, I] pair (the old tensors are freed with ``old``)."""
    gate_up, down = [], []
    for e in new_ids.tolist():
        if e in received:
            g, d = received[e]
        else:
            j = old.expert_ids.index(e)
            g, d = old.gate_up_proj[j], old.down_proj[j]
        gate_up.append(g)
        down.append(d)
    L = len(gate_up)
    if L == 0:
        shape_gu, shape_d = (0,) + tuple(old.gate_up_proj.shape[1:]), (0,) + tuple(old.down_proj.shape[1:])
        return GroupedExperts.from_stacked([], old.gate_up_proj.new_empty(shape_gu), old.down_proj.new_empty(shape_d),
                                           len(old.local_of_global_E))
    return GroupedExperts.from_stacked(new_ids.tolist(), torch.stack(gate_up).contiguous(),
                                       torch.stack(down).contiguous(), len(old.local_of_global_E))
