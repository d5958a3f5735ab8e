"""Dispatcher = a policy (where tokens start and are summed: comm/policies.py) + a transport (how rows move:
comm/transport_counted.py, comm/transport_fixed.py), each picked once by Enum in ``make_dispatcher``.

    held tokens (x, routing) --policy: expert ranks, anchors--> Route
        --transport.dispatch--> ExpertWork + handle --experts (caller)--> partials
        --transport.combine(partials, handle)--> Anchored (tokens living here after the layer)

A new transport never rewrites a policy, and the other way round. ``dispatch`` returns a frozen handle that
``combine`` consumes; nothing about a call is kept on the dispatcher. Every rank calls every collective in the
same order, with zero rows where it has none.

Legend: T step tokens, N tokens held here, M rows computed here, K top-k, D hidden, L MoE layers, E experts.
"""

from __future__ import annotations

import torch

from comm.policies import POLICIES
from comm.primitives import Collectives
from comm.routes import expert_ranks_NK
from comm.strategy import Strategy
from comm.transport_base import Anchored, ExpertWork, Route
from comm.transport_counted import CountedTransport
from comm.transport_fixed import FixedTransport
from comm.transport_local import LocalTransport
from placement.errors import InputError
from placement.transport import DEFAULT_CAPACITY_FACTOR, Transport

__all__ = ["Anchored", "Dispatcher", "ExpertWork", "make_dispatcher"]


class Dispatcher:
    def __init__(self, policy, transport, transport_kind: Transport, coll: Collectives,
                 expert_to_rank_LE: torch.Tensor, *, check_splits: bool = False) -> None:
        self.policy, self.transport, self.transport_kind = policy, transport, transport_kind
        self.coll, self.expert_to_rank_LE, self.check_splits = coll, expert_to_rank_LE, check_splits

    # ---- the policy's questions ------------------------------------------------------------------------------
    @property
    def strategy(self) -> Strategy:
        return self.policy.strategy

    @property
    def replicated_kv(self) -> bool:
        return self.policy.replicated_kv

    @property
    def tokens_move(self) -> bool:
        return self.policy.tokens_move

    def start_ranks_T(self, **kw):
        return self.policy.start_ranks_T(**kw)

    def preferred_home_rank(self, prompt_ids) -> int | None:
        return self.policy.preferred_home_rank(prompt_ids)

    def grow_capacity(self) -> None:
        """After a step overflowed a fixed buffer (fixed transport only)."""
        self.transport.grow_capacity()

    # ---- moving rows --------------------------------------------------------------------------------------------
    def dispatch(self, x_ND: torch.Tensor, token_N_host: torch.Tensor, topk_ids_NK: torch.Tensor,
                 topk_weights_NK: torch.Tensor, is_prefill_N: torch.Tensor, *, layer: int, step_has_prefill: bool,
                 num_step_tokens: int, held_bound: int | None = None):
        """Send the held tokens (step-local indices ``token_N_host``, ascending, on the host) to their expert
        ranks. ``held_bound``: no rank holds more tokens at this layer (default: the step's tokens)."""
        if isinstance(self.transport, LocalTransport):   # one rank: no route to plan, nothing moves
            return self.transport.dispatch_local(x_ND, token_N_host, topk_ids_NK, topk_weights_NK)
        token_N = token_N_host.to(x_ND.device)
        rank_NK = expert_ranks_NK(self.expert_to_rank_LE[layer], topk_ids_NK)
        anchor_N = self.policy.anchor_N(rank_NK, topk_ids_NK, is_prefill_N, layer=layer)
        # debug check (tests run with check_splits): a host sync per layer, kept off the serving path
        if self.check_splits and not bool(((anchor_N[:, None] == rank_NK).any(1) | (anchor_N == self.coll.rank)).all()):
            raise RuntimeError(f"layer {layer}: an anchor rank holds neither the token nor one of its experts")
        route = Route(layer, x_ND, token_N, token_N_host, topk_ids_NK, topk_weights_NK, rank_NK, anchor_N,
                      num_step_tokens, num_step_tokens if held_bound is None else held_bound,
                      self.policy.needs_combine(step_has_prefill=step_has_prefill), self.policy.tokens_move)
        return self.transport.dispatch(route)

    def combine(self, partial_MD: torch.Tensor, handle) -> Anchored:
        return self.transport.combine(partial_MD, handle)


def make_dispatcher(strategy: Strategy, coll: Collectives, expert_to_rank_LE: torch.Tensor, *, top_k: int,
                    hidden_size: int, dtype: torch.dtype, transport: Transport = Transport.A2A,
                    capacity: int | None = None, capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
                    predictor=None, anchors=None, check_splits: bool = False) -> Dispatcher:
    """The one place a (strategy, transport) pair is turned into behaviour. ``anchors``: an AnchorTable
    (coherent strategies); ``capacity``: rows per peer of the fixed transport (default: from each step)."""
    G, topo = coll.world_size, coll.topology
    if expert_to_rank_LE.ndim != 2 or int(expert_to_rank_LE.max()) >= G or int(expert_to_rank_LE.min()) < 0:
        raise InputError(f"expert_to_rank must be a [layers, experts] table of ranks in [0, {G})")
    if strategy.needs_predictor and predictor is None:
        raise InputError(f"strategy {strategy.value} needs a predictor (build one with the placement tools from "
                         f"a trace with vocabulary ids)")
    if transport is Transport.NODE_AWARE and topo.nodes < 2:
        raise InputError("transport node_aware needs at least 2 nodes (on one node every transfer is intra-node: "
                         "use a2a or fixed)")
    e2r_LE = expert_to_rank_LE.to(device=topo.device, dtype=torch.long)
    anchor_score_LEG = None
    if anchors is not None:
        anchors.check_fits(e2r_LE.cpu().numpy(), G)
        anchor_score_LEG = torch.as_tensor(anchors.score_LEG, dtype=torch.long, device=topo.device)
    policy = POLICIES[strategy](rank=coll.rank, top_k=top_k, predictor=predictor, anchor_score_LEG=anchor_score_LEG)
    if G == 1:
        mover = LocalTransport()
    elif transport is Transport.FIXED:
        mover = FixedTransport(coll, e2r_LE, top_k=top_k, hidden_size=hidden_size, dtype=dtype, capacity=capacity,
                               capacity_factor=capacity_factor)
    else:
        group = topo.gpus_per_node if transport is Transport.NODE_AWARE else 1
        mover = CountedTransport(coll, e2r_LE, group_size=group, top_k=top_k, hidden_size=hidden_size, dtype=dtype)
    return Dispatcher(policy, mover, transport, coll, e2r_LE, check_splits=check_splits)
