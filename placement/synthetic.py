"""Synthetic routing traces with planted inter-layer affinity (for tests, scale benchmarks and the ILP study).

Shapes: T tokens, L MoE layers, K experts per token, E experts, Q clusters (E % Q == 0), V vocabulary size.

    token_ids_T (optional) --> cluster at layer 0 --(stay with prob. stickiness, else jump)--> cluster at l+1
    cluster c at layer l owns E/Q experts: perm_L[l, c*E/Q:(c+1)*E/Q]
    per token-layer: K distinct experts drawn without replacement (Gumbel top-k) from
        (1 - noise) x popularity within the cluster + noise x popularity over all experts
    --> weights: softmax of the perturbed scores of the K chosen, highest first

With Q = G and low noise the best placement puts each cluster's experts on one GPU in every layer; the
traffic then comes from cluster jumps and noise, which the caller controls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from placement.errors import InputError
from placement.trace import RoutingTrace


@dataclass(frozen=True, kw_only=True)
class SyntheticSpec:
    num_tokens: int
    num_layers: int
    num_experts: int
    top_k: int
    num_clusters: int = 8
    stickiness: float = 0.8     # probability that a token keeps its cluster from layer l to l+1
    noise: float = 0.2          # share of routing mass spread over all experts
    vocab_size: int = 0         # > 0: record token_ids; a token's id decides its first cluster
    id_fidelity: float = 0.9    # probability that the first cluster follows the token id
    seq_len: int = 0            # > 0: record seq_ids and positions (consecutive rows form sequences)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_tokens", "num_layers", "num_experts", "top_k", "num_clusters"):
            if getattr(self, name) < 1:
                raise InputError(f"synthetic {name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts % self.num_clusters:
            raise InputError(f"synthetic num_experts ({self.num_experts}) must be a multiple of num_clusters "
                             f"({self.num_clusters})")
        if self.top_k > self.num_experts:
            raise InputError(f"synthetic top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        for name in ("stickiness", "noise", "id_fidelity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"synthetic {name} must be in [0, 1], got {getattr(self, name)}")


def synthetic_trace(spec: SyntheticSpec) -> RoutingTrace:
    """Draw a trace from ``spec`` (deterministic for a given seed)."""
    rng = np.random.default_rng(spec.seed)
    T, L, E, K, Q = spec.num_tokens, spec.num_layers, spec.num_experts, spec.top_k, spec.num_clusters
    cluster_of_LE = _clusters(spec, rng)
    popularity_LE = rng.gamma(2.0, 1.0, size=(L, E))

    token_ids_T = None
    if spec.vocab_size > 0:
        token_ids_T = rng.integers(0, spec.vocab_size, size=T).astype(np.int32)
        id_cluster_V = rng.integers(0, Q, size=spec.vocab_size)
        follow_T = rng.random(T) < spec.id_fidelity
        cluster_T = np.where(follow_T, id_cluster_V[token_ids_T], rng.integers(0, Q, size=T))
    else:
        cluster_T = rng.integers(0, Q, size=T)

    experts_TLK = np.empty((T, L, K), dtype=np.int16)
    weights_TLK = np.empty((T, L, K), dtype=np.float32)
    for l in range(L):
        if l > 0:
            jump_T = rng.random(T) >= spec.stickiness
            cluster_T = np.where(jump_T, rng.integers(0, Q, size=T), cluster_T)
        in_cluster_TE = cluster_of_LE[l][None, :] == cluster_T[:, None]
        pop_E = popularity_LE[l]
        prob_TE = (1.0 - spec.noise) * in_cluster_TE * pop_E / _cluster_mass(pop_E, cluster_of_LE[l], Q)[cluster_T][:, None]
        prob_TE += spec.noise * pop_E / pop_E.sum()
        score_TE = np.log(prob_TE + 1e-12) + rng.gumbel(size=(T, E))
        top_TK = np.argsort(-score_TE, axis=1)[:, :K]
        experts_TLK[:, l] = top_TK
        chosen_TK = np.take_along_axis(score_TE, top_TK, axis=1)
        w_TK = np.exp(chosen_TK - chosen_TK[:, :1])
        weights_TLK[:, l] = w_TK / w_TK.sum(axis=1, keepdims=True)

    seq_T = pos_T = None
    if spec.seq_len > 0:
        seq_T = (np.arange(T) // spec.seq_len).astype(np.int32)
        pos_T = (np.arange(T) % spec.seq_len).astype(np.int32)
    meta = {"model": "synthetic", "source": "placement.synthetic", **{k: v for k, v in vars(spec).items()}}
    return RoutingTrace(experts_TLK, weights_TLK, E, token_ids_T, seq_T, pos_T, meta=meta)


def planted_placement(spec: SyntheticSpec, num_gpus: int) -> np.ndarray:
    """[L, E] GPU of each expert when every cluster's experts share a GPU (clusters dealt to GPUs in
    blocks); needs num_clusters to be a multiple of num_gpus. The reference a solver should approach."""
    if spec.num_clusters % num_gpus:
        raise InputError(f"{spec.num_clusters} clusters cannot be dealt evenly to {num_gpus} GPUs")
    cluster_of_LE = _clusters(spec, np.random.default_rng(spec.seed))
    return cluster_of_LE // (spec.num_clusters // num_gpus)


def _clusters(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """[L, E] cluster of each expert: a random permutation per layer cut into blocks (first rng draws)."""
    L, E = spec.num_layers, spec.num_experts
    size = E // spec.num_clusters
    cluster_of_LE = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        cluster_of_LE[l, rng.permutation(E)] = np.arange(E) // size
    return cluster_of_LE


def _cluster_mass(pop_E: np.ndarray, cluster_E: np.ndarray, Q: int) -> np.ndarray:
    """[Q] total popularity of each cluster's experts."""
    return np.bincount(cluster_E, pop_E, minlength=Q)
