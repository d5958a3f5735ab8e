"""EP communication benchmark: every strategy x placement on the same model, batch and routing, in one run.

    build (once, cached) a Mixtral-family checkpoint: 8 MoE layers, 64 experts, top-6, hidden 256
    A. routing FORCED from the real FLAME-MoE-290M decoder trace (a random-weight model has no inter-layer
       affinity of its own): token (seq, pos) at MoE layer l uses the trace's experts and weights;
       spawn G gloo ranks --> per (strategy, placement): prefill 64 sequences, 9 decode steps timed between
       barriers, round-robin over the configs; counters of the decode steps
    B. the model's own routing: a recorded run on other prompts (world size 1) builds the speculative
       predictor and a solved placement --> the same measurement for all four strategies (+ held-out
       predictor accuracy)
    C. spawn G ranks again --> DeepSpeed-MoE (deepspeed.moe.layer.MoE) vs our dispatchers on ONE MoE layer
       with the same weights, gate and 64-token batch; outputs compared
    --> OUT/comm_bench.json + comm_bench.md (ratios against two_a2a + contiguous of the same run)

    --family deepseek_v3: A only, on a DeepSeek-V3-family checkpoint with the same MoE dimensions (8 MoE layers,
       64 routed experts, top-6, hidden 256; + 1 shared expert, no dense layer) whose MLA K/V row is one latent
       [kv_lora_rank 16 + qk_rope_head_dim 4] = 20 values per token-layer, 12.8x narrower than the hidden state
       (DeepSeek-V3: 576 vs 7168, 12.4x), vs Mixtral's 4 KV heads x (32 + 32) = 256 values.
       B is skipped (the Mixtral top-2 predictor study), C too (DeepSpeed-MoE's softmax gate is not DeepSeek's
       sigmoid group-limited router) --> bench/results/comm_bench_deepseek_v3.json + .md

Run:  nice -n 10 python bench/comm_bench.py [--world-size 4] [--repeats 5] [--no-deepspeed] [--family deepseek_v3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from comm.counters import CollKind, CommCounters  # noqa: E402
from comm.spawn import spawn_ranks  # noqa: E402
from comm.strategy import Strategy  # noqa: E402
from epserve.engine.builder import build_runner  # noqa: E402
from epserve.engine.plan import SeqWork, StepPlan  # noqa: E402
from epserve.model.config import ModelConfig  # noqa: E402
from epserve.training.tiny_models import make_tiny_checkpoint  # noqa: E402
from placement.cluster import ClusterShape  # noqa: E402
from placement.placement import Placement, contiguous_placement  # noqa: E402
from placement.trace import RoutingTrace  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "flame-moe-290m" / "flame290m_decoder_10pos_x64seq_top6.npz"
ENCODER_TRACE = TRACE.with_name("flame290m_encoder_2048tok_top6.npz")
MODEL = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=256, num_local_experts=64, num_experts_per_tok=6, vocab_size=512,
             max_position_embeddings=64)                      # A and C: the FLAME trace's 64 experts, top-6
MODEL_B = dict(MODEL, num_local_experts=32, num_experts_per_tok=2)   # B: Mixtral-like top-2 routing
# --family deepseek_v3, A only: the same MoE dimensions (every layer MoE; the forced routing replaces the sigmoid
# group-limited router's choices, so one group), MLA with a latent 12.8x narrower than the hidden state
MODEL_DSV3 = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=256, moe_intermediate_size=256, n_routed_experts=64, num_experts_per_tok=6,
                  n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1, q_lora_rank=32,
                  kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, vocab_size=512,
                  max_position_embeddings=64)


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: tuple[tuple[int, ...], ...]   # sequence s (seq_id s) starts with prompts[s]
    decode_steps: int
    forced: RoutingTrace | None = None     # routing replayed from this trace; None: the model's own router


@dataclass(frozen=True)
class Config:
    name: str
    strategy: Strategy
    placement: Placement
    predictor_path: Path | None = None


@dataclass(frozen=True)
class Spec:
    ckpt: Path
    workload: Workload
    configs: tuple[Config, ...]
    repeats: int
    layer_iters: int = 0


def build_checkpoint(out: Path, model: dict, family: str = "mixtral") -> Path:
    key = f"{family}-" + "-".join(f"{k}{v}" for k, v in sorted(model.items()))
    if len(key) > 200:   # a file name holds 255 bytes: the DeepSeek key is hashed
        key = f"{family}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"
    path = out / "tmp" / key
    if not (path / "config.json").is_file():
        make_tiny_checkpoint(family, path, seed=0, **model)
    return path


def barrier(topology) -> None:
    if topology.is_distributed:
        dist.barrier(group=topology.group)


# ---- rank side: whole decode steps ---------------------------------------------------------------------
def decode_rank(topology, spec: Spec) -> list[dict]:
    """Every config's runner is built first; the timed runs then go round-robin over the configs, so a change
    in machine load hits them alike (rep 0 warms up)."""
    wl = spec.workload
    blocks = len(wl.prompts) * -(-(max(map(len, wl.prompts)) + wl.decode_steps) // 16)
    runners = [build_runner(spec.ckpt, topology, strategy=c.strategy, placement=c.placement,
                            predictor_path=c.predictor_path, kv_cache_tokens=16 * blocks,
                            forced_routing_trace=wl.forced) for c in spec.configs]
    out = [{"name": c.name, "decode_s": [], "expert_bytes": r.load_report.expert_bytes}
           for c, r in zip(spec.configs, runners)]
    for rep in range(spec.repeats + 1):
        for runner, res in zip(runners, out):
            secs, tokens, kv_used = _one_run(topology, runner, wl)
            if rep:
                res["decode_s"].append(secs)
            res.update(tokens=tokens, counters=runner.counters.to_rows(), kv_used_bytes=kv_used)
    return out


def _one_run(topology, runner, wl: Workload):
    """Prefill every prompt in one step, then ``decode_steps`` decode steps, timed between barriers. The
    counters hold the decode steps only."""
    G, seqs = topology.world_size, range(len(wl.prompts))
    homes = [runner.preferred_home_rank(p) for p in wl.prompts]
    homes = [s % G if h is None else h for s, h in enumerate(homes)]
    nxt = runner.execute(StepPlan(step=0, work=tuple(SeqWork(s, wl.prompts[s], 0, homes[s]) for s in seqs)))
    tokens = {s: [nxt.next_token_ids[s]] for s in seqs}
    runner.counters.reset()
    barrier(topology)
    t0 = time.perf_counter()
    for step in range(1, wl.decode_steps + 1):
        work = tuple(SeqWork(s, (tokens[s][-1],), len(wl.prompts[s]) + step - 1, homes[s]) for s in seqs)
        nxt = runner.execute(StepPlan(step=step, work=work)).next_token_ids
        for s in seqs:
            tokens[s].append(nxt[s])
    barrier(topology)
    secs = time.perf_counter() - t0
    kv_used = runner.kv_stats().per_rank[topology.rank].used_bytes
    runner.execute(StepPlan(step=wl.decode_steps + 1, release=tuple(seqs)))
    return secs, tokens, kv_used


# ---- rank side: one MoE layer, DeepSpeed vs ours -------------------------------------------------------
def layer_rank(topology, spec: Spec) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")   # CPU ranks: skips DeepSpeed's detection warning per rank
    import deepspeed
    from deepspeed.moe.layer import MoE

    from comm.dispatchers import make_dispatcher
    from comm.primitives import Collectives
    from epserve.model.layers import ExpertMLP

    deepspeed.init_distributed(dist_backend="gloo")
    G, me = topology.world_size, topology.rank
    runner = build_runner(spec.ckpt, topology, strategy=Strategy.TWO_A2A, placement=None, kv_cache_tokens=16)
    cfg, block = runner.model.config, runner.model.layers[0].mlp
    ds = MoE(hidden_size=cfg.hidden_size, expert=ExpertMLP(cfg.hidden_size, cfg.moe_intermediate_size),
             num_experts=cfg.num_experts, ep_size=G, k=cfg.top_k, min_capacity=0, drop_tokens=False,
             use_rts=False, top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    ds.eval()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(block.router.weight)
        for i, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):   # DeepSpeed: contiguous
            expert.load_state_dict(block.experts.expert_weights(me * (cfg.num_experts // G) + i))
    T = 64
    h_TD = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    mine_N = torch.arange(me, T, G)
    res = {"rank": me}
    impls = {"deepspeed": lambda: ds(h_TD[mine_N])[0]}
    for strategy in (Strategy.TWO_A2A, Strategy.COHERENT):
        coll = Collectives(topology, CommCounters())
        d = make_dispatcher(strategy, coll, torch.as_tensor(runner.placement.expert_to_gpu_LE), top_k=cfg.top_k,
                            hidden_size=cfg.hidden_size, dtype=torch.float32)
        impls[strategy.value] = lambda d=d: _our_layer(block, d, h_TD[mine_N], mine_N, T)
        res[f"{strategy.value}_counters"] = coll.counters      # filled in while timing; rows below
    with torch.inference_mode():
        outs = {name: fn() for name, fn in impls.items()}    # warm-up, and the outputs compared
        times = {name: [] for name in impls}
        for _ in range(spec.layer_iters):                    # round-robin, so load changes hit all alike
            for name, fn in impls.items():
                barrier(topology)
                t0 = time.perf_counter()
                fn()
                barrier(topology)
                times[name].append(time.perf_counter() - t0)
        res["ids_TK"] = block.router.route(h_TD)[1].numpy()
    for name, out in outs.items():
        res[f"{name}_y"] = tuple(t.numpy() for t in out) if isinstance(out, tuple) else out.numpy()
        res[f"{name}_s"] = float(np.median(times[name]))
    for strategy in (Strategy.TWO_A2A, Strategy.COHERENT):
        res[f"{strategy.value}_counters"] = res[f"{strategy.value}_counters"].to_rows()
    return res


def _our_layer(block, dispatcher, x_ND, token_N, num_step_tokens: int):
    w_NK, ids_NK = block.router.route(x_ND)
    work, handle = dispatcher.dispatch(x_ND, token_N, ids_NK, w_NK, torch.zeros(len(token_N), dtype=torch.bool),
                                       layer=0, step_has_prefill=False, num_step_tokens=num_step_tokens)
    partial_MD = block.local_weighted_sum(work.x_MD, work.topk_ids_MK, work.topk_weights_MK, work.use_MK)
    got = dispatcher.combine(partial_MD, handle)
    return got.token_A, got.y_AD


# ---- parent side: figures ------------------------------------------------------------------------------
def decode_figures(per_rank: list[list[dict]], spec: Spec, G: int, L: int) -> tuple[list[dict], bool]:
    wl = spec.workload
    seqs, steps = len(wl.prompts), wl.decode_steps
    token_layers = seqs * steps * L
    rows = []
    for i, cfg in enumerate(spec.configs):
        c = CommCounters.merged([CommCounters.from_rows(per_rank[r][i]["counters"]) for r in range(G)])
        a2a = c.total(CollKind.ALL_TO_ALL)
        kv = c.total(CollKind.KV_COHERENCE)
        decode_s = float(np.median(per_rank[0][i]["decode_s"]))
        rows.append({
            "config": cfg.name, "strategy": cfg.strategy.value, "placement": cfg.placement.solver.get("name", "?"),
            "dispatch_transfers": c.total(CollKind.ALL_TO_ALL, phase="dispatch").rows,
            "combine_transfers": c.total(CollKind.ALL_TO_ALL, phase="combine").rows,
            "transfers_per_token_layer": a2a.rows / token_layers,
            "cross_node_transfers": a2a.cross_node_rows,
            "payload_bytes_per_token_layer": a2a.payload_bytes / token_layers,
            "wire_bytes_per_token_layer": a2a.wire_bytes / token_layers,
            "data_all_to_alls_per_layer": a2a.calls / (steps * L),
            "a2a_splits_per_layer": c.total(CollKind.A2A_SPLITS).calls / (steps * L),
            "kv_entry_copies_per_token_layer": kv.rows / token_layers,
            "kv_copy_bytes_per_token": kv.payload_bytes / (seqs * steps),
            "kv_payload_bytes_per_token_layer": kv.payload_bytes / token_layers,
            "kv_wire_bytes_per_token_layer": kv.wire_bytes / token_layers,
            "all_payload_bytes_per_token_layer": (a2a.payload_bytes + kv.payload_bytes) / token_layers,
            "sampled_id_wire_bytes_per_step": c.total(CollKind.ALL_GATHER, phase="sampled_ids").wire_bytes / steps,
            "kv_used_bytes_per_rank_max": max(per_rank[r][i]["kv_used_bytes"] for r in range(G)),
            "expert_bytes_per_rank": per_rank[0][i]["expert_bytes"],
            "decode_s_median": decode_s, "decode_tokens_per_s": seqs * steps / decode_s,
            "decode_tokens_per_s_best": seqs * steps / min(per_rank[0][i]["decode_s"]),
            "decode_s_all": per_rank[0][i]["decode_s"],
        })
    base = rows[0]
    for row in rows:
        row["transfers_ratio_vs_baseline"] = row["transfers_per_token_layer"] / base["transfers_per_token_layer"]
        row["speed_ratio_vs_baseline"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        row["best_speed_ratio_vs_baseline"] = row["decode_tokens_per_s_best"] / base["decode_tokens_per_s_best"]
        row["all_bytes_ratio_vs_baseline"] = (row["all_payload_bytes_per_token_layer"]
                                              / base["all_payload_bytes_per_token_layer"])
    tokens = [per_rank[0][i]["tokens"] for i in range(len(spec.configs))]
    same = all(t == tokens[0] for t in tokens) and all(per_rank[r][i]["tokens"] == tokens[i]
                                                        for r in range(G) for i in range(len(tokens)))
    return rows, same


def layer_figures(per_rank: list[dict], G: int, E: int) -> dict:
    T = per_rank[0]["ids_TK"].shape[0]
    ds_TD = np.zeros((T, per_rank[0]["deepspeed_y"].shape[1]), dtype=np.float32)
    for r, res in enumerate(per_rank):
        ds_TD[np.arange(r, T, G)] = res["deepspeed_y"]
    out = {"tokens": T, "deepspeed_s_per_layer": per_rank[0]["deepspeed_s"]}
    for name in ("two_a2a", "coherent"):
        ours_TD = np.full_like(ds_TD, np.nan)
        for res in per_rank:
            tok_A, y_AD = res[f"{name}_y"]
            ours_TD[tok_A] = y_AD
        c = CommCounters.merged([CommCounters.from_rows(res[f"{name}_counters"]) for res in per_rank])
        out[name] = {"s_per_layer": per_rank[0][f"{name}_s"],
                     "max_abs_diff_vs_deepspeed": float(np.nanmax(np.abs(ours_TD - ds_TD))),
                     "transfers_per_call": c.total(CollKind.ALL_TO_ALL).rows / c.total(CollKind.ALL_TO_ALL,
                                                                                     phase="dispatch").calls}
    ids_TK = per_rank[0]["ids_TK"]
    cap = max(np.bincount(ids_TK[np.arange(r, T, G)].ravel(), minlength=E).max() for r in range(G))
    out["deepspeed_capacity"] = int(cap)
    out["deepspeed_rows_per_call"] = int(2 * G * (G - 1) * (E // G) * cap)   # dispatch + combine, padded
    return out


def _decode_table(rows: list[dict]) -> list[str]:
    lines = ["| config | transfers/token-layer (vs base) | hidden B/token-layer | data a2a/layer | count a2a/layer | "
             "KV copies/token-layer | KV B/token-layer | hidden+KV B/token-layer (vs base) | KV used B/rank | "
             "decode tok/s median (vs base) | decode tok/s best (vs base) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['transfers_per_token_layer']:.3f} ({r['transfers_ratio_vs_baseline']:.3f}) | "
                     f"{r['payload_bytes_per_token_layer']:.0f} | {r['data_all_to_alls_per_layer']:.2f} | "
                     f"{r['a2a_splits_per_layer']:.2f} | {r['kv_entry_copies_per_token_layer']:.2f} | "
                     f"{r['kv_payload_bytes_per_token_layer']:.0f} | {r['all_payload_bytes_per_token_layer']:.0f} ({r['all_bytes_ratio_vs_baseline']:.3f}) | "
                     f"{r['kv_used_bytes_per_rank_max']} | {r['decode_tokens_per_s']:.1f} "
                     f"({r['speed_ratio_vs_baseline']:.2f}) | {r['decode_tokens_per_s_best']:.1f} "
                     f"({r['best_speed_ratio_vs_baseline']:.2f}) |")
    return lines


def write_report(out: Path, result: dict, stem: str = "comm_bench") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    setup = result["setup"]
    family = setup.get("family", "mixtral")
    family = "" if family == "mixtral" else f", {family}"
    lines = [f"# EP communication benchmark ({setup['world_size']} gloo ranks, one CPU machine{family})", "",
             setup["summary"], ""]
    for key, title in (("flame", "A. Routing forced from the real FLAME-MoE-290M trace"),
                       ("natural", "B. The model's own routing, with speculative strategies")):
        if key not in result:
            continue
        sec = result[key]
        lines += [f"## {title}", "", sec["about"], ""] + _decode_table(sec["rows"])
        lines += ["", f"Output tokens identical across all configs and ranks: {sec['tokens_identical']}", ""]
        if "predictor_accuracy" in sec:
            lines += ["Predictor accuracy on held-out prompts (predicted rank is one of the token's expert ranks), "
                      "per MoE layer:", ""]
            for name, acc in sec["predictor_accuracy"].items():
                lines.append(f"- {name}: " + ", ".join(f"{a:.2f}" for a in acc["accuracy_L"])
                             + f" (confident: layer 0 {acc['confident_L'][0]:.2f}, accuracy when confident "
                             f"{acc['confident_accuracy_L'][0]:.2f})")
            lines.append("")
    if "layer" in result:
        lay = result["layer"]
        lines += [f"## C. One MoE layer, {lay['tokens']} tokens: DeepSpeed-MoE vs ours (same weights, gate, batch)",
                  "", "| implementation | ms per layer call (median) | rows moved per call | max abs diff vs DeepSpeed |",
                  "|---|---|---|---|",
                  f"| deepspeed.moe.layer.MoE (drop_tokens=False, capacity {lay['deepspeed_capacity']}) | "
                  f"{lay['deepspeed_s_per_layer'] * 1e3:.2f} | {lay['deepspeed_rows_per_call']} (capacity-padded) | 0 |"]
        for name in ("two_a2a", "coherent"):
            x = lay[name]
            lines.append(f"| ours {name} | {x['s_per_layer'] * 1e3:.2f} | {x['transfers_per_call']:.0f} | "
                         f"{x['max_abs_diff_vs_deepspeed']:.2e} |")
    lines += [f"Skipped: {why}" for why in setup.get("skipped", ())]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def flame_section(ckpt: Path, cluster: ClusterShape, args) -> tuple[Spec, str]:
    trace = RoutingTrace.load(TRACE)
    contiguous = contiguous_placement(trace.num_layers, trace.num_experts, cluster)
    solved = solve_placement(RoutingTrace.load(ENCODER_TRACE), cluster)
    configs = tuple(Config(f"{s.value}+{pn}", s, pl) for s in (Strategy.TWO_A2A, Strategy.COHERENT)
                    for pn, pl in (("contiguous", contiguous), ("solved", solved)))
    seqs = sorted(set(trace.seq_ids_T.tolist()))
    wl = Workload("flame", tuple((1 + s,) for s in seqs), int(trace.positions_T.max()), forced=trace)
    about = ("64 sequences: position 0 prefilled, then 9 decode steps (positions 1..9) measured; every token's "
             "experts and weights at every MoE layer are those of the same (sequence, position) in the FLAME "
             "decoder trace. `solved` = local-search placement fitted on the FLAME encoder trace, whose tokens "
             "overlap the decoder trace's (in-distribution, not held-out). The trace has no vocabulary ids, so no "
             "speculative predictor can be built from it: the speculative strategies are measured in B only.")
    return Spec(ckpt, wl, configs, args.repeats, args.layer_iters), about


def natural_section(ckpt: Path, cluster: ClusterShape, args, work: Path) -> tuple[Spec, str, dict]:
    """Prompts of random ids; a predictor built from a recorded run on OTHER prompts (world size 1)."""
    from placement.predictor import SpeculativePredictor
    train = _prompts(seed=11, n=64, length=8)
    test = _prompts(seed=22, n=64, length=8)
    fit = _record(ckpt, train, new_tokens=6)
    held_out = _record(ckpt, test, new_tokens=10)
    contiguous = contiguous_placement(fit.num_layers, fit.num_experts, cluster)
    solved = solve_placement(fit, cluster)
    configs, accuracy = [], {}
    for pn, pl in (("contiguous", contiguous), ("solved", solved)):
        predictor = SpeculativePredictor.build(fit, pl)
        path = work / f"natural-{pn}.predictor.npz"
        predictor.save(path)
        accuracy[pn] = predictor.accuracy(held_out, pl)
        configs += [Config(f"two_a2a+{pn}", Strategy.TWO_A2A, pl),
                    Config(f"speculative_two_a2a+{pn}", Strategy.SPECULATIVE_TWO_A2A, pl, path),
                    Config(f"coherent+{pn}", Strategy.COHERENT, pl),
                    Config(f"speculative+{pn}", Strategy.SPECULATIVE, pl, path)]
    wl = Workload("natural", tuple(tuple(p) for p in test), 9)
    about = ("A top-2 variant of the model (32 experts, top-2, otherwise the same) routing with its own "
             "random-weight router: 64 prompts of 8 random ids, prefilled in one step, then 9 decode steps measured. Predictor and `solved` placement fitted on a recorded run "
             "of 64 OTHER prompts (world size 1); accuracy below is on the measured prompts' routing. A random "
             "model has little inter-layer affinity, so `solved` gains little here; what the speculative start "
             "can win is at the first MoE layer (its rank depends mostly on the token id).")
    return Spec(ckpt, wl, tuple(configs), args.repeats), about, accuracy


def _prompts(*, seed: int, n: int, length: int) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(3, MODEL["vocab_size"], size=length).tolist() for _ in range(n)]


def _record(ckpt: Path, prompts: list[list[int]], *, new_tokens: int) -> RoutingTrace:
    from comm.topology import EPTopology
    from epserve.engine.generate import generate
    torch.set_num_threads(1)
    runner = build_runner(ckpt, EPTopology.single(), strategy=Strategy.TWO_A2A,
                          record_tokens=sum(map(len, prompts)) + len(prompts) * new_tokens)
    generate(runner, prompts, new_tokens)
    return runner.recorder.gather(runner.coll)


def solve_placement(fit: RoutingTrace, cluster: ClusterShape) -> Placement:
    from placement.solvers import SolveOptions, SolverKind, solve
    from placement.stats import compute_stats
    return solve(compute_stats(fit), cluster, SolveOptions(solver=SolverKind.LOCAL, time_limit=20.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer-iters", type=int, default=30)
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--family", choices=("mixtral", "deepseek_v3"), default="mixtral",
                   help="deepseek_v3: part A only, on a DeepSeek-V3-family (MLA) checkpoint of the same MoE sizes")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    G = args.world_size
    if not TRACE.is_file():
        print(f"comm_bench: the FLAME trace is missing ({TRACE})", file=sys.stderr)
        return 2
    t0 = time.time()
    if args.family == "deepseek_v3":
        return _main_deepseek(args, t0)
    ckpt, ckpt_b = build_checkpoint(args.out, MODEL), build_checkpoint(args.out, MODEL_B)
    cluster = ClusterShape(gpus_per_node=G)
    L = MODEL["num_hidden_layers"]
    result = {"setup": {"family": "mixtral", "world_size": G, "model": MODEL, "model_b": MODEL_B,
                        "trace": str(TRACE), "repeats": args.repeats, "layer_iters": args.layer_iters,
                        "torch": torch.__version__, **_kv_row_setup(ckpt),
                        "summary": SUMMARY.format(G=G, R=args.repeats)}}
    flame, about = flame_section(ckpt, cluster, args)
    rows, same = decode_figures(spawn_ranks(decode_rank, G, (flame,), timeout_s=3000), flame, G, L)
    result["flame"] = {"about": about, "rows": rows, "tokens_identical": same}
    natural, about, accuracy = natural_section(ckpt_b, cluster, args, ckpt_b.parent)
    rows, same = decode_figures(spawn_ranks(decode_rank, G, (natural,), timeout_s=3000), natural, G, L)
    result["natural"] = {"about": about, "rows": rows, "tokens_identical": same, "predictor_accuracy": accuracy}
    if not args.no_deepspeed:
        result["layer"] = layer_figures(spawn_ranks(layer_rank, G, (flame,), timeout_s=1800), G,
                                        MODEL["num_local_experts"])
    result["setup"]["wall_s"] = time.time() - t0
    write_report(args.out, result)
    print((args.out / "comm_bench.md").read_text())
    return 0


def _kv_row_setup(ckpt: Path) -> dict:
    """The K/V row coherent EP copies per token-layer: (heads, key width, value width) and its size."""
    cfg = ModelConfig.from_dir(ckpt)
    return {"kv_row": list(cfg.kv_row), "kv_values_per_token_layer": cfg.kv_values_per_token_layer,
            "hidden_over_kv_row": cfg.hidden_size / cfg.kv_values_per_token_layer}


def _main_deepseek(args, t0: float) -> int:
    """--family deepseek_v3: part A on the MLA checkpoint; B and C are skipped (see the module docstring)."""
    G = args.world_size
    ckpt = build_checkpoint(args.out, MODEL_DSV3, "deepseek_v3")
    cfg = ModelConfig.from_dir(ckpt)
    cluster = ClusterShape(gpus_per_node=G)
    heads, k, v = cfg.kv_row
    kv = _kv_row_setup(ckpt)
    skipped = ["B (the model's own routing, speculative strategies) is a Mixtral top-2 predictor study; not run "
               "for deepseek_v3.",
               "C (DeepSpeed-MoE vs ours on one layer) compares against DeepSpeed's softmax top-k gate, which is "
               "not DeepSeek-V3's sigmoid group-limited router (+ shared expert); not run for deepseek_v3."]
    result = {"setup": {"family": "deepseek_v3", "world_size": G, "model": MODEL_DSV3, "trace": str(TRACE),
                        "repeats": args.repeats, "torch": torch.__version__, **kv, "skipped": skipped,
                        "summary": SUMMARY_DSV3.format(G=G, R=args.repeats, heads=heads, k=k, v=v,
                                                       kv=kv["kv_values_per_token_layer"],
                                                       ratio=kv["hidden_over_kv_row"], **MODEL_DSV3)}}
    flame, about = flame_section(ckpt, cluster, args)
    about += (" The forced weights are the trace's as they are (the sigmoid router, its group limit and "
              "routed_scaling_factor are bypassed); the shared expert runs wherever the token is, moving nothing.")
    rows, same = decode_figures(spawn_ranks(decode_rank, G, (flame,), timeout_s=3000), flame, G,
                                cfg.num_moe_layers)
    result["flame"] = {"about": about, "rows": rows, "tokens_identical": same}
    result["setup"]["wall_s"] = time.time() - t0
    write_report(args.out, result, "comm_bench_deepseek_v3")
    print((args.out / "comm_bench_deepseek_v3.md").read_text())
    return 0


SUMMARY_DSV3 = ("Model: DeepSeek-V3-family, {num_hidden_layers} layers all MoE (first_k_dense_replace 0), "
                "{n_routed_experts} routed experts, top-{num_experts_per_tok}, {n_shared_experts} shared expert, "
                "moe_intermediate {moe_intermediate_size}, hidden {hidden_size}, {num_attention_heads} heads, MLA "
                "(q_lora_rank {q_lora_rank}, kv_lora_rank {kv_lora_rank}, qk_rope {qk_rope_head_dim}, qk_nope "
                "{qk_nope_head_dim}, v_head {v_head_dim}), random weights (float32). K/V row per token-layer "
                "(heads, key width, value width) = ({heads}, {k}, {v}): ONE latent row of {kv} values "
                "({kv_lora_rank} latent + {qk_rope_head_dim} rotary key), hidden/row = {ratio:.1f}x (DeepSeek-V3: "
                "7168/576 = 12.4x; the Mixtral run's row is 4 x (32 + 32) = 256 values = the hidden size). "
                "{G} EP ranks over gloo on one 2-core CPU machine shared with other work: decode speeds are medians "
                "of {R} runs taken round-robin over the configs, and are dominated by Python and loopback latency, "
                "not bandwidth; the counts (transfers, bytes, collectives) are exact. Ratios are against two_a2a + "
                "contiguous in the same run.")


SUMMARY = ("Model: Mixtral-family, 8 MoE layers, 64 experts, top-6 (B: 32 experts, top-2), hidden 256, 8 heads "
           "(4 KV heads), random weights (float32). "
           "{G} EP ranks over gloo on one 2-core CPU machine shared with other work: decode speeds are medians of "
           "{R} runs taken round-robin over the configs, and are dominated by Python and loopback latency, not "
           "bandwidth; the counts (transfers, bytes, collectives) are exact. Ratios are against two_a2a + "
           "contiguous in the same run.")


if __name__ == "__main__":
    sys.exit(main())
