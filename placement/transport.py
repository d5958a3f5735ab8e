"""Transports: how the rows a policy asks for are moved (shared by the simulator, the cost model and comm/).

A policy (two_a2a, coherent, speculative, ...) decides, per token and MoE layer, its position rank c (where its
hidden state is), its expert ranks R (deduplicated) and its anchor a (a in R or a == c; where its partial
outputs are summed and where it lives afterwards). A transport moves those rows. Shapes: G ranks, N nodes.

    a2a        dispatch: c -> r for r in R \\ {c};  combine: r -> a for r in R \\ {a}.
               A counts exchange precedes the data all-to-alls (one host sync per MoE layer).
    fixed      the same rows, in fixed per-peer buffers of ``capacity`` rows with a valid flag (no counts
               exchange, no host sync): every call puts (G - 1) x capacity rows on the wire. A step in which
               some rank had more rows for a peer than fit is run again with a doubled capacity (lossless).
    node_aware a token crosses to each other node at most once per layer, and partials are summed inside a
               node before they cross back (DeepEP's internode kernels). With R_n = R on node n, P GPUs per
               node, and pick_n(x) = the rank of R_n whose local index comes first at or after x's, cyclically
               (argmin over r in R_n of (r - x) mod P: like DeepEP's same-local-index rule, it spreads the relay
               work of different sources over a node's GPUs instead of piling it on the lowest rank):
               relay_n = a if a in R_n else pick_n(c);
                 dispatch   (stage 1): c -> r for r in R_{node(c)} \\ {c}            (intra-node)
                                       c -> relay_n for every other node n with R_n  (inter-node, once a node)
                 dispatch_intra (2):   relay_n -> r for r in R_n \\ {relay_n}, n != node(c)   (intra-node)
                 combine_intra  (3):   r -> t_n for r in R_n \\ {t_n}, every n, where t_n = a on node(a)
                                       and t_n = pick_n(a) elsewhere                  (intra-node)
                 combine        (4):   pick_n(a) -> a for every node n != node(a) with R_n   (inter-node)
               Total transfers equal a2a's (|R \\ {c}| and |R \\ {a}|); inter-node ones drop to at most
               (nodes with R other than c's) + (nodes with R other than a's).

Row counts that do not depend on the machine are the traffic model (placement/simulate.py counts them; the
runtime's CommCounters must equal it).
"""

from __future__ import annotations

import enum
import math

import numpy as np

from placement.errors import InputError, parse_enum

DEFAULT_CAPACITY_FACTOR = 2.0


class Transport(enum.Enum):
    A2A = "a2a"
    FIXED = "fixed"
    NODE_AWARE = "node_aware"

    @classmethod
    def parse(cls, name: str) -> "Transport":
        return parse_enum(cls, name, "transport")

    @property
    def needs_counts_exchange(self) -> bool:
        return self is not Transport.FIXED


def fixed_capacity(tokens: int, *, top_k: int, world_size: int, factor: float = DEFAULT_CAPACITY_FACTOR,
                   bound: int | None = None) -> int:
    """Rows per peer of the ``fixed`` transport for a step of ``tokens`` step tokens.

    A rank holds about tokens / G of them and sends each to a given peer with probability
    p = 1 - (1 - 1/G)^K under uniform routing; the capacity is ``factor`` times that expectation, rounded up
    to a power of two (few distinct shapes: what CUDA graphs need), and never more than ``bound`` (default
    ``tokens``: no rank can send a peer more rows than it holds), never less than 1.
    """
    if factor <= 0 or not math.isfinite(factor):
        raise InputError(f"transport capacity factor must be a finite number > 0, got {factor!r}")
    if tokens < 0 or world_size < 1 or top_k < 1:
        raise InputError(f"fixed_capacity needs tokens >= 0, world_size >= 1, top_k >= 1 "
                         f"(got {tokens}, {world_size}, {top_k})")
    bound = tokens if bound is None else min(bound, tokens)
    if world_size == 1 or bound <= 0:
        return max(1, bound)
    p = 1.0 - (1.0 - 1.0 / world_size) ** top_k
    want = max(1.0, factor * tokens / world_size * p)
    return max(1, min(bound, 1 << math.ceil(math.log2(want))))


# ---- the traffic model, counted (placement/simulate.py; the cost model reads the flows) ---------------------
# Phases in the order a MoE layer runs them; a2a and fixed use only "dispatch" and "combine".
PHASES = ("dispatch", "dispatch_intra", "combine_intra", "combine")
DISPATCH_PHASES = ("dispatch", "dispatch_intra")
COMBINE_PHASES = ("combine_intra", "combine")
_CHUNK_ELEMENTS = 1 << 22   # token-layer-slots per chunk: bounds the temporaries (~tens of MB)


def phase_flows(sorted_TLK: np.ndarray, first_TLK: np.ndarray, pos_TL: np.ndarray, anchor_TL: np.ndarray, *,
                transport: Transport, gpus_per_node: int, num_gpus: int) -> dict[str, np.ndarray]:
    """Transfers of every phase as {phase: int64 [L, G, G]} (source rank, destination rank), summed over tokens.

    ``sorted_TLK``: each token-layer's expert ranks, ascending; ``first_TLK``: True at the first slot of each
    distinct rank (R = sorted_TLK[first_TLK]); ``pos_TL`` / ``anchor_TL``: the position rank c and anchor a.
    Follows the module docstring exactly; vectorised, in chunks of tokens (no loop over tokens).
    """
    T, L, K = sorted_TLK.shape
    G = num_gpus
    flat = {phase: np.zeros(L * G * G, dtype=np.int64) for phase in _phases_of(transport)}
    layer_1L1 = np.arange(L, dtype=np.int64)[None, :, None]
    step = max(1, _CHUNK_ELEMENTS // max(1, L * K * (K if transport is Transport.NODE_AWARE else 1)))
    for lo in range(0, T, step):
        hi = min(T, lo + step)
        records = _records(sorted_TLK[lo:hi], first_TLK[lo:hi], pos_TL[lo:hi, :, None],
                           anchor_TL[lo:hi, :, None], transport, gpus_per_node)
        for phase, src, dst, mask in records:
            src, dst, mask = np.broadcast_arrays(src, dst, mask)
            key = (np.broadcast_to(layer_1L1, mask.shape)[mask] * G + src[mask]) * G + dst[mask]
            flat[phase] += np.bincount(key, minlength=L * G * G)
    return {phase: f.reshape(L, G, G) for phase, f in flat.items()}


def _phases_of(transport: Transport) -> tuple[str, ...]:
    return PHASES if transport is Transport.NODE_AWARE else ("dispatch", "combine")


def _records(r, first, c, a, transport: Transport, gpn: int):
    """(phase, source, destination, mask) per token-layer-slot; c and a are [T, L, 1]."""
    if transport is not Transport.NODE_AWARE:
        return [("dispatch", c, r, first & (r != c)), ("combine", r, a, first & (r != a))]
    node, nc, na = r // gpn, c // gpn, a // gpn
    first_node = np.ones_like(first)          # first slot of each node's ranks (ranks are sorted node-major)
    first_node[..., 1:] = node[..., 1:] != node[..., :-1]
    a_in_R = ((r == a) & first).any(axis=-1, keepdims=True)
    relay = np.where((node == na) & a_in_R, a, _pick(r, node, c, gpn))    # relay_n
    from_a = _pick(r, node, a, gpn)                                         # pick_n(a)
    target = np.where(node == na, a, from_a)                               # t_n
    return [("dispatch", c, r, first & (node == nc) & (r != c)),
            ("dispatch", c, relay, first_node & (node != nc)),
            ("dispatch_intra", relay, r, first & (node != nc) & (r != relay)),
            ("combine_intra", r, target, first & (r != target)),
            ("combine", from_a, a, first_node & (node != na))]


def _pick(r: np.ndarray, node: np.ndarray, x: np.ndarray, gpn: int) -> np.ndarray:
    """pick_n(x) for the node n of every slot: the rank of R_n whose local index comes first at or after x's
    (cyclically). [T, L, K] (x broadcasts from [T, L, 1])."""
    key = (r - x) % gpn
    same_node = node[..., :, None] == node[..., None, :]
    best = np.where(same_node, key[..., None, :], gpn).min(axis=-1)
    return node * gpn + (x % gpn + best) % gpn
