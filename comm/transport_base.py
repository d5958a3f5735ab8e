"""What a transport takes and gives back, shared by every transport (comm/transport_counted.py,
comm/transport_fixed.py).

    Route (the policy's decisions for the tokens held here, device tensors + host metadata)
      --transport.dispatch--> ExpertWork (rows this rank runs its experts on) + a frozen handle
      --experts (caller)--> partial_HD --transport.combine(partial_HD, handle)--> Anchored

Legend: N tokens held here, H rows handled here (held first, then received), K top-k, D hidden, A tokens
anchored here, T step tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Route:
    """The tokens held on this rank at one MoE layer and where the policy sends them."""

    layer: int
    x_ND: torch.Tensor              # residual hidden states
    token_N: torch.Tensor           # device, step-local token indices (ascending)
    token_N_host: torch.Tensor      # the same on the host (CPU int64)
    topk_ids_NK: torch.Tensor
    topk_weights_NK: torch.Tensor   # float32
    rank_NK: torch.Tensor           # expert ranks (the placement's table)
    anchor_N: torch.Tensor          # where each token's partials are summed
    num_step_tokens: int            # T (host, identical on every rank)
    held_bound: int                 # no rank holds more tokens than this at this layer (host, identical)
    needs_combine: bool             # False: every rank knows no partial has to move (coherent, top-1)
    tokens_move: bool               # False: every token is anchored where it is held (two_a2a policies)


@dataclass(frozen=True)
class ExpertWork:
    """The rows this rank runs its experts on (held tokens first, then received ones)."""

    x_MD: torch.Tensor              # residual hidden states (the caller applies post_attention_layernorm)
    token_M: torch.Tensor           # step-local token indices (-1: an empty slot of a fixed buffer)
    topk_ids_MK: torch.Tensor
    topk_weights_MK: torch.Tensor   # float32
    use_MK: torch.Tensor            # bool: expert k of this row lives on this rank (and the row is real)


@dataclass(frozen=True)
class Anchored:
    """Tokens that live on this rank after a MoE layer, by step-local token index (ascending)."""

    token_A: torch.Tensor           # host (CPU int64)
    x_AD: torch.Tensor              # residual
    y_AD: torch.Tensor              # sum of the routed experts' weighted outputs
    overflow: torch.Tensor | None = None   # device bool (fixed transport): some row did not fit; rerun the step


def handled_rows(route: Route, got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Held rows followed by the received ones, as one set of [H, ...] tensors."""
    return {"x": torch.cat([route.x_ND, got["x"]]),
            "token": torch.cat([route.token_N.long(), got["token"][:, 0].long()]),
            "ids": torch.cat([route.topk_ids_NK.long(), got["topk_ids"].long()]),
            "w": torch.cat([route.topk_weights_NK.float(), got["topk_weights"]]),
            "rank": torch.cat([route.rank_NK.long(), got["ranks"].long()]),   # the source's choice of copy
            "anchor": torch.cat([route.anchor_N.long(), got["anchor"][:, 0].long()])}


def token_slots_T(token_H: torch.Tensor, valid_H: torch.Tensor, num_step_tokens: int) -> torch.Tensor:
    """[T + 1] row of each step token among the handled rows (entry T, and tokens not here: H, a spare row)."""
    H = token_H.shape[0]
    slot_T = torch.full((num_step_tokens + 1,), H, dtype=torch.long, device=token_H.device)
    idx = torch.where(valid_H, token_H, num_step_tokens)
    # invalid rows all write H into the spare entry T, so their order does not matter
    return slot_T.index_copy_(0, idx, torch.where(valid_H, torch.arange(H, device=token_H.device), H))
