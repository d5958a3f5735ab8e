"""The placement benchmark's parts on synthetic traces: scale (DeepSeek-V3's shape) and replicas for load.
Run through bench/placement_bench.py (``--part scale``, ``--part replicas``)."""

from __future__ import annotations

import multiprocessing
import resource
import time
from pathlib import Path

import numpy as np

from placement import ClusterShape, Placement
from placement.simulate import Strategy, simulate
from placement.solvers import SolveOptions, SolverKind, solve
from placement.solvers.reference import coordinate_ascent_all_pairs
from placement.stats import compute_stats, objective
from placement.synthetic import SyntheticSpec, planted_placement, synthetic_trace
from placement_bench_common import _traffic
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
