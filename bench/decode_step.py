"""Decode step time on this machine, the reference commit's implementation against this tree's, in one run.

    git worktree add <tmp> <ref commit>  (removed at the end)
    for each round: for tree in (ref, new):
        python bench/decode_step.py --worker  (PYTHONPATH = that tree; this file's measuring code is the same
        for both and only uses APIs both have: build_runner, Runner.execute, StepPlan/SeqWork, comm.spawn)
          --> 4 gloo ranks (OMP_NUM_THREADS=1 each), the default model, for each strategy (two_a2a = the
              baseline, coherent): one prefill step of 64 prompts (not timed), then --steps decode steps of
              batch 64, each timed on every rank (slowest rank per step)
    --> ms per decode step: median over the steps after --warmup of every round, per tree x strategy;
        new / ref ratio; whether both trees produced the same tokens --> bench/results/local/decode_step.{json,md}

Run:  nice -n 10 python bench/decode_step.py [--ref f65a3f7] [--rounds 2] [--steps 24] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = Path(os.environ.get("DECODE_STEP_TREE", ROOT))     # the implementation measured (worker side)
sys.path.insert(0, str(TREE))
LOCAL_OUT = ROOT / "bench" / "results" / "local"  # --out default (untracked; bench/bench_io.py; not imported:
#                                                  the worker runs under DECODE_STEP_TREE, which may predate it)

RANKS, BATCH = 4, 64
STRATEGIES = ("two_a2a", "coherent")


# ---- worker: runs under the tree being measured ----------------------------------------------------------------
def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(4, 16))] for _ in range(n)]


def rank_fn(topology, model_dir: str, prompts: list[list[int]], steps: int, strategies: tuple[str, ...]) -> dict:
    import torch

    from comm.strategy import Strategy
    from epserve.engine.builder import build_runner
    from epserve.engine.plan import GREEDY, SeqWork, StepPlan

    torch.set_num_threads(1)
    G, out = topology.world_size, {}
    for name in strategies:
        runner = build_runner(model_dir, topology, strategy=Strategy(name))
        works = tuple(SeqWork(i, tuple(p), 0, i % G, GREEDY) for i, p in enumerate(prompts))
        last = dict(runner.execute(StepPlan(step=0, work=works)).next_token_ids)   # prefill: not timed
        tokens = {i: [t] for i, t in last.items()}
        times = []
        for s in range(1, steps + 1):
            works = tuple(SeqWork(i, (last[i],), len(p) + s - 1, i % G, GREEDY) for i, p in enumerate(prompts))
            t0 = time.perf_counter()
            result = runner.execute(StepPlan(step=s, work=works))
            times.append(time.perf_counter() - t0)
            last = dict(result.next_token_ids)
            for i, t in last.items():
                tokens[i].append(t)
        out[name] = {"step_s": times, "tokens": [tokens[i] for i in range(len(prompts))]}
        del runner
    return out


def worker(args) -> int:
    import epserve
    from comm.spawn import spawn_ranks
    model_dir = str(TREE / "epserve" / "assets" / "default_model")
    prompts = make_prompts(args.batch, 4096)
    per_rank = spawn_ranks(rank_fn, args.ranks, (model_dir, prompts, args.steps, tuple(args.strategies.split(","))),
                           timeout_s=args.timeout)
    out = {"epserve_file": epserve.__file__}
    for name in per_rank[0]:
        step_s = [max(r[name]["step_s"][i] for r in per_rank) for i in range(args.steps)]
        out[name] = {"step_s": step_s, "tokens": per_rank[0][name]["tokens"]}
    Path(args.worker_out).write_text(json.dumps(out))
    return 0


# ---- orchestrator ---------------------------------------------------------------------------------------------
def run_tree(tree: Path, args, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), DECODE_STEP_TREE=str(tree), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-out", str(out), "--steps",
           str(args.steps), "--batch", str(args.batch), "--strategies", args.strategies, "--timeout",
           str(args.timeout), "--ranks", str(args.ranks)]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=args.timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {tree} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    doc = json.loads(out.read_text())
    if not doc["epserve_file"].startswith(str(tree)):
        raise RuntimeError(f"the worker for {tree} imported epserve from {doc['epserve_file']}")
    return doc


def git(*argv: str) -> str:
    return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def write_report(out: Path, result: dict) -> None:
    stem = "decode_step" if result["setup"]["ranks"] == RANKS else f"decode_step_{result['setup']['ranks']}rank"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    s = result["setup"]
    lines = ["# Decode step time: reference commit against this tree, one run", "", s["summary"], "",
             f"| strategy | ref {s['ref']} ms/step (each round) | new {s['new']} ms/step (each round) | "
             "new / ref | same tokens |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        each = lambda k: ", ".join(f"{x:.1f}" for x in r[f"{k}_ms_rounds"])  # noqa: E731
        lines.append(f"| {r['strategy']} | {r['ref_ms']:.1f} ({each('ref')}) | {r['new_ms']:.1f} ({each('new')}) | "
                     f"{r['ratio']:.2f}x | {r['same_tokens']} |")
    lines += ["", "Target: new / ref <= 0.5x.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="f65a3f7", help="reference commit (default: the one before this work)")
    p.add_argument("--new-tree", default=str(ROOT), help="tree measured as new (default: this checkout, with "
                                                        "whatever is uncommitted in it)")
    p.add_argument("--rounds", type=int, default=2, help="each round measures ref then new")
    p.add_argument("--steps", type=int, default=24, help="decode steps per strategy (after one prefill)")
    p.add_argument("--warmup", type=int, default=4, help="decode steps left out of the median")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--ranks", type=int, default=RANKS, help="gloo ranks (1: the data path alone, no collective)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--quick", action="store_true", help="1 round, 8 steps, 2 warm-up, batch 16")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per tree and round")
    p.add_argument("--out", default=str(LOCAL_OUT),
                   help="results folder (default bench/results/local/, untracked; --out bench/results "
                        "rewrites the tracked figures)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 1, 8, 2, 16
    t0 = time.perf_counter()
    new_tree = Path(args.new_tree).resolve()
    ref_sha = git("rev-parse", "--short", args.ref)
    new_desc = git("-C", str(new_tree), "rev-parse", "--short", "HEAD")
    if git("-C", str(new_tree), "status", "--porcelain", "--untracked-files=no"):
        new_desc += "+uncommitted"
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="decode-step-") as tmp:
        ref_tree = Path(tmp) / "ref"
        git("worktree", "add", "--detach", str(ref_tree), args.ref)
        try:
            for n in range(args.rounds):
                got = {}
                for label, tree in (("ref", ref_tree), ("new", new_tree)):
                    got[label] = run_tree(tree, args, Path(tmp) / f"{label}{n}.json")
                    print(f"[decode_step] round {n + 1}/{args.rounds} {label}: " + ", ".join(
                        f"{s} {1e3 * statistics.median(got[label][s]['step_s'][args.warmup:]):.1f} ms"
                        for s in args.strategies.split(",")), file=sys.stderr, flush=True)
                rounds.append(got)
        finally:
            git("worktree", "remove", "--force", str(ref_tree))
    rows = []
    for s in args.strategies.split(","):
        row = {"strategy": s}
        for label in ("ref", "new"):
            kept = [[1e3 * x for x in rnd[label][s]["step_s"][args.warmup:]] for rnd in rounds]
            row[f"{label}_ms"] = statistics.median([x for k in kept for x in k])
            row[f"{label}_ms_rounds"] = [statistics.median(k) for k in kept]
        row["ratio"] = row["new_ms"] / row["ref_ms"]
        row["same_tokens"] = all(rnd["ref"][s]["tokens"] == rnd["new"][s]["tokens"] for rnd in rounds)
        rows.append(row)
    summary = (f"{args.ranks} gloo rank(s) on one 2-core CPU machine shared with other work (OMP_NUM_THREADS=1 and one "
               f"torch thread per rank), the bundled default model (tiny Mixtral: 6 MoE layers, 16 experts, top-2, "
               f"hidden 128, float32 in both trees), contiguous placement, a2a transport. Batch {args.batch}: one "
               f"prefill step of {args.batch} random prompts (4-16 tokens, seed 0; not timed), then {args.steps} "
               f"decode steps of {args.batch} tokens; a step's time is its slowest rank's Runner.execute wall; "
               f"median over the steps after the first {args.warmup}, pooled over {args.rounds} round(s) (each "
               f"round: ref, then new). ref = `git worktree` of {ref_sha}, new = {new_tree.name} at {new_desc}; "
               f"the same measuring code runs under each (PYTHONPATH = the tree). Same tokens: greedy ids of every "
               f"sequence equal between the two trees.")
    result = {"setup": {"ref": ref_sha, "new": new_desc, "ranks": args.ranks, "batch": args.batch, "steps": args.steps,
                        "warmup": args.warmup, "rounds": args.rounds, "summary": summary,
                        "run_s": time.perf_counter() - t0},
              "rows": rows,
              "per_round_step_ms": [{label: {s: [1e3 * x for x in rnd[label][s]["step_s"]]
                                             for s in args.strategies.split(",")} for label in ("ref", "new")}
                                    for rnd in rounds]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, result)
    stem = "decode_step" if args.ranks == RANKS else f"decode_step_{args.ranks}rank"
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
