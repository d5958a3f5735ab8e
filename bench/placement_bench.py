"""Placement benchmark: held-out traffic on real routing, exactness of ilp, and scale of local/hierarchical.

    heldout  FLAME-MoE-290M encoder trace (2048 tokens, 8 MoE layers, 64 experts, top-6): fit on the first 60%,
             report on the last 40%; 2, 4, 8 GPUs on one node and 2 nodes x 4 GPUs (cross-node transfers);
             baselines contiguous / round_robin / balanced / one coordinate-ascent pass, local with an anchor
             table (+anchors) and with the exact swap refinement (+refine), surrogate variants, objective
             weights chosen by cross-validation on the fit part only (for coherent transfers and for the
             top-1 cross-GPU rate), and the |R| floor that bounds what any placement can reach
    exact    8 layers x 16 experts x 4 GPUs: ilp (proven bound) vs local vs a naive x/y linearisation
    prefix   the same FLAME split, fitted on short prefixes of the fit part (256, 512, all 1229 tokens), with and
             without shrinkage of the pair counts (strength by cross-validation inside each prefix), judged on
             the same held-out 40%; several solver seeds (the spread is the search's noise)
    scale    DeepSeek-V3 shape (58 layers x 256 experts, top-8, 8 nodes x 8 GPUs) on a synthetic trace with
             planted affinity: wall, CPU, peak memory (each run in its own process); growth with L, E, G; and
             held out (fit on the first 60% of 4096 tokens, 2458, report on the rest): local with default
             options against block coordinate ascent over all top-k pairs (``coordinate_ascent_all_pairs``)

    replicas a reduced DeepSeek-V3-like shape (16 layers x 64 experts, top-8, 2 x 8 GPUs, synthetic, 60/40):
             max/mean GPU load and top-1 cross-GPU / cross-node rates held out for contiguous, local, and each with
             one redundant slot per GPU filled by add_replicas (placement/solvers/replicate.py)

Writes bench/results/placement_bench.{json,md} (--part X redoes one part and keeps the others).
Run: nice -n 10 python bench/placement_bench.py [--part heldout|exact|prefix|scale|replicas] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # before numpy: BLAS threads only spin on a shared host

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from placement import ClusterShape, Placement, RoutingTrace  # noqa: E402
from placement.anchor import fit_anchor_table  # noqa: E402
from placement.refine import refine_placement  # noqa: E402
from placement.simulate import Strategy, simulate  # noqa: E402
from placement.solvers import SolveOptions, SolverKind, solve  # noqa: E402
from placement.solvers.reference import coordinate_ascent_all_pairs  # noqa: E402
from placement.solvers.shrinkage import choose_shrink  # noqa: E402
from placement.stats import StatsOptions, compute_stats, objective  # noqa: E402
from placement.synthetic import SyntheticSpec, planted_placement, synthetic_trace  # noqa: E402

from placement_bench_report import markdown  # noqa: E402  (bench/, beside this file)

FLAME = ROOT.parent / "shared" / "traces" / "flame-moe-290m" / "flame290m_encoder_2048tok_top6.npz"
OUT = ROOT / "bench" / "results"


def _traffic(trace, placement, strategy=Strategy.COHERENT) -> dict:
    r = simulate(trace, placement, strategy)
    return {"transfers_per_token_layer": r.transfers_per_token_layer, "top1_cross_gpu_rate": r.top1_cross_gpu_rate,
            "lar": r.lar, "cross_node_transfers": r.cross_node_transfers,
            "load_max_over_mean": float(r.load_max_over_mean_L.max())}


def _mean_distinct_ranks(trace, placement) -> float:
    """Mean |R| (distinct expert ranks per token-layer): coherent costs 2|R| - 1 - [start rank in R] >= 2|R| - 2."""
    ranks_TLK = placement.expert_to_gpu_LE[np.arange(trace.num_layers)[None, :, None], trace.experts_TLK.astype(int)]
    s = np.sort(ranks_TLK, axis=-1)
    return float((1 + (s[..., 1:] != s[..., :-1]).sum(-1)).mean())


# ---- held-out on real routing ---------------------------------------------------------------------------------
def heldout(quick: bool) -> dict:
    trace = RoutingTrace.load(FLAME)
    fit, held = trace.split(0.6)
    opts = SolveOptions(restarts=2 if quick else 4, rounds=50 if quick else 300, time_limit=120)
    out = {"setup": f"{FLAME.name}: fit on the first 60% ({fit.num_tokens} tokens), report on the last 40% "
                    f"({held.num_tokens}); coherent strategy unless named; baseline = contiguous + two_a2a",
           "clusters": []}
    shapes = [(1, 2), (1, 4), (1, 8), (2, 4)]
    for nodes, per in shapes:
        cluster = ClusterShape(nodes=nodes, gpus_per_node=per)
        stats = compute_stats(fit)
        runs = {k.value: solve(stats, cluster, SolveOptions(solver=k)) for k in
                (SolverKind.CONTIGUOUS, SolverKind.ROUND_ROBIN, SolverKind.BALANCED)}
        runs["coordinate_ascent"] = solve(stats, cluster, SolveOptions(restarts=1, rounds=0))
        runs["local"] = solve(stats, cluster, opts)
        runs["local+anchors"] = _anchored(fit, runs["local"])
        runs["local+refine+anchors"] = _anchored(fit, refine_placement(fit, runs["local"]))
        if nodes > 1:
            runs["hierarchical"] = solve(stats, cluster, dataclasses.replace(opts, solver=SolverKind.HIERARCHICAL))
        if (nodes, per) == (1, 8):   # the targets: weights chosen by cross-validation on the fit part
            runs.update(_cv_rows(fit, cluster, opts, out.setdefault("cv", {}), f"{nodes}x{per}"))
        base = simulate(held, runs["contiguous"], Strategy.TWO_A2A).transfers_per_token_layer
        rows = []
        for name, p in runs.items():
            row = {"placement": name, "two_a2a": _traffic(held, p, Strategy.TWO_A2A), **_traffic(held, p),
                   "mean_distinct_ranks": _mean_distinct_ranks(held, p), "solve_s": p.solver["time_s"],
                   "gap_to_cheap_bound": p.objective["gap"]}
            row["reduction_vs_baseline"] = 1 - row["transfers_per_token_layer"] / base
            rows.append(row)
        out["clusters"].append({"nodes": nodes, "gpus_per_node": per, "baseline_transfers": base, "rows": rows})
        print(f"heldout {nodes}x{per}: " + ", ".join(f"{r['placement']} top1 {r['top1_cross_gpu_rate']:.3f} "
                                                       f"saved {r['reduction_vs_baseline']:.1%}" for r in rows),
              flush=True)
    for cv in out.get("cv", {}).values():   # held-out transfers of the CV-chosen weights under other seeds
        cv["chosen_coherent_seeds"] = [{"seed": seed, "transfers_per_token_layer": simulate(
            held, p, Strategy.COHERENT).transfers_per_token_layer} for seed, p in zip(SEEDS, cv["chosen_coherent_seeds"])]
    out["surrogates"] = _surrogates(fit, held, opts)
    out["floor"] = _floor(fit, held, opts)
    out["targets"] = _targets(out)
    return out


def _targets(out: dict) -> dict:
    """Issue 2 on 1 node x 8 GPUs, held out: top-1 cross-GPU rate <= 0.55 and >= 40% fewer transfers per
    token-layer under coherent than two_a2a + contiguous. The best row for each, by name."""
    c = next(c for c in out["clusters"] if (c["nodes"], c["gpus_per_node"]) == (1, 8))
    top1 = min(c["rows"], key=lambda r: r["top1_cross_gpu_rate"])
    saved = max(c["rows"], key=lambda r: r["reduction_vs_baseline"])
    return {"top1_target": 0.55, "best_top1": top1["top1_cross_gpu_rate"], "best_top1_row": top1["placement"],
            "top1_met": top1["top1_cross_gpu_rate"] <= 0.55,
            "reduction_target": 0.40, "best_reduction": saved["reduction_vs_baseline"],
            "best_reduction_row": saved["placement"], "best_transfers": saved["transfers_per_token_layer"],
            "transfers_needed": 0.6 * c["baseline_transfers"], "reduction_met": saved["reduction_vs_baseline"] >= 0.40,
            "same_row_top1": saved["top1_cross_gpu_rate"]}


def _anchored(fit, placement):
    return placement.with_anchors(fit_anchor_table(fit, placement.expert_to_gpu_LE, placement.num_gpus))


COHERENT_GRID = [(d, c) for d in (0.5, 1.0) for c in (0.5, 4.0, 16.0, 64.0)]
TOP1_GRID = [(d, c) for d in (0.25, 0.35, 0.5, 0.75) for c in (0.0, 0.5)]
CV_FOLDS = 3
SEEDS = (1, 2, 3, 4)


def _folds(fit, k: int = CV_FOLDS) -> list[tuple]:
    """k contiguous blocks of the fit part: (the other blocks, this block) for each."""
    bounds = np.linspace(0, fit.num_tokens, k + 1).round().astype(int)
    rows = np.arange(fit.num_tokens)
    return [(fit.select((rows < lo) | (rows >= hi)), fit.select(slice(lo, hi))) for lo, hi in zip(bounds, bounds[1:])]


def _cv_rows(fit, cluster, opts, cv_out: dict, shape: str) -> dict:
    """Objective weights chosen on the fit part only (k-fold over contiguous blocks of it: coherent transfers
    with refinement + anchor table, and the top-1 cross-GPU rate); the winners are refitted on the whole fit part."""
    folds = _folds(fit)
    cheap = dataclasses.replace(opts, restarts=2, rounds=100)
    coherent, top1 = [], []
    for decay, coact in COHERENT_GRID:
        scores = []
        for train, test in folds:
            p = solve(compute_stats(train, StatsOptions(slot_decay=decay, coact_weight=coact)), cluster, cheap)
            p = _anchored(train, refine_placement(train, p))
            scores.append(simulate(test, p, Strategy.COHERENT).transfers_per_token_layer)
        coherent.append({"slot_decay": decay, "coact_weight": coact, "cv_transfers": float(np.mean(scores)),
                         "folds": scores})
    for decay, coact in TOP1_GRID:
        scores = [simulate(test, solve(compute_stats(train, StatsOptions(slot_decay=decay, coact_weight=coact)),
                                       cluster, cheap), Strategy.COHERENT).top1_cross_gpu_rate for train, test in folds]
        top1.append({"slot_decay": decay, "coact_weight": coact, "cv_top1": float(np.mean(scores)), "folds": scores})
    best_c = min(coherent, key=lambda r: r["cv_transfers"])
    best_t = min(top1, key=lambda r: r["cv_top1"])
    cv_out[shape] = {"folds": CV_FOLDS, "fit_tokens": fit.num_tokens, "coherent": coherent, "top1": top1,
                     "chosen_coherent": best_c, "chosen_top1": best_t}
    print(f"cv {shape}: coherent weights {best_c['slot_decay']}/{best_c['coact_weight']}, top-1 weights "
          f"{best_t['slot_decay']}/{best_t['coact_weight']}", flush=True)
    stats_c = compute_stats(fit, StatsOptions(slot_decay=best_c["slot_decay"], coact_weight=best_c["coact_weight"]))
    stats_t = compute_stats(fit, StatsOptions(slot_decay=best_t["slot_decay"], coact_weight=best_t["coact_weight"]))
    cv_out[shape]["chosen_coherent_seeds"] = [   # the solver's seed: how much the figure below moves with it
        _anchored(fit, refine_placement(fit, solve(stats_c, cluster, dataclasses.replace(opts, seed=seed))))
        for seed in SEEDS]
    return {"cv_coherent+refine+anchors": _anchored(fit, refine_placement(fit, solve(stats_c, cluster, opts))),
            "cv_top1": solve(stats_t, cluster, opts)}


def _surrogates(fit, held, opts) -> list[dict]:
    """What the objective weights do to held-out figures (8 GPUs)."""
    cluster = ClusterShape(gpus_per_node=8)
    base = simulate(held, solve(compute_stats(fit), cluster, SolveOptions(solver=SolverKind.CONTIGUOUS)),
                    Strategy.TWO_A2A).transfers_per_token_layer
    rows = []
    for decay, coact in [(0.0, 0.0), (0.5, 0.0), (0.5, 0.5), (1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (1.0, 4.0),
                         (1.0, 16.0), (1.0, 64.0)]:
        p = solve(compute_stats(fit, StatsOptions(slot_decay=decay, coact_weight=coact)), cluster, opts)
        t = _traffic(held, p)
        anchored = _traffic(held, _anchored(fit, p))["transfers_per_token_layer"]
        refined = _traffic(held, _anchored(fit, refine_placement(fit, p)))["transfers_per_token_layer"]
        rows.append({"slot_decay": decay, "coact_weight": coact, "fit_top1": _traffic(fit, p)["top1_cross_gpu_rate"],
                     **t, "reduction_vs_baseline": 1 - t["transfers_per_token_layer"] / base,
                     "anchored_transfers": anchored, "anchored_reduction": 1 - anchored / base,
                     "refined_anchored_transfers": refined, "refined_anchored_reduction": 1 - refined / base})
    return rows


def _floor(fit, held, opts) -> dict:
    """A placement fitted to co-activation only (small |R|, no inter-layer term): its held-out mean |R| and the
    coherent traffic it implies even if every token started on one of its expert ranks (2|R| - 2)."""
    cluster = ClusterShape(gpus_per_node=8)
    stats = compute_stats(fit, StatsOptions(slot_decay=1.0, coact_weight=1.0))
    stats = dataclasses.replace(stats, affinity_LEE=np.zeros_like(stats.affinity_LEE))
    p = solve(stats, cluster, opts)
    R = _mean_distinct_ranks(held, p)
    base = simulate(held, solve(stats, cluster, SolveOptions(solver=SolverKind.CONTIGUOUS)),
                    Strategy.TWO_A2A).transfers_per_token_layer
    return {"mean_distinct_ranks_held_out": R, "fit_mean_distinct_ranks": _mean_distinct_ranks(fit, p),
            "coherent_floor_transfers": 2 * R - 2, "floor_reduction_vs_baseline": 1 - (2 * R - 2) / base,
            "baseline_transfers": base}


# ---- short prefixes of the fit part, with and without shrinkage ----------------------------------------------
PREFIXES = (256, 512, None)          # None: the whole fit part
PREFIX_SEEDS = (0, 1, 2)
FIXED_SHRINK = (0.25, 0.5)           # not chosen by CV: whether any strength helps held out (CV must not see this)


def prefix(quick: bool) -> dict:
    trace = RoutingTrace.load(FLAME)
    fit, held = trace.split(0.6)
    cluster = ClusterShape(gpus_per_node=8)
    opts = SolveOptions(restarts=2 if quick else 4, rounds=50 if quick else 300, time_limit=60)
    seeds = PREFIX_SEEDS[:1] if quick else PREFIX_SEEDS
    base = simulate(held, solve(compute_stats(fit), cluster, SolveOptions(solver=SolverKind.CONTIGUOUS)),
                    Strategy.TWO_A2A).transfers_per_token_layer
    rows = []
    for n in PREFIXES:
        part = fit if n is None else fit.select(slice(0, n))
        t0 = time.perf_counter()
        choice = choose_shrink(part, cluster)
        cv_s = time.perf_counter() - t0
        variants = [("none", 0.0), ("cv", choice.strength)] + ([] if quick else [("fixed", a) for a in FIXED_SHRINK])
        for label, a in variants:
            stats = compute_stats(part, StatsOptions(shrink=a))
            runs = []
            for seed in seeds:
                p = solve(stats, cluster, dataclasses.replace(opts, seed=seed))
                refined = _anchored(part, refine_placement(part, p))
                runs.append({"seed": seed, "top1": simulate(held, p, Strategy.COHERENT).top1_cross_gpu_rate,
                             "coherent": simulate(held, p, Strategy.COHERENT).transfers_per_token_layer / base,
                             "refined_coherent": simulate(held, refined, Strategy.COHERENT).transfers_per_token_layer
                             / base, "fit_top1": simulate(part, p, Strategy.COHERENT).top1_cross_gpu_rate,
                             "solve_s": p.solver["time_s"]})
            row = {"fit_tokens": part.num_tokens, "shrink": label, "strength": a, "runs": runs,
                   "cv_s": cv_s if label == "cv" else 0.0,
                   "cv_scores": choice.scores if label == "cv" else None}
            for k in ("top1", "coherent", "refined_coherent", "fit_top1"):
                vals = [r[k] for r in runs]
                row[k] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
            rows.append(row)
            print(f"prefix {part.num_tokens} shrink {label} ({a}): held-out top-1 {row['top1']['mean']:.3f} "
                  f"[{row['top1']['min']:.3f}, {row['top1']['max']:.3f}], coherent {row['coherent']['mean']:.3f}x, "
                  f"+refine+anchors {row['refined_coherent']['mean']:.3f}x baseline", flush=True)
    fair = [r for r in rows if r["shrink"] != "fixed"]      # a strength picked by looking at held-out is not fair
    full = [r for r in fair if r["fit_tokens"] == fit.num_tokens]
    short = [r for r in fair if r["fit_tokens"] == 256]
    best_full = min(r["top1"]["mean"] for r in full)
    best_short = min(r["top1"]["mean"] for r in short)
    best_coh = min(min(r["coherent"]["mean"], r["refined_coherent"]["mean"]) for r in full)
    targets = {"top1_full": best_full, "top1_full_met": best_full <= 0.55,
               "top1_256": best_short, "top1_256_within_0.03": best_short <= best_full + 0.03,
               "best_coherent_ratio": best_coh, "coherent_met": best_coh <= 0.60}
    return {"setup": f"{FLAME.name}: prefixes of the fit part (first 60%, {fit.num_tokens} tokens), judged on the "
                     f"last 40% ({held.num_tokens}); 1 node x 8 GPUs; local ({opts.restarts} starts, {opts.rounds} "
                     f"rounds), seeds {list(seeds)}; baseline contiguous + two_a2a = {base:.3f} transfers per "
                     "token-layer; shrinkage strength chosen per prefix by 3-fold CV on that prefix only (held-in "
                     "top-1 cross-GPU rate, candidates 0/0.1/0.25/0.5/0.75); `fixed` rows: a strength set by hand, "
                     "to see whether any strength helps held out (targets count only none/cv rows)",
            "baseline_transfers": base, "rows": rows, "targets": targets}


# ---- exactness ------------------------------------------------------------------------------------------------
def fold_flame(num_experts: int = 16, top_k: int = 2) -> RoutingTrace:
    """The FLAME encoder trace with its 64 experts merged in blocks (e // 4) and the first top_k distinct
    merged experts kept: a small instance with real affinity structure."""
    trace = RoutingTrace.load(FLAME)
    merged_TLK = trace.experts_TLK.astype(np.int64) // (trace.num_experts // num_experts)
    T, L, K = merged_TLK.shape
    keep = np.zeros((T, L, top_k), dtype=np.int16)
    for slot in range(top_k):
        taken = keep[:, :, :slot]
        fresh_TLK = ~(merged_TLK[..., None] == taken[:, :, None, :]).any(-1)
        first = np.argmax(fresh_TLK, axis=-1)
        keep[:, :, slot] = np.take_along_axis(merged_TLK, first[..., None], axis=-1)[..., 0]
    return RoutingTrace(keep, np.broadcast_to(np.float32([0.6, 0.4][:top_k]), keep.shape).copy(), num_experts)


def naive_xy(stats, cluster, time_limit: float) -> dict:
    """x[l,i,g] binary, y[l,i,j,g] <= x[l,i,g], x[l+1,j,g] per affinity pair, z likewise per co-activated
    pair: the textbook linearisation (no symmetry breaking, no bound strengthening), PuLP + HiGHS."""
    import pulp
    L, E = stats.load_LE.shape
    G, M = cluster.num_gpus, E // cluster.num_gpus
    prob = pulp.LpProblem("naive_xy", pulp.LpMaximize)
    x = {(l, i, g): prob.add_variable(f"x_{l}_{i}_{g}", 0, 1, cat="Binary")
         for l in range(L) for i in range(E) for g in range(G)}
    terms = []
    for l in range(L):
        for i in range(E):
            prob += pulp.lpSum(x[l, i, g] for g in range(G)) == 1
        for g in range(G):
            prob += pulp.lpSum(x[l, i, g] for i in range(E)) == M
    pairs = [(stats.affinity_LEE[l, i, j], (l, i), (l + 1, j)) for l in range(L - 1)
             for i, j in zip(*np.nonzero(stats.affinity_LEE[l]))]
    pairs += [(stats.coact_LEE[l, i, j], (l, i), (l, j)) for l in range(L)
              for i, j in zip(*np.nonzero(np.triu(stats.coact_LEE[l], 1)))]
    for k, (w, a, b) in enumerate(pairs):
        for g in range(G):
            y = prob.add_variable(f"y_{k}_{g}", 0, 1)
            prob += y <= x[(*a, g)]
            prob += y <= x[(*b, g)]
            terms.append(float(w) * y)
    prob += pulp.lpSum(terms)
    start = time.perf_counter()
    prob.solve(pulp.HiGHS(msg=False, timeLimit=time_limit, threads=1))
    info = prob.solverModel.getInfo()
    value, bound = pulp.value(prob.objective), abs(info.mip_dual_bound)
    return {"objective": value, "upper_bound": bound, "gap": (bound - value) / bound,
            "wall_s": time.perf_counter() - start}


def exact(quick: bool) -> dict:
    limit = 20.0 if quick else 60.0
    cluster = ClusterShape(gpus_per_node=4)
    spec = dict(num_tokens=2000, num_layers=8, num_experts=16, seed=1)
    instances = {
        "flame_folded_top2": fold_flame(),
        "synthetic_planted_top2": synthetic_trace(SyntheticSpec(**spec, top_k=2, num_clusters=4, noise=0.2)),
        "synthetic_mismatched_top2": synthetic_trace(SyntheticSpec(**spec, top_k=2, num_clusters=8, noise=0.5)),
        "synthetic_top6": synthetic_trace(SyntheticSpec(**spec, top_k=6, num_clusters=8, noise=0.3)),
    }
    rows = []
    for name, trace in instances.items():
        stats = compute_stats(trace)
        ilp = solve(stats, cluster, SolveOptions(solver=SolverKind.ILP, time_limit=limit))
        local = solve(stats, cluster, SolveOptions())
        bound = ilp.objective["upper_bound"]
        row = {"instance": name, "ilp_status": ilp.solver["status"], "ilp_objective": ilp.objective["value"],
               "ilp_upper_bound": bound, "ilp_gap": ilp.objective["gap"], "ilp_wall_s": ilp.solver["time_s"],
               "ilp_cpu_s": ilp.solver["cpu_s"], "local_objective": local.objective["value"],
               "local_gap_to_ilp_bound": (bound - local.objective["value"]) / bound,
               "local_wall_s": local.solver["time_s"]}
        if name in ("flame_folded_top2", "synthetic_mismatched_top2") and not quick:
            row["naive_xy"] = naive_xy(stats, cluster, limit)
        rows.append(row)
        print(f"exact {name}: ilp {row['ilp_status']} gap {row['ilp_gap']:.4%} in {row['ilp_wall_s']:.1f} s; "
              f"local gap {row['local_gap_to_ilp_bound']:.3%}" +
              (f"; naive x/y gap {row['naive_xy']['gap']:.1%}" if "naive_xy" in row else ""), flush=True)
    return {"setup": f"8 layers x 16 experts x 4 GPUs, time limit {limit:.0f} s", "rows": rows}


# ---- scale ----------------------------------------------------------------------------------------------------
def _scale_run(args: dict) -> dict:
    """One solve in a fresh process: wall, CPU and peak RSS of that process only."""
    spec = SyntheticSpec(**args["spec"])
    trace = synthetic_trace(spec)
    cluster = ClusterShape(nodes=args["nodes"], gpus_per_node=args["gpus_per_node"])
    wall0, cpu0 = time.perf_counter(), time.process_time()
    stats = compute_stats(trace)
    stats_s = time.perf_counter() - wall0
    p = solve(stats, cluster, SolveOptions(solver=SolverKind(args["solver"]), **args["options"]))
    planted = Placement(planted_placement(spec, cluster.num_gpus), cluster)
    return {**args, "stats_s": stats_s, "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
            "solve_wall_s": p.solver["time_s"], "solve_cpu_s": p.solver["cpu_s"],
            "peak_rss_mib": _peak_rss_mib(),
            "objective_vs_planted": p.objective["value"] / objective(stats, planted.expert_to_gpu_LE, cluster),
            "rounds_run": p.solver.get("rounds_run"), **{f"ours_{k}": v for k, v in _traffic(trace, p).items()},
            **{f"planted_{k}": v for k, v in _traffic(trace, planted).items()},
            **{f"contiguous_two_a2a_{k}": v for k, v in _traffic(
                trace, solve(stats, cluster, SolveOptions(solver=SolverKind.CONTIGUOUS)), Strategy.TWO_A2A).items()}}


def _top1_cross(trace, p_LE, cluster) -> dict:
    """Held-out top-1 cross-GPU and cross-node rates: tokens whose top-1 expert's GPU (node) changes l -> l+1."""
    g_TL = np.asarray(p_LE)[np.arange(trace.num_layers)[None, :], trace.experts_TLK[:, :, 0].astype(np.int64)]
    n_TL = g_TL // cluster.gpus_per_node
    return {"top1_cross_gpu": float((g_TL[:, 1:] != g_TL[:, :-1]).mean()),
            "top1_cross_node": float((n_TL[:, 1:] != n_TL[:, :-1]).mean())}


def _scale_heldout_run(args: dict) -> dict:
    """One held-out comparison in a fresh process: local with default options (stats with default options too,
    i.e. what `epserve place` does) vs the all-pairs reference vs contiguous."""
    trace = synthetic_trace(SyntheticSpec(**args["spec"]))
    fit, held = trace.split(0.6)
    cluster = ClusterShape(nodes=args["nodes"], gpus_per_node=args["gpus_per_node"])
    wall0 = time.perf_counter()
    stats = compute_stats(fit)
    p = solve(stats, cluster, SolveOptions())
    local_s = time.perf_counter() - wall0
    wall0 = time.perf_counter()
    ref_LE = coordinate_ascent_all_pairs(fit, cluster)
    ref_s = time.perf_counter() - wall0
    contiguous = solve(stats, cluster, SolveOptions(solver=SolverKind.CONTIGUOUS)).expert_to_gpu_LE
    return {**args, "fit_tokens": fit.num_tokens, "held_tokens": held.num_tokens,
            "slot_decay": stats.options.slot_decay, "local_wall_s": local_s, "local_solver": p.solver,
            "local_gap": p.objective["gap"], "reference_wall_s": ref_s,
            "local": _top1_cross(held, p.expert_to_gpu_LE, cluster), "reference": _top1_cross(held, ref_LE, cluster),
            "contiguous": _top1_cross(held, contiguous, cluster),
            "local_fit": _top1_cross(fit, p.expert_to_gpu_LE, cluster), "reference_fit": _top1_cross(fit, ref_LE, cluster)}


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the
    forked parent, so a spawned child would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale(quick: bool) -> dict:
    ds = dict(num_tokens=4096, num_layers=58, num_experts=256, top_k=8, num_clusters=64, noise=0.2,
              stickiness=0.8, seed=0)
    limit = 20.0 if quick else 50.0
    jobs = [dict(spec=ds, nodes=8, gpus_per_node=8, solver=s, options=dict(time_limit=limit))
            for s in ("local", "hierarchical")]
    jobs.append(dict(spec=ds, nodes=8, gpus_per_node=8, solver="local", options=dict(restarts=1, rounds=0)))
    one_pass = dict(restarts=1, rounds=0)
    for L in (8, 16, 32):
        jobs.append(dict(spec={**ds, "num_layers": L}, nodes=8, gpus_per_node=8, solver="local", options=one_pass))
    for E in (64, 128):
        jobs.append(dict(spec={**ds, "num_layers": 16, "num_experts": E}, nodes=8, gpus_per_node=8,
                         solver="local", options=one_pass))
    for N, per in ((1, 8), (2, 8), (4, 8)):
        jobs.append(dict(spec={**ds, "num_layers": 16, "num_clusters": N * per}, nodes=N, gpus_per_node=per,
                         solver="local", options=one_pass))
    if quick:
        jobs = jobs[:3]
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for job in jobs:
        with ctx.Pool(1) as pool:
            row = pool.apply(_scale_run, (job,))
        rows.append(row)
        s = row["spec"]
        print(f"scale L={s['num_layers']} E={s['num_experts']} G={row['nodes'] * row['gpus_per_node']} "
              f"{row['solver']} {row['options']}: solve {row['solve_wall_s']:.1f} s wall / "
              f"{row['solve_cpu_s']:.1f} s CPU, peak {row['peak_rss_mib']:.0f} MiB, "
              f"objective {row['objective_vs_planted']:.4f} x planted", flush=True)
    heldout_rows = []
    for spec in (SCALE_DSV3, ds):
        with ctx.Pool(1) as pool:
            row = pool.apply(_scale_heldout_run, (dict(spec=spec, nodes=8, gpus_per_node=8),))
        heldout_rows.append(row)
        print(f"scale held out Q={spec['num_clusters']} stickiness {spec['stickiness']} noise {spec['noise']}: "
              f"local default {row['local_wall_s']:.1f} s (slot_decay {row['slot_decay']}) top-1 cross-GPU / node "
              f"{row['local']['top1_cross_gpu']:.4f} / {row['local']['top1_cross_node']:.4f}; reference "
              f"{row['reference_wall_s']:.1f} s {row['reference']['top1_cross_gpu']:.4f} / "
              f"{row['reference']['top1_cross_node']:.4f}; contiguous {row['contiguous']['top1_cross_gpu']:.4f} / "
              f"{row['contiguous']['top1_cross_node']:.4f}", flush=True)
    return {"setup": "synthetic traces with planted affinity (SyntheticSpec in each row); 4096 tokens", "rows": rows,
            "heldout": heldout_rows}


# DeepSeek-V3's shape with the routing gpu_projection.py matched to FLAME's affinity (8 clusters of 32 experts,
# stickiness 0.9, noise 0.1): weak affinity at 64 GPUs, contiguous's top-1 cross-GPU rate 0.985
SCALE_DSV3 = dict(num_tokens=4096, num_layers=58, num_experts=256, top_k=8, num_clusters=8, noise=0.1,
                  stickiness=0.9, seed=0)


# ---- replicas for load (issue 10 items 2 and 5, load part) -------------------------------------------------------
# A reduced DeepSeek-V3-like shape (the full one is too slow for this part on 2 cores): 16 layers x 64 experts, top-8,
# 2 nodes x 8 GPUs, 4 experts per GPU + one redundant slot; the scale part's routing (gamma(2) popularity per layer)
REPLICA_SPEC = dict(num_tokens=16384, num_layers=16, num_experts=64, top_k=8, num_clusters=16, noise=0.2,
                    stickiness=0.8, seed=0)


def _top1_routes(trace, placement, coherent: bool) -> np.ndarray:
    """[T, L] GPU of each token's top-1 expert copy (replica rule; coherent: from where its last top-1 left it)."""
    from placement.simulate import sequence_order
    T, L, _ = trace.experts_TLK.shape
    G = placement.num_gpus
    choice_LEG = placement.copy_choice_LEG
    pos_T = sequence_order(trace)[0].astype(np.int64) % G
    home_T = pos_T.copy()
    out = np.empty((T, L), dtype=np.int64)
    for l in range(L):
        out[:, l] = choice_LEG[l, trace.experts_TLK[:, l, 0].astype(np.int64), pos_T]
        pos_T = out[:, l] if coherent else home_T
    return out


def _replica_row(held, placement) -> dict:
    row = {}
    for strategy in (Strategy.TWO_A2A, Strategy.COHERENT):
        r = simulate(held, placement, strategy)
        g_TL = _top1_routes(held, placement, strategy.coherent)
        assert int((g_TL[:, 1:] != g_TL[:, :-1]).sum()) == int(r.top1_cross_L.sum())   # the simulator's count
        n_TL = g_TL // placement.cluster.gpus_per_node
        row[strategy.value] = {"load_max_over_mean": float(r.load_max_over_mean_L.max()),
                               "load_max_over_mean_avg": float(r.load_max_over_mean_L.mean()),
                               "step_max_over_mean": float(r.load_LG.max(axis=1).sum() / r.load_LG.mean(axis=1).sum()),
                               "top1_cross_gpu": float((g_TL[:, 1:] != g_TL[:, :-1]).mean()),
                               "top1_cross_node": float((n_TL[:, 1:] != n_TL[:, :-1]).mean()),
                               "transfers_per_token_layer": r.transfers_per_token_layer}
    return row


def replicas(quick: bool) -> dict:
    from placement.solvers.replicate import add_replicas
    spec = dict(REPLICA_SPEC, num_tokens=4096) if quick else REPLICA_SPEC
    trace = synthetic_trace(SyntheticSpec(**spec))
    fit, held = trace.split(0.6)
    cluster = ClusterShape(nodes=2, gpus_per_node=8)
    S = spec["num_experts"] // cluster.num_gpus + 1
    stats = compute_stats(fit)
    runs, times = {}, {}
    runs["contiguous"] = solve(stats, cluster, SolveOptions(solver=SolverKind.CONTIGUOUS))
    runs["local"] = solve(stats, cluster, SolveOptions())
    for name, base, bound in (("local+replicas", "local", 1.05), ("local+replicas (bound 1.02)", "local", 1.02),
                              ("contiguous+replicas", "contiguous", 1.05)):
        t0 = time.perf_counter()
        runs[name] = add_replicas(runs[base], fit, S, max_imbalance=bound)
        times[name] = time.perf_counter() - t0
    # diagnostic, not a result: replicas chosen on the held-out tokens themselves (in-sample): how much of the held-out
    # imbalance is the sampling noise of the fit part rather than what one redundant slot per GPU can do
    runs["local+replicas in-sample (diagnostic)"] = add_replicas(runs["local"], held, S)
    rows = []
    for name, p in runs.items():
        row = {"placement": name, "slots_per_gpu": p.slots_per_gpu, **_replica_row(held, p),
               "replicate_s": times.get(name), "fit_load_max_over_mean": p.objective.get("load", {}).get("max_over_mean"),
               "swaps": p.solver.get("replicas", {}).get("rebalance_swaps")}
        rows.append(row)
        c = row["coherent"]
        print(f"replicas {name}: two_a2a max/mean {row['two_a2a']['load_max_over_mean']:.3f} "
              f"(avg {row['two_a2a']['load_max_over_mean_avg']:.3f}), coherent {c['load_max_over_mean']:.3f}; top-1 "
              f"cross-GPU / node coherent {c['top1_cross_gpu']:.4f} / {c['top1_cross_node']:.4f}", flush=True)
    by = {r["placement"]: r for r in rows}
    targets = {}
    for strategy in ("two_a2a", "coherent"):
        con, loc, rep = (by[k][strategy] for k in ("contiguous", "local", "local+replicas"))
        targets[strategy] = {
            "max_over_mean": rep["load_max_over_mean"], "max_over_mean_met": rep["load_max_over_mean"] <= 1.05,
            **{f"{m}_gain_kept": (con[m] - rep[m]) / (con[m] - loc[m]) if con[m] != loc[m] else None
               for m in ("top1_cross_gpu", "top1_cross_node")}}
    return {"setup": f"synthetic {spec}; fit on the first 60% ({fit.num_tokens} tokens), all figures on the last 40% "
                     f"({held.num_tokens}); 2 nodes x 8 GPUs, {S} slots per GPU for replicated rows (4 + 1)",
            "rows": rows, "targets": targets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["heldout", "exact", "prefix", "scale", "replicas", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smaller budgets (a smoke run, not the figures)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    args = parser.parse_args()
    stem = "placement_bench" + ("_quick" if args.quick else "")
    if args.render_only:
        results = json.loads((args.out / f"{stem}.json").read_text())
        (args.out / f"{stem}.md").write_text(markdown(results) + "\n")
        return 0
    if args.part in ("heldout", "exact", "prefix", "all") and not FLAME.is_file():
        print(f"the FLAME trace is absent: {FLAME}", file=sys.stderr)
        return 2
    previous = args.out / f"{stem}.json"
    results = json.loads(previous.read_text()) if args.part != "all" and previous.is_file() else {}
    results["host"] = f"{os.cpu_count()} CPUs (shared), OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}"
    for part, fn in (("heldout", heldout), ("exact", exact), ("prefix", prefix), ("scale", scale),
                     ("replicas", replicas)):
        if args.part in (part, "all"):
            results[part] = fn(args.quick)
            results.setdefault("commands", {})[part] = " ".join(["python"] + sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results) + "\n")
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
