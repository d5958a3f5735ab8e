"""Replicas for load: fill the redundant slots of a placement with copies of hot experts (EPLB-style, affinity-aware).

Shapes: L MoE layers, E experts, G GPUs, S slots per GPU (S x G >= E; S - (primaries on g) free slots on GPU g).

    placement (one copy per expert) or primaries [L, E] + trace (or load [L, E] / per-source load [L, E, G])
        --> n_LEG: activations of expert e from tokens held on GPU c (two_a2a: the token's home rank)
        --> per layer, until every GPU holds S copies:
              e = the expert whose copies carry the most load per copy (one with a GPU it can still go to)
              g = over GPUs with a free slot that do not hold e: the resulting max GPU load (the copy rule of
                  placement/replicas.py splits e's tokens over its copies by source), smallest first; among
                  those within ``tie_tolerance`` x mean of the smallest, or keeping max/mean <= max_imbalance,
                  the one whose neighbouring-layer experts co-occur most with e (adjacent-layer pair counts)
        --> Placement.from_copies(...), solver["replicas"] / objective["load"]: what was copied, max/mean before/after

Load model: exact for the two_a2a strategy (a token is on its home rank, seq_id % G, when it picks a copy); under
coherent a token picks the copy from where its previous layer left it, which this model does not follow.
"""

from __future__ import annotations

import numpy as np

from placement.cluster import ClusterShape
from placement.errors import InputError
from placement.placement import Placement
from placement.replicas import copy_choice_LEG
from placement.trace import RoutingTrace

DEFAULT_MAX_IMBALANCE = 1.05


def add_replicas(placement: Placement | np.ndarray, trace_or_load, slots_per_gpu: int, *,
                 max_imbalance: float = DEFAULT_MAX_IMBALANCE, cluster: ClusterShape | None = None,
                 affinity_LEE: np.ndarray | None = None, tie_tolerance: float = 0.005,
                 rebalance: bool = True, max_swaps: int = 64) -> Placement:
    """A v2 placement with ``slots_per_gpu`` copies on every GPU of every layer, the extra ones replicas of hot experts.

    ``placement``: a Placement (its copies are kept) or primaries ``expert_to_gpu_LE`` int [L, E] with ``cluster``
    (any number of experts per GPU up to S: fewer experts than GPUs works). ``trace_or_load``: a RoutingTrace
    (load per source rank and adjacent-layer co-occurrence come from it), float [L, E] load (sources uniform) or
    [L, E, G] load by source rank. ``affinity_LEE`` [L-1, E, E] overrides the trace's co-occurrence.
    """
    copies_LEG, cluster, base = _start(placement, cluster)
    L, E, G = copies_LEG.shape
    S = _check_slots(slots_per_gpu, copies_LEG, E, G)
    if not np.isfinite(max_imbalance) or max_imbalance < 1.0:
        raise InputError(f"max imbalance must be a number >= 1 (max / mean GPU load), got {max_imbalance!r}")
    n_LEG = _source_load(trace_or_load, L, E, G)
    if affinity_LEE is None:
        affinity_LEE = cooccurrence_LEE(trace_or_load) if isinstance(trace_or_load, RoutingTrace) and L > 1 \
            else np.zeros((max(L - 1, 0), E, E))
    if affinity_LEE.shape != (max(L - 1, 0), E, E):
        raise InputError(f"affinity must be [{L - 1}, {E}, {E}], got {affinity_LEE.shape}")
    P = cluster.gpus_per_node
    before_L = _max_over_mean_L(copies_LEG, n_LEG, P)
    added, swaps = [], []
    for l in range(L):
        added += [[l, e, g] for e, g in _fill_layer(copies_LEG, l, n_LEG[l], affinity_LEE, S, P,
                                                    max_imbalance, tie_tolerance)]
        if rebalance:
            swaps += [[l, *sw] for sw in _rebalance_layer(copies_LEG, l, n_LEG[l], affinity_LEE, P, max_imbalance,
                                                          tie_tolerance, max_swaps)]
    after_L = _max_over_mean_L(copies_LEG, n_LEG, P)
    solver = {**base.get("solver", {}), "replicas": {
        "slots_per_gpu": S, "max_imbalance": max_imbalance, "rule": "EPLB-style greedy, affinity-aware ties",
        "load_model": "two_a2a (copy by home rank)", "added": len(added), "copies_lej": added,
        "rebalance_swaps": len(swaps), "swaps_l_a_from_b_to": swaps}}
    objective = {**base.get("objective", {}), "load": {
        "max_over_mean_before_L": before_L.round(4).tolist(), "max_over_mean_L": after_L.round(4).tolist(),
        "max_over_mean": float(after_L.max()), "max_over_mean_before": float(before_L.max()),
        "mean_layer_max_over_mean": float(after_L.mean()), "within_bound": bool(after_L.max() <= max_imbalance)}}
    return Placement.from_copies(copies_LEG, cluster, solver=solver, objective=objective,
                                 trace=base.get("trace", {}))


def spread_primaries(num_layers: int, num_experts: int, num_gpus: int) -> np.ndarray:
    """int [L, E]: expert e on GPU e x G // E (E % G != 0 or E < G: floor or ceil of E / G experts per GPU)."""
    return np.tile(np.arange(num_experts) * num_gpus // num_experts, (num_layers, 1)).astype(np.int64)


def cooccurrence_LEE(trace: RoutingTrace) -> np.ndarray:
    """float [L-1, E, E]: tokens choosing expert i at layer l and j at l+1 (every top-k pair)."""
    T, L, K = trace.experts_TLK.shape
    E = trace.num_experts
    x_TLK = trace.experts_TLK.astype(np.int64)
    out = np.zeros((max(L - 1, 0), E, E))
    for l in range(L - 1):
        pair = (x_TLK[:, l, :, None] * E + x_TLK[:, l + 1, None, :]).ravel()
        out[l] = np.bincount(pair, minlength=E * E).reshape(E, E)
    return out


def load_max_over_mean_L(placement: Placement, trace_or_load) -> np.ndarray:
    """[L] max / mean GPU load of ``placement`` under this module's load model (two_a2a's copy choice)."""
    n_LEG = _source_load(trace_or_load, placement.num_layers, placement.num_experts, placement.num_gpus)
    return _max_over_mean_L(placement.copies_LEG, n_LEG, placement.cluster.gpus_per_node)


# ---- internals ------------------------------------------------------------------------------------------------
def _start(placement, cluster) -> tuple[np.ndarray, ClusterShape, dict]:
    if isinstance(placement, Placement):
        base = {"solver": dict(placement.solver), "objective": dict(placement.objective),
                "trace": dict(placement.trace)}
        return placement.copies_LEG.copy(), placement.cluster, base
    if cluster is None:
        raise InputError("add_replicas: pass cluster= with a primaries table")
    p_LE = np.asarray(placement)
    if p_LE.ndim != 2 or not np.issubdtype(p_LE.dtype, np.integer):
        raise InputError(f"primaries must be an integer [layers, experts] table, got {p_LE.dtype} {p_LE.shape}")
    G = cluster.num_gpus
    if p_LE.size and (p_LE.min() < 0 or p_LE.max() >= G):
        raise InputError(f"primaries hold GPU ids outside [0, {G})")
    copies_LEG = np.zeros((*p_LE.shape, G), dtype=bool)
    np.put_along_axis(copies_LEG, p_LE[:, :, None].astype(np.int64), True, axis=2)
    return copies_LEG, cluster, {"solver": {"name": "spread"}}


def _check_slots(slots_per_gpu, copies_LEG: np.ndarray, E: int, G: int) -> int:
    S = slots_per_gpu
    if not isinstance(S, (int, np.integer)) or isinstance(S, bool) or S < 1:
        raise InputError(f"slots per GPU must be a positive integer, got {S!r}")
    if S * G < E:
        raise InputError(f"{S} slots x {G} GPUs = {S * G} < {E} experts: every expert needs a slot")
    if S > E:
        raise InputError(f"{S} slots per GPU > {E} experts: a GPU holds at most one copy of an expert")
    held_LG = copies_LEG.sum(axis=1)
    over = np.argwhere(held_LG > S)
    if len(over):
        l, g = over[0]
        raise InputError(f"layer {l}: GPU {g} already holds {int(held_LG[l, g])} copies, more than {S} slots")
    return int(S)


def _source_load(trace_or_load, L: int, E: int, G: int) -> np.ndarray:
    """float [L, E, G]: activations of expert e at layer l from tokens whose home rank is c."""
    if isinstance(trace_or_load, RoutingTrace):
        from placement.simulate import sequence_order
        tr = trace_or_load
        if (tr.num_layers, tr.num_experts) != (L, E):
            raise InputError(f"trace is {tr.num_layers} layers x {tr.num_experts} experts, placement {L} x {E}")
        home_T = sequence_order(tr)[0].astype(np.int64) % G
        T, _, K = tr.experts_TLK.shape
        idx = (np.arange(L)[None, :, None] * E + tr.experts_TLK.astype(np.int64)) * G + home_T[:, None, None]
        return np.bincount(idx.ravel(), minlength=L * E * G).reshape(L, E, G).astype(np.float64)
    load = np.asarray(trace_or_load, dtype=np.float64)
    if load.shape == (L, E):
        return np.repeat(load[:, :, None] / G, G, axis=2)
    if load.shape == (L, E, G):
        return load.copy()
    raise InputError(f"load must be [{L}, {E}] or [{L}, {E}, {G}], got {load.shape}")


def _split_G(gpus_G: np.ndarray, n_G: np.ndarray, P: int) -> np.ndarray:
    """[G] load an expert held on ``gpus_G`` (bool) puts on each GPU, its per-source load ``n_G`` split by the rule."""
    choice_G = copy_choice_LEG(gpus_G[None, None, :], P)[0, 0]
    return np.bincount(choice_G, weights=n_G, minlength=len(n_G))


def _layer_load_G(copies_EG: np.ndarray, n_EG: np.ndarray, P: int) -> np.ndarray:
    return sum(_split_G(copies_EG[e], n_EG[e], P) for e in range(copies_EG.shape[0]))


def _max_over_mean_L(copies_LEG: np.ndarray, n_LEG: np.ndarray, P: int) -> np.ndarray:
    out = []
    for l in range(copies_LEG.shape[0]):
        load_G = _layer_load_G(copies_LEG[l], n_LEG[l], P)
        out.append(load_G.max() / load_G.mean() if load_G.mean() > 0 else 1.0)
    return np.array(out)


def _fill_layer(copies_LEG, l: int, n_EG, affinity_LEE, S: int, P: int, max_imbalance: float, tol: float):
    """Add copies to layer ``l`` (in place) until every GPU holds S; yields (expert, GPU) of each copy added."""
    c_EG = copies_LEG[l]
    E, G = c_EG.shape
    contrib_EG = np.stack([_split_G(c_EG[e], n_EG[e], P) for e in range(E)])
    load_G = contrib_EG.sum(axis=0)
    mean = load_G.mean()
    load_E = n_EG.sum(axis=1)
    while (free_G := S - c_EG.sum(axis=0)).any():
        open_EG = ~c_EG & (free_G > 0)[None, :]
        per_copy_E = np.where(open_EG.any(axis=1), load_E / c_EG.sum(axis=1), -np.inf)
        e = int(np.argmax(per_copy_E))
        gpus = np.flatnonzero(open_EG[e])
        new_max, new_rows = [], []
        for g in gpus:
            held = c_EG[e].copy()
            held[g] = True
            row_G = _split_G(held, n_EG[e], P)
            new_max.append((load_G - contrib_EG[e] + row_G).max())
            new_rows.append(row_G)
        new_max = np.array(new_max)
        ok = new_max <= max(new_max.min() + tol * mean, max_imbalance * mean)
        score = np.where(ok, _affinity_gain(copies_LEG, affinity_LEE, l, e, gpus), -np.inf)
        best = np.flatnonzero(score == score.max())
        k = best[np.argmin(new_max[best])]          # equal affinity: the lower max load, then the lower GPU id
        g = int(gpus[k])
        c_EG[e, g] = True
        load_G += new_rows[k] - contrib_EG[e]
        contrib_EG[e] = new_rows[k]
        yield e, g


def _rebalance_layer(copies_LEG, l: int, n_EG, affinity_LEE, P: int, max_imbalance: float, tol: float,
                     max_swaps: int):
    """Swap copies (a on the busiest GPU h <-> b on GPU g) while that lowers the max load above the bound;
    yields (a, h, b, g) of each swap."""
    c_EG = copies_LEG[l]
    E, G = c_EG.shape
    contrib_EG = np.stack([_split_G(c_EG[e], n_EG[e], P) for e in range(E)])
    load_G = contrib_EG.sum(axis=0)
    mean = load_G.mean()
    for _ in range(max_swaps):
        if load_G.max() <= max_imbalance * mean:
            return
        h = int(np.argmax(load_G))
        cands = []   # (new max, affinity change, a, b, g, row_a, row_b)
        for a in np.flatnonzero(c_EG[:, h]):
            for g in np.flatnonzero(~c_EG[a]):
                for b in np.flatnonzero(c_EG[:, g] & ~c_EG[:, h]):
                    held_a, held_b = c_EG[a].copy(), c_EG[b].copy()
                    held_a[h], held_a[g], held_b[g], held_b[h] = False, True, False, True
                    row_a, row_b = _split_G(held_a, n_EG[a], P), _split_G(held_b, n_EG[b], P)
                    new_max = (load_G - contrib_EG[a] - contrib_EG[b] + row_a + row_b).max()
                    if new_max < load_G.max() - 1e-9:
                        gains = _affinity_gain(copies_LEG, affinity_LEE, l, a, np.array([g, h]))
                        gains -= _affinity_gain(copies_LEG, affinity_LEE, l, b, np.array([g, h]))
                        cands.append((new_max, gains[0] - gains[1], a, b, g, row_a, row_b))
        if not cands:
            return
        best = min(c[0] for c in cands)
        ok = [c for c in cands if c[0] <= max(best + tol * mean, max_imbalance * mean)]
        new_max, _, a, b, g, row_a, row_b = max(ok, key=lambda c: (c[1], -c[0]))
        c_EG[a, h], c_EG[a, g], c_EG[b, g], c_EG[b, h] = False, True, False, True
        load_G += row_a + row_b - contrib_EG[a] - contrib_EG[b]
        contrib_EG[a], contrib_EG[b] = row_a, row_b
        yield int(a), h, int(b), int(g)


def _affinity_gain(copies_LEG, affinity_LEE, l: int, e: int, gpus: np.ndarray) -> np.ndarray:
    """[len(gpus)] co-occurrence of expert e at layer l with the experts each GPU holds at layers l-1 and l+1."""
    gain = np.zeros(len(gpus))
    L = copies_LEG.shape[0]
    if l > 0:
        gain += affinity_LEE[l - 1][:, e] @ copies_LEG[l - 1][:, gpus]
    if l + 1 < L:
        gain += affinity_LEE[l][e, :] @ copies_LEG[l + 1][:, gpus]
    return gain


__all__ = ["DEFAULT_MAX_IMBALANCE", "add_replicas", "cooccurrence_LEE", "load_max_over_mean_L", "spread_primaries"]
