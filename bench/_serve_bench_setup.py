"""serve_bench's setup record: what ran, how each figure is defined, the SLO and the CAP axes (into the JSON and
the markdown, so the results state their setup)."""

from __future__ import annotations

import os
import platform

import torch

SLO_NOTE = ("Chosen relative to this machine: the probe behind the default rates (the baseline at 1 req/s) gave "
            "TTFT p50 ~150-200 ms and TPOT p50 ~105-135 ms; the SLO allows ~5x that TTFT (a short wait for a batch "
            "slot passes, a queue does not) and ~1.5x that TPOT (a step slowed by a larger batch or by the "
            "machine's other work passes, a stalled decode does not). Change with --slo-ttft-ms / --slo-tpot-ms.")

CAP_NOTE = ("S-MBU / S-MFU (MoE-CAP, arXiv 2412.07067; counted by epserve/engine/moe_cap.py): the bytes a decode "
            "step must read (the experts the batch activates, router, attention, lm_head, one embedding row per "
            "sequence, the K/V of each sequence's context; float32) and the FLOPs it must do, over the mean TPOT "
            "(MoE-CAP's decode-step time) x the machine's peak from the probe. The batch is the engine's generated "
            "tokens / steps over the phase (/metrics), the context the mean over the phase's decode tokens "
            "(prompt + position, from each request's usage), the activated experts the expected union for that "
            "batch under each layer's measured expert loads (/placement). Single-device counting, as moe_cap: "
            "replicated weights (attention, lm_head) are counted once though each rank reads its own copy. "
            "CAP radar axes (each 0..1, 1 = best of this run): cost = least CPU-seconds per 1k output tokens of "
            "any config / this config's (user + system seconds of every server process during the load phases, "
            "all phases together); accuracy = fraction of the fixed greedy requests whose text equals the "
            "one-process reference (MoEModel.greedy_reference; the server is lossless, so 1.0 unless broken); "
            "performance = this config's best output tok/s over all phases / the best config's.")


def describe(args, peaks: dict, doc: dict, wall_s: float, *, ranks: int, prompts, accuracy_prompts,
             knee_rule: str, model) -> dict:
    summary = (
        f"{ranks} EP ranks (`epserve serve --nproc-per-node {ranks} --max-running {args.max_running}`, gloo, "
        f"OMP_NUM_THREADS=1) on one {os.cpu_count()}-core CPU machine shared with other work; the bundled default "
        f"model ({model.family.value}: {model.num_layers} layers, {model.num_moe_layers} MoE, "
        f"{model.num_experts} experts, top-{model.top_k}, hidden {model.hidden_size}, float32). Per config, one server: "
        f"open-loop Poisson arrivals (seed {args.seed}, the same schedule for every config) at "
        f"{', '.join(f'{r:g}' for r in args.rates)} req/s, each for {args.send_s:g} s of arrivals (at most "
        f"{args.max_requests} requests, the rest waited for at most {args.drain_s:g} s), then a closed loop of "
        f"{args.clients} clients x {args.closed_requests} requests; streaming greedy /v1/completions, "
        f"{len(prompts)} fixed code prompts in turn, max_tokens {args.max_tokens}, ignore_eos. Latencies on the "
        f"client's clock (as vllm bench serve): TTFT = first text chunk - send; TPOT = (E2EL - TTFT) / (tokens - "
        f"1); ITL = gaps between text chunks, pooled; E2EL = last byte - send; req/s and tok/s over first send "
        f"to last completion. Accuracy: {len(accuracy_prompts)} fixed greedy requests of {args.accuracy_tokens} "
        f"tokens (EOS honoured) sent together after a warm-up. `solved` = `epserve place --solver local "
        f"--held-out 0.25` on bench/results/default_model_trace.npz (objective gap "
        f"{doc['objective']['gap']:.1%}). Speeds on this machine move by tens of percent with the other work "
        f"on it; compare configs within one run only. Whole run: {wall_s:.0f} s.")
    reading = ("Reading: one step of the 4 ranks costs about the same for 1 or 16 sequences on this machine "
               "(Python, gloo and loopback latency dominate, not bytes or FLOPs), so throughput grows with the "
               "batch until --max-running; past the knee arrivals queue and TTFT grows while TPOT stays. The tiny "
               "S-MBU / S-MFU say the same: the step is far from either roof.")
    return {"ranks": ranks, "cpu_cores": os.cpu_count(), "max_running": args.max_running, "rates": args.rates,
            "send_s": args.send_s, "drain_s": args.drain_s, "max_requests": args.max_requests,
            "clients": args.clients, "closed_requests": args.closed_requests, "max_tokens": args.max_tokens,
            "seed": args.seed, "quick": args.quick, "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
            "slo_note": SLO_NOTE, "knee_rule": knee_rule, "cap_note": CAP_NOTE, "reading": reading,
            "prompts": list(prompts), "accuracy_prompts": list(accuracy_prompts),
            "placement_solver": doc.get("solver"), "placement_objective": doc.get("objective"),
            "torch": torch.__version__, "python": platform.python_version(), "wall_s": wall_s, "summary": summary}
