"""Live re-placement: how long the longest engine step gets while a new placement is swapped in, against a normal
step, for a stop-the-world swap (every layer at one step boundary, as synchronous EPLB rearrangements do: the
baseline) and epserve's staged swaps (one MoE layer per step, and a layer's moves in chunks of at most
--step-mb per rank per step), in one run.

    spawn G gloo ranks (OMP_NUM_THREADS=1 each); for each model, for each mode:
        build_runner(contiguous placement) --> prefill BATCH prompts (not timed) --> WARMUP decode steps
        --> NORMAL timed decode steps --> the swap to a permuted placement (every layer's experts shuffled over
            the GPUs: about (G-1)/G of the experts move), its steps riding on decode steps --> NORMAL more steps
        every step timed on every rank (boundary + execute; the slowest rank per step)
    --> per model x mode: normal step p50, longest step during the swap, their ratio, steps and seconds the
        swap took, expert bytes moved; the tokens of every mode equal a run without a swap

Models: the bundled default model (6 MoE layers x 16 experts, hidden 128: 0.15 MB per expert) and a random
Mixtral-shaped checkpoint made here with transformers (--big: 4 MoE layers x 8 experts, hidden 512, expert
intermediate 1536, float32: 9.4 MB per expert), where moving weights costs time on this machine.

Run:  nice -n 10 python bench/replace_bench.py [--ranks 2] [--quick]
      writes bench/results/replace_bench.{json,md} (--out DIR to write elsewhere)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_io import LOCAL_OUT, OUT_HELP  # noqa: E402  (--out default: untracked)

MODES = ("no_swap", "stop_the_world", "layer_per_step", "chunked")
BIG = dict(hidden_size=512, intermediate_size=1536, num_local_experts=8, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=4096, num_experts_per_tok=2)


def make_big_checkpoint(path: Path) -> Path:
    """A random Mixtral-shaped checkpoint (transformers, float32), written once."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(max_position_embeddings=512, **BIG))
    model.save_pretrained(path, safe_serialization=True)
    return path


def prompts_for(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(4, 12))] for _ in range(n)]


# ---- every rank ---------------------------------------------------------------------------------------------------
def rank_fn(topology, model_dir: str, prompts, warmup: int, normal: int, step_bytes: int) -> dict:
    import numpy as np
    import torch

    from comm.strategy import Strategy
    from epserve.engine.builder import build_runner
    from epserve.engine.control import ControlChannel
    from epserve.engine.plan import (GREEDY, REPLACE_BEGIN, REPLACE_COMMIT, REPLACE_NONE, SeqWork, StepPlan)
    from epserve.engine.replace import Bundle, LiveReplacement, expert_bytes_of
    from placement.placement import Placement

    torch.set_num_threads(1)
    G, out = topology.world_size, {}
    for mode in MODES:
        runner = build_runner(model_dir, topology, strategy=Strategy.TWO_A2A)
        live = LiveReplacement(runner, ControlChannel(topology, counters=runner.counters))
        start = runner.placement
        g = np.random.default_rng(7)
        target = Placement(np.stack([g.permutation(row) for row in start.expert_to_gpu_LE]), start.cluster,
                           solver={"name": "permuted"})
        per_expert = expert_bytes_of(runner)
        budget = {"chunked": step_bytes, "layer_per_step": None, "stop_the_world": None}.get(mode)
        bundle = Bundle(target, None, 2).scheduled(start, expert_bytes=per_expert, step_bytes=budget)
        ops = [REPLACE_BEGIN, *range(len(bundle.schedule)), REPLACE_COMMIT]
        if mode == "stop_the_world":
            ops = [tuple(ops)]          # every op at one boundary
        elif mode == "no_swap":
            ops = []
        works = tuple(SeqWork(i, tuple(p), 0, i % G, GREEDY) for i, p in enumerate(prompts))
        last = dict(runner.execute(StepPlan(step=0, work=works)).next_token_ids)
        tokens = {i: [t] for i, t in last.items()}
        plan_ops = [REPLACE_NONE] * (warmup + normal) + ops + [REPLACE_NONE] * normal
        times, kinds = [], []
        for s, op in enumerate(plan_ops, start=1):
            works = tuple(SeqWork(i, (last[i],), len(p) + s - 1, i % G, GREEDY) for i, p in enumerate(prompts))
            t0 = time.perf_counter()
            for one in (op if isinstance(op, tuple) else (op,)):
                live.boundary(StepPlan(step=s, replace=one), bundle=bundle if topology.rank == 0 else None)
            result = runner.execute(StepPlan(step=s, work=works))
            times.append(time.perf_counter() - t0)
            kinds.append("warmup" if s <= warmup else "swap" if op != REPLACE_NONE else "normal")
            last = dict(result.next_token_ids)
            for i, t in last.items():
                tokens[i].append(t)
        moves = sum(len(st.moves) for st in bundle.schedule)
        out[mode] = {"step_s": times, "kinds": kinds, "tokens": [tokens[i] for i in range(len(prompts))],
                     "expert_moves": moves if mode != "no_swap" else 0, "expert_bytes": per_expert,
                     "schedule_steps": len(bundle.schedule), "version": live.version}
        del runner, live
    return out


# ---- orchestration ------------------------------------------------------------------------------------------------
def measure(model_dir: Path, args) -> dict:
    from comm.spawn import spawn_ranks
    from epserve.model.config import ModelConfig
    cfg = ModelConfig.from_dir(model_dir)
    prompts = prompts_for(args.batch, cfg.vocab_size)
    per_rank = spawn_ranks(rank_fn, args.ranks, (str(model_dir), prompts, args.warmup, args.normal,
                                                 int(args.step_mb * (1 << 20))), timeout_s=args.timeout)
    rows = []
    for mode in MODES:
        r0 = per_rank[0][mode]
        step_s = [max(r[mode]["step_s"][i] for r in per_rank) for i in range(len(r0["step_s"]))]
        normal = [t for t, k in zip(step_s, r0["kinds"]) if k == "normal"]
        swap = [t for t, k in zip(step_s, r0["kinds"]) if k == "swap"]
        p50 = statistics.median(normal)
        rows.append({"model": model_dir.name, "mode": mode, "normal_step_ms": 1e3 * p50,
                     "longest_normal_step_ms": 1e3 * max(normal),
                     "longest_swap_step_ms": 1e3 * max(swap) if swap else None,
                     "longest_over_normal": max(swap) / p50 if swap else None,
                     "swap_steps": len(swap), "swap_s": sum(swap) if swap else 0.0,
                     "swap_steps_ms": [round(1e3 * t, 1) for t in swap],
                     "moved_mb": r0["expert_moves"] * r0["expert_bytes"] / 2 ** 20,
                     "same_tokens_as_no_swap": _same_prefix(r0["tokens"], per_rank[0]["no_swap"]["tokens"]),
                     "version_after": r0["version"]})
    return {"model": model_dir.name, "experts": cfg.num_experts, "moe_layers": cfg.num_moe_layers,
            "hidden": cfg.hidden_size, "expert_intermediate": cfg.moe_intermediate_size,
            "expert_mb": per_rank[0]["no_swap"]["expert_bytes"] / 2 ** 20, "rows": rows}


def _same_prefix(mine: list[list[int]], ref: list[list[int]]) -> bool:
    """Each sequence's tokens agree with the no-swap run's as far as both ran (a swap adds decode steps)."""
    return all(a[:len(b)] == b[:len(a)] for a, b in zip(mine, ref)) and len(mine) == len(ref)


def write_report(out: Path, result: dict) -> None:
    (out / "replace_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    s = result["setup"]
    lines = ["# Live re-placement: the longest step during a swap against a normal step", "", s["summary"], ""]
    for m in result["models"]:
        lines += [f"## {m['model']}: {m['moe_layers']} MoE layers x {m['experts']} experts, hidden {m['hidden']}, "
                  f"expert intermediate {m['expert_intermediate']} ({m['expert_mb']:.2f} MB per expert)", "",
                  "| mode | normal step p50 ms | longest normal step ms | longest swap step ms | longest swap / "
                  "normal p50 | swap steps | swap s | moved MB | same tokens |", "|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            if r["mode"] == "no_swap":
                continue
            lines.append(f"| {r['mode']} | {r['normal_step_ms']:.1f} | {r['longest_normal_step_ms']:.1f} | "
                         f"{r['longest_swap_step_ms']:.1f} | "
                         f"{r['longest_over_normal']:.2f}x | {r['swap_steps']} | {r['swap_s']:.2f} | "
                         f"{r['moved_mb']:.1f} | {r['same_tokens_as_no_swap']} |")
        lines.append("")
    lines += ["Target (issue 10): longest step during a swap <= 2x a normal step.", ""]
    (out / "replace_bench.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="sequences decoding during the swap")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--normal", type=int, default=16, help="timed normal steps before and after the swap")
    p.add_argument("--step-mb", type=float, default=8.0, help="chunked mode: MiB per rank per step (the default "
                                                               "of serve --replace-step-mb)")
    p.add_argument("--no-big", action="store_true", help="only the default model")
    p.add_argument("--quick", action="store_true", help="fewer steps, default model only (a smoke run)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=str(LOCAL_OUT),
                   help=OUT_HELP)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.normal, args.no_big = 2, 4, True
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    models = [ROOT / "epserve" / "assets" / "default_model"]
    with tempfile.TemporaryDirectory(prefix="epserve-replace-bench-") as tmp:
        if not args.no_big:
            models.append(make_big_checkpoint(Path(tmp) / "mixtral_512x1536"))
        results = [measure(m, args) for m in models]
    setup = {"ranks": args.ranks, "batch": args.batch, "warmup": args.warmup, "normal": args.normal,
             "step_mb": args.step_mb, "cpus": os.cpu_count(),
             "summary": f"{args.ranks} gloo ranks on this {os.cpu_count()}-core CPU machine (one thread each), "
                        f"two_a2a, a decode batch of {args.batch}; contiguous placement -> every layer permuted; "
                        f"chunked: at most {args.step_mb:g} MiB sent or received per rank per step. Times: the "
                        f"slowest rank per step (boundary + execute); normal = the {args.normal} steps before and "
                        f"after the swap."}
    result = {"setup": setup, "models": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, result)
    print((out / "replace_bench.md").read_text())
    bad = [r for m in results for r in m["rows"] if not r["same_tokens_as_no_swap"] or (
        r["mode"] != "no_swap" and r["version_after"] != 2)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
