"""EP communication benchmark: every strategy x placement on the same model, batch and routing, in one run.

    build (once, cached) a Mixtral-family checkpoint: 8 MoE layers, 64 experts, top-6, hidden 256
    routing: a random-weight model has no inter-layer affinity of its own, so the router's choices are
             REPLACED by the real FLAME-MoE-290M decoder trace (64 sequences x positions 0..9, 64 experts,
             top-6): token (seq, pos) at MoE layer l uses the trace's experts and weights
    spawn G gloo ranks --> for each (strategy, placement): prefill position 0 of 64 sequences, then decode
             positions 1..9 (9 steps x 64 tokens), timed between barriers; counters of the decode steps
    spawn G ranks again --> DeepSpeed-MoE (deepspeed.moe.layer.MoE) vs our dispatchers on ONE MoE layer with
             the same weights, gate and 64-token batch (the model's own top-6 routing); outputs compared
    --> bench/results/comm_bench.json + comm_bench.md (ratios against two_a2a + contiguous of the same run)

Run:  nice -n 10 python bench/comm_bench.py [--world-size 4] [--repeats 3] [--no-deepspeed]
"""

from __future__ import annotations

import argparse
import json
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
from placement.cluster import ClusterShape  # noqa: E402
from placement.placement import Placement, contiguous_placement  # noqa: E402
from placement.trace import RoutingTrace  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "flame-moe-290m" / "flame290m_decoder_10pos_x64seq_top6.npz"
ENCODER_TRACE = TRACE.with_name("flame290m_encoder_2048tok_top6.npz")
MODEL = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=256, num_local_experts=64, num_experts_per_tok=6, vocab_size=512,
             max_position_embeddings=64)


@dataclass(frozen=True)
class Spec:
    ckpt: Path
    trace: RoutingTrace
    configs: tuple[tuple[str, Strategy, Placement], ...]   # (name, strategy, placement)
    repeats: int
    layer_iters: int


def build_checkpoint(out: Path) -> Path:
    from tests.tiny_models import make_tiny_checkpoint
    key = "mixtral-" + "-".join(f"{k}{v}" for k, v in sorted(MODEL.items()))
    path = out / "tmp" / key
    if not (path / "config.json").is_file():
        make_tiny_checkpoint("mixtral", path, seed=0, **MODEL)
    return path


def barrier(topology) -> None:
    if topology.is_distributed:
        dist.barrier(group=topology.group)


# ---- rank side: whole decode steps ---------------------------------------------------------------------
def decode_rank(topology, spec: Spec) -> list[dict]:
    seqs = sorted(set(spec.trace.seq_ids_T.tolist()))
    last_pos = int(spec.trace.positions_T.max())
    out = []
    for name, strategy, placement in spec.configs:
        runner = build_runner(spec.ckpt, topology, strategy=strategy, placement=placement,
                              kv_cache_tokens=len(seqs) * 16 * (1 + last_pos // 16), forced_routing_trace=spec.trace)
        times = []
        for rep in range(spec.repeats + 1):                      # rep 0 warms up
            runner.counters.reset()
            prefill = [SeqWork(s, (1 + s % 500,), 0, s % topology.world_size) for s in seqs]
            nxt = runner.execute(StepPlan(step=0, work=tuple(prefill))).next_token_ids
            tokens = {s: [nxt[s]] for s in seqs}
            prefill_rows = runner.counters.to_rows()
            runner.counters.reset()
            barrier(topology)
            t0 = time.perf_counter()
            for pos in range(1, last_pos + 1):
                work = tuple(SeqWork(s, (tokens[s][-1],), pos, s % topology.world_size) for s in seqs)
                nxt = runner.execute(StepPlan(step=pos, work=work)).next_token_ids
                for s in seqs:
                    tokens[s].append(nxt[s])
            barrier(topology)
            times.append(time.perf_counter() - t0)
            kv = runner.kv_stats()
            runner.execute(StepPlan(step=last_pos + 1, release=tuple(seqs)))
        out.append({"name": name, "decode_s": times[1:], "tokens": tokens, "counters": runner.counters.to_rows(),
                    "prefill_counters": prefill_rows, "kv_used_bytes": kv.per_rank[topology.rank].used_bytes,
                    "expert_bytes": runner.load_report.expert_bytes})
    return out


# ---- rank side: one MoE layer, DeepSpeed vs ours -------------------------------------------------------
def layer_rank(topology, spec: Spec) -> dict:
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
            expert.load_state_dict(block.experts[str(me * (cfg.num_experts // G) + i)].state_dict())
    T = 64
    h_TD = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    mine_N = torch.arange(me, T, G)
    res = {"rank": me}
    with torch.inference_mode():
        res["deepspeed_y"], res["deepspeed_s"] = _timed(topology, spec.layer_iters, lambda: ds(h_TD[mine_N])[0])
        for strategy in (Strategy.TWO_A2A, Strategy.COHERENT):
            coll = Collectives(topology, CommCounters())
            d = make_dispatcher(strategy, coll, torch.as_tensor(runner.placement.expert_to_gpu_LE),
                                top_k=cfg.top_k, hidden_size=cfg.hidden_size, dtype=torch.float32)
            y, secs = _timed(topology, spec.layer_iters, lambda: _our_layer(block, d, h_TD[mine_N], mine_N))
            res[f"{strategy.value}_y"], res[f"{strategy.value}_s"] = y, secs
            res[f"{strategy.value}_counters"] = coll.counters.to_rows()
        w_TK, ids_TK = block.router.route(h_TD)
        res["ids_TK"] = ids_TK.numpy()
    return res


def _our_layer(block, dispatcher, x_ND, token_N):
    w_NK, ids_NK = block.router.route(x_ND)
    work, handle = dispatcher.dispatch(x_ND, token_N, ids_NK, w_NK, torch.zeros(len(token_N), dtype=torch.bool),
                                       layer=0, step_has_prefill=False)
    partial_MD = block.local_weighted_sum(work.x_MD, work.topk_ids_MK, work.topk_weights_MK, work.use_MK)
    got = dispatcher.combine(partial_MD, handle)
    return got.token_A, got.y_AD


def _timed(topology, iters: int, fn):
    fn()                                                          # warm-up
    barrier(topology)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    barrier(topology)
    secs = (time.perf_counter() - t0) / iters
    if isinstance(out, tuple):
        return (out[0].numpy(), out[1].numpy()), secs
    return out.numpy(), secs


# ---- parent side: figures ------------------------------------------------------------------------------
def decode_figures(per_rank: list[list[dict]], spec: Spec, G: int) -> list[dict]:
    seqs = len(set(spec.trace.seq_ids_T.tolist()))
    steps = int(spec.trace.positions_T.max())
    L = spec.trace.num_layers
    token_layers = seqs * steps * L
    rows = []
    for i, (name, strategy, placement) in enumerate(spec.configs):
        c = CommCounters.merged([CommCounters.from_rows(per_rank[r][i]["counters"]) for r in range(G)])
        a2a = c.total(CollKind.ALL_TO_ALL)
        kv = c.total(CollKind.KV_COHERENCE)
        decode_s = float(np.median(per_rank[0][i]["decode_s"]))
        rows.append({
            "config": name, "strategy": strategy.value, "placement": placement.solver.get("name", "?"),
            "dispatch_transfers": c.total(CollKind.ALL_TO_ALL, phase="dispatch").rows,
            "combine_transfers": c.total(CollKind.ALL_TO_ALL, phase="combine").rows,
            "transfers_per_token_layer": a2a.rows / token_layers,
            "payload_bytes_per_token_layer": a2a.payload_bytes / token_layers,
            "wire_bytes_per_token_layer": a2a.wire_bytes / token_layers,
            "data_all_to_alls_per_layer": a2a.calls / (steps * L),
            "a2a_splits_per_layer": c.total(CollKind.A2A_SPLITS).calls / (steps * L),
            "kv_entry_copies_per_token_layer": kv.rows / token_layers,
            "kv_copy_bytes_per_token": kv.payload_bytes / (seqs * steps),
            "sampled_id_bytes_per_step": c.total(CollKind.ALL_GATHER, phase="sampled_ids").wire_bytes / steps,
            "kv_used_bytes_per_rank_max": max(per_rank[r][i]["kv_used_bytes"] for r in range(G)),
            "expert_bytes_per_rank": per_rank[0][i]["expert_bytes"],
            "decode_s_median": decode_s, "decode_tokens_per_s": seqs * steps / decode_s,
            "decode_s_all": per_rank[0][i]["decode_s"],
        })
    base = rows[0]
    for row in rows:
        row["transfers_ratio_vs_baseline"] = row["transfers_per_token_layer"] / base["transfers_per_token_layer"]
        row["speed_ratio_vs_baseline"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
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


def write_report(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm_bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = [f"# EP communication benchmark ({result['setup']['world_size']} gloo ranks, CPU)", "",
             result["setup"]["summary"], "",
             "| config | transfers/token-layer | payload B/token-layer | data a2a/layer | count a2a/layer | "
             "KV copies/token-layer | KV used B/rank | decode tok/s | transfers vs base | speed vs base |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['config']} | {r['transfers_per_token_layer']:.3f} | {r['payload_bytes_per_token_layer']:.0f} "
                     f"| {r['data_all_to_alls_per_layer']:.2f} | {r['a2a_splits_per_layer']:.2f} | "
                     f"{r['kv_entry_copies_per_token_layer']:.2f} | {r['kv_used_bytes_per_rank_max']} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['transfers_ratio_vs_baseline']:.3f} | "
                     f"{r['speed_ratio_vs_baseline']:.3f} |")
    lines += ["", f"Output tokens identical across all configs and ranks: {result['tokens_identical']}", ""]
    if "layer" in result:
        lay = result["layer"]
        lines += [f"## One MoE layer, {lay['tokens']} tokens, DeepSpeed-MoE vs ours (same weights, gate, batch)", "",
                  "| implementation | ms per layer call | rows moved per call | max abs diff vs DeepSpeed |",
                  "|---|---|---|---|",
                  f"| deepspeed.moe.layer.MoE (drop_tokens=False, capacity {lay['deepspeed_capacity']}) | "
                  f"{lay['deepspeed_s_per_layer'] * 1e3:.2f} | {lay['deepspeed_rows_per_call']} (capacity-padded) | 0 |"]
        for name in ("two_a2a", "coherent"):
            x = lay[name]
            lines.append(f"| ours {name} | {x['s_per_layer'] * 1e3:.2f} | {x['transfers_per_call']:.0f} | "
                         f"{x['max_abs_diff_vs_deepspeed']:.2e} |")
    (out / "comm_bench.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer-iters", type=int, default=20)
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    G = args.world_size
    if not TRACE.is_file():
        print(f"comm_bench: the FLAME trace is missing ({TRACE})", file=sys.stderr)
        return 2
    trace = RoutingTrace.load(TRACE)
    ckpt = build_checkpoint(args.out)
    cluster = ClusterShape(gpus_per_node=G)
    placements = {"contiguous": contiguous_placement(trace.num_layers, trace.num_experts, cluster)}
    placements.update(solved_placements(trace, cluster))
    configs = [(f"{s.value}+{pn}", s, pl) for s in (Strategy.TWO_A2A, Strategy.COHERENT)
               for pn, pl in placements.items()]
    spec = Spec(ckpt, trace, tuple(configs), args.repeats, args.layer_iters)
    t0 = time.time()
    decode_rows, same = decode_figures(spawn_ranks(decode_rank, G, (spec,), timeout_s=1800), spec, G)
    result = {"setup": {"world_size": G, "model": MODEL, "checkpoint": str(ckpt), "trace": str(TRACE),
                        "decode": "64 sequences: prefill position 0, then 9 decode steps (positions 1..9)",
                        "repeats": args.repeats, "torch": torch.__version__, "wall_s": None,
                        "summary": SUMMARY.format(G=G)},
              "decode": decode_rows, "tokens_identical": same}
    if not args.no_deepspeed:
        result["layer"] = layer_figures(spawn_ranks(layer_rank, G, (spec,), timeout_s=1800), G, trace.num_experts)
    result["setup"]["wall_s"] = time.time() - t0
    write_report(args.out, result)
    print((args.out / "comm_bench.md").read_text())
    return 0


SUMMARY = ("Model: Mixtral-family, 8 MoE layers, 64 experts, top-6, hidden 256, random weights. Routing is FORCED "
           "from the real FLAME-MoE-290M decoder trace (a random model has no inter-layer affinity of its own). "
           "Batch: 64 sequences; figures are for the 9 decode steps. {G} ranks over gloo on one CPU machine: the "
           "speeds are dominated by Python and loopback latency, not by bandwidth; counts are exact.")


def solved_placements(trace: RoutingTrace, cluster: ClusterShape) -> dict[str, Placement]:
    """The local-search solver fitted on the FLAME ENCODER trace (2048 tokens). Its tokens overlap the decoder
    trace's (README of the traces), so this is an in-distribution, not a held-out, measurement."""
    from placement.solvers import SolveOptions, SolverKind, solve
    from placement.stats import compute_stats
    fit = RoutingTrace.load(ENCODER_TRACE)
    return {"solved": solve(compute_stats(fit), cluster, SolveOptions(solver=SolverKind.LOCAL, time_limit=20.0))}


if __name__ == "__main__":
    sys.exit(main())
