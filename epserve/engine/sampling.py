"""Sampling the next token: greedy, temperature, top-k, top-p, reproducible on whichever rank samples.

    logits_V --greedy?--> argmax (lowest id among equal maxima)
             --else: / temperature --> top-k cut --> top-p cut (smallest prefix of the sorted probabilities
               whose mass reaches p; the most likely token is always kept) --> multinomial with a generator
               seeded from (SamplingParams.seed, position of the new token)

The generator depends only on (seed, position), never on the rank, the batch or earlier draws, so coherent EP
(which samples a token on its final anchor rank) gives the same tokens as a one-process run.

Legend: N rows sampled, V vocabulary.
"""

from __future__ import annotations

import torch

from epserve.engine.plan import SamplingParams

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def token_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed mixed from the request seed and the position of the token being sampled."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 1


def filtered_probs_V(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 probabilities after temperature, top-k and top-p (non-greedy params only)."""
    scaled_V = logits_V.float() / params.temperature
    if 0 < params.top_k < scaled_V.numel():
        kth = torch.topk(scaled_V, params.top_k).values[-1]
        scaled_V = scaled_V.masked_fill(scaled_V < kth, float("-inf"))
    probs_V = torch.softmax(scaled_V, dim=-1)
    if params.top_p < 1.0:
        sorted_V, order_V = torch.sort(probs_V, descending=True, stable=True)
        mass_before_V = torch.cumsum(sorted_V, dim=-1) - sorted_V
        drop_V = mass_before_V >= params.top_p
        drop_V[0] = False
        probs_V = probs_V.clone()
        probs_V[order_V[drop_V]] = 0.0
        probs_V = probs_V / probs_V.sum()
    return probs_V


def sample_token(logits_V: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The next token id for one row; ``position`` is the position the new token will take."""
    if params.greedy:
        return int(torch.argmax(logits_V))  # host sync: the id leaves the device here
    gen = torch.Generator(device="cpu").manual_seed(token_seed(params.seed, position))
    probs_V = filtered_probs_V(logits_V.detach().to("cpu"), params)
    return int(torch.multinomial(probs_V, 1, generator=gen))


def sample_rows(logits_NV: torch.Tensor, params_N: list[SamplingParams], positions_N: list[int]) -> list[int]:
    """One token per row (rows are independent; see :func:`sample_token`)."""
    if logits_NV.shape[0] != len(params_N) or len(params_N) != len(positions_N):
        raise ValueError(f"{logits_NV.shape[0]} logit rows, {len(params_N)} params, {len(positions_N)} positions")
    out = torch.argmax(logits_NV, dim=-1).tolist() if params_N else []  # host sync, once for every greedy row
    for n, (p, pos) in enumerate(zip(params_N, positions_N)):
        if not p.greedy:
            out[n] = sample_token(logits_NV[n], p, pos)   # one host sync per sampled (non-greedy) row
    return out
