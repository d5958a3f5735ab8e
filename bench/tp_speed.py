"""Decode step time under DP attention (two_a2a) and TP attention (tp_two_a2a, tp_speculative), one run.

    bench/results/default_model_trace.npz --fit_placement (first 60%, 4 GPUs)--> solved placement + predictor
    spawn 4 gloo ranks (OMP_NUM_THREADS=1 each), the bundled default model, for each mode:
        build_runner --> prefill BATCH prompts (not timed) --> STEPS decode steps of the whole batch, each timed
        (the slowest rank per step) --> ms per step (median after WARMUP), tokens, the all-to-all rows and the
        reduce-scatter / all-gather rows per step
    --> bench/results/local/tp_speed.{json,md} (--out bench/results: the tracked copy)

Unshaped loopback on a shared 2-core machine: latency, not bytes, sets these times (see README).

Run:  nice -n 10 python bench/tp_speed.py [--out DIR] [--steps 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_io import LOCAL_OUT  # noqa: E402

RANKS, BATCH = 4, 16
MODES = ("dp_two_a2a", "tp_two_a2a", "tp_speculative")


def rank_fn(topology, model_dir: str, placement_path: str, predictor_path: str, prompts, steps: int) -> dict:
    import torch

    from comm.counters import CollKind
    from comm.strategy import AttentionLayout, Strategy
    from epserve.engine.builder import build_runner
    from epserve.engine.plan import GREEDY, SeqWork, StepPlan
    from placement.placement import Placement

    torch.set_num_threads(1)
    G, out = topology.world_size, {}
    placement = Placement.load(placement_path)
    for mode in MODES:
        tp = mode.startswith("tp_")
        strategy = Strategy.SPECULATIVE if mode == "tp_speculative" else Strategy.TWO_A2A
        runner = build_runner(model_dir, topology, strategy=strategy, placement=placement,
                              predictor_path=predictor_path if mode == "tp_speculative" else None,
                              attention=AttentionLayout.TP if tp else AttentionLayout.DP)
        works = tuple(SeqWork(i, tuple(p), 0, i % G, GREEDY) for i, p in enumerate(prompts))
        last = dict(runner.execute(StepPlan(step=0, work=works)).next_token_ids)
        runner.counters.reset()
        tokens, times = {i: [t] for i, t in last.items()}, []
        for s in range(1, steps + 1):
            works = tuple(SeqWork(i, (last[i],), len(p) + s - 1, i % G, GREEDY) for i, p in enumerate(prompts))
            t0 = time.perf_counter()
            last = dict(runner.execute(StepPlan(step=s, work=works)).next_token_ids)
            times.append(time.perf_counter() - t0)
            for i, t in last.items():
                tokens[i].append(t)
        c = runner.counters
        out[mode] = {"step_s": times, "tokens": [tokens[i] for i in range(len(prompts))],
                     "a2a_rows": c.total(CollKind.ALL_TO_ALL).rows,
                     "rs_rows": c.total(CollKind.REDUCE_SCATTER).rows,
                     "ag_rows": c.total(CollKind.ALL_GATHER, phase="tp_gather").rows}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", default=str(LOCAL_OUT))
    args = p.parse_args(argv)
    import random

    from comm.spawn import spawn_ranks
    from placement.cluster import ClusterShape
    from placement.pipeline import FitOptions, fit_placement
    from placement.solvers import SolveOptions
    from placement.trace import RoutingTrace
    model_dir = ROOT / "epserve" / "assets" / "default_model"
    fit, _ = RoutingTrace.load(ROOT / "bench" / "results" / "default_model_trace.npz").split(0.6)
    fitted = fit_placement(fit, ClusterShape(gpus_per_node=RANKS), FitOptions(
        solve=SolveOptions(time_limit=10.0, seed=0), anchors=False))
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 4096) for _ in range(rng.randint(4, 12))] for _ in range(BATCH)]
    with tempfile.TemporaryDirectory() as tmp:
        placement_path, predictor_path = Path(tmp) / "p.json", Path(tmp) / "p.predictor.npz"
        fitted.placement.save(placement_path)
        fitted.predictor.save(predictor_path)
        per_rank = spawn_ranks(rank_fn, RANKS, (str(model_dir), str(placement_path), str(predictor_path), prompts,
                                                args.steps), timeout_s=900)
    rows = []
    for mode in MODES:
        step_s = [max(r[mode]["step_s"][i] for r in per_rank) for i in range(args.steps)]
        ms = 1e3 * statistics.median(step_s[args.warmup:])
        totals = {k: sum(r[mode][k] for r in per_rank) / (args.steps * BATCH) for k in ("a2a_rows", "rs_rows",
                                                                                         "ag_rows")}
        rows.append({"mode": mode, "ms_per_step": ms, "tok_s": BATCH / ms * 1e3,
                     "same_tokens": per_rank[0][mode]["tokens"] == per_rank[0]["dp_two_a2a"]["tokens"],
                     **{f"{k}_per_token": v for k, v in totals.items()}})
    base = rows[0]["ms_per_step"]
    lines = ["# Decode step: DP vs TP attention (4 gloo ranks, default model, batch 16)", "",
             f"{RANKS} ranks on this machine (one thread each), solved placement + predictor fitted on the first 60% "
             f"of bench/results/default_model_trace.npz; {args.steps} decode steps, median after {args.warmup}; "
             "rows per token are all ranks' rows per decoded token (all layers).", "",
             "| mode | ms / step | tok/s | vs dp two_a2a | a2a rows / token | reduce-scatter rows / token | "
             "all-gather rows / token | same tokens |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ms_per_step']:.1f} | {r['tok_s']:.0f} | {r['ms_per_step'] / base:.2f}x | "
                     f"{r['a2a_rows_per_token']:.2f} | {r['rs_rows_per_token']:.2f} | {r['ag_rows_per_token']:.2f} | "
                     f"{r['same_tokens']} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tp_speed.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1) + "\n")
    (out / "tp_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
