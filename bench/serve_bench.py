"""Serving benchmark in the field's terms (``vllm bench serve`` / ``sglang.bench_serving`` / GenAI-Perf): the real
``epserve serve`` (4 gloo ranks, the bundled default model) under open-loop Poisson load at a sweep of request
rates and under a closed loop, with MoE-CAP's S-MBU / S-MFU and a CAP radar per configuration, in one run.

    probe: peak memory bandwidth (tensor copy) and float32 FLOP/s, one thread per process, min(ranks, cores)
           processes at once --> the machine's peaks (S-MBU / S-MFU denominators)
    reference: the one-process greedy text of fixed prompts (MoEModel.greedy_reference)
    bench/results/default_model_trace.npz --epserve place --solver local--> solved placement (as serve_load.py)
    for each config (two_a2a+contiguous = baseline, two_a2a+solved, coherent+solved, ...):
        start epserve serve (bounded wait for /health) --> warm-up --> accuracy: the fixed greedy prompts sent
        together, text == reference?
        for each rate in the sweep (ascending): Poisson arrivals (seeded, the same for every config) for
            --send-s seconds (at most --max-requests) --> wait for the rest (bounded) --> wait until idle
        closed loop: --clients clients, --closed-requests requests
        per phase: req/s, output tok/s, TTFT / TPOT / ITL / E2EL mean, p50, p90, p99, goodput under the SLO,
            /metrics deltas (steps, tokens) + /placement expert loads --> S-MBU, S-MFU; server CPU seconds
        stop the server (every process of the group killed after a bound)
    --> knee per config, CAP scores (cost, accuracy, performance) --> serve_bench.json, serve_bench.md,
        serve_bench_latency.png, serve_bench_cap_<config>.png in --out

Run:  nice -n 10 python bench/serve_bench.py [--quick] [--out DIR]     # default: ~10 min; --quick: ~3 min
      nice -n 10 python bench/serve_bench.py --out bench/results      # the tracked figures
      python bench/serve_bench.py --render-only --out DIR               # markdown + PNGs from the JSON

Default rates (1-8 req/s) and SLO come from a probe of the baseline on this machine (2 shared cores, 4 ranks,
--max-running 16, 32-token requests) before the run: closed loops of 1 / 8 / 16 clients gave 0.28 / 1.8 / 4.0
req/s with TPOT p50 ~105-135 ms at every batch size (a step costs about the same for 1 or 16 sequences here),
and open loops at 1-6 req/s kept TTFT p50 at ~150-210 ms up to 5 req/s and jumped to ~1.8 s at 6 req/s (queueing):
the knee lay between 5 and 6 req/s then; the sweep spans both sides of it with room for the machine's drift.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402

import _serve_bench_cap as cap  # noqa: E402
import _serve_bench_load as load  # noqa: E402
from _serve_bench_report import render  # noqa: E402
from epserve.model.config import ModelConfig  # noqa: E402
from launch.serve_cmd import default_model_dir  # noqa: E402
from serve_load import CONFIGS, PROMPTS, RANKS, solve_placement, start_server, wait_ready  # noqa: E402

DEFAULT_CONFIGS = "two_a2a+contiguous,two_a2a+solved,coherent+solved"
QUICK_CONFIGS = "two_a2a+contiguous,coherent+solved"
ACCURACY_PROMPTS = PROMPTS[:6]


def wait_idle(url: str, timeout_s: float = 30.0) -> bool:
    """Until the server has no running or waiting request (bounded); True when it got there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=10).text   # gauge names with or without a unit suffix
        busy = [line.split() for line in text.splitlines() if line.startswith(("epserve_running_batch",
                                                                               "epserve_queue_waiting"))]
        if len(busy) == 2 and all(float(value) == 0 for _, value in busy):
            return True
        time.sleep(0.5)
    return False


def run_phase(server, kind: str, args, rate: float | None = None) -> dict:
    before, cpu0 = cap.engine_counters(server.url), cap.cpu_seconds(server)
    if kind == "open":
        n = min(args.max_requests, max(1, int(rate * args.send_s * 1.5)))
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        results, t0, sent = load.open_loop(server.url, prompts, rate=rate, max_tokens=args.max_tokens,
                                           seed=args.seed, send_s=args.send_s, drain_s=args.drain_s)
    else:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.closed_requests)]
        results, t0, sent = load.closed_loop(server.url, prompts, clients=args.clients, max_tokens=args.max_tokens,
                                             deadline_s=args.send_s * 3)
    idle = wait_idle(server.url)
    after, cpu1 = cap.engine_counters(server.url), cap.cpu_seconds(server)
    summary = load.summarize(results, t0, sent, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
    return {"kind": kind, "rate": rate, "load": f"Poisson {rate:g} req/s" if kind == "open" else
            f"closed, {args.clients} clients", "summary": summary, "counters_before": before,
            "counters_after": after, "server_cpu_s": cpu1 - cpu0, "idle_after": idle}


def run_config(cfg, placement: Path, work: Path, args, model_cfg: ModelConfig, peaks: dict,
               expected: list[str]) -> dict:
    server = start_server(cfg, placement, work, max_running=args.max_running)
    try:
        startup = wait_ready(server, args.ready_timeout)
        _say(f"{cfg.name}: server ready in {startup:.0f} s")
        load.closed_loop(server.url, PROMPTS[:2], clients=2, max_tokens=4, deadline_s=60)   # warm-up
        accuracy = cap.accuracy(server.url, ACCURACY_PROMPTS, expected, args.accuracy_tokens)
        phases = []
        for rate in sorted(args.rates):
            phases.append(run_phase(server, "open", args, rate))
            _progress(args, cfg.name, phases[-1])
        phases.append(run_phase(server, "closed", args))
        _progress(args, cfg.name, phases[-1])
        shares = cap.expert_shares(server.url)
    finally:
        code = server.stop()
    for ph in phases:
        ph["cap"] = cap.phase_cap(model_cfg, ph["summary"], ph["counters_before"], ph["counters_after"], shares,
                                  peaks)
    tokens = sum(ph["summary"]["output_tokens"] for ph in phases)
    return {"config": cfg.name, "strategy": cfg.strategy, "transport": cfg.transport,
            "placement": "solved" if cfg.solved else "contiguous", "startup_s": startup, "exit_status": code,
            "accuracy": accuracy, "phases": phases, "knee": knee(phases),
            "best_output_tok_s": max(ph["summary"]["output_token_throughput"] for ph in phases),
            "cpu_s_per_1k_tokens": 1e3 * sum(ph["server_cpu_s"] for ph in phases) / max(tokens, 1)}


KNEE_RULE = ("Knee: the highest swept rate before queueing sets in: every request sent completed and TTFT p50 "
             "<= 2x its value at the lowest rate (the arrivals no longer wait for a batch slot); `> max` means "
             "every rate passed, `< min` none. (req/s is completed requests / (first send to last completion), as "
             "vllm bench serve counts it: with --send-s windows of a few E2ELs it stays below the offered rate "
             "even where the server keeps up.)")


def knee(phases: list[dict]) -> str:
    sweep = [ph for ph in phases if ph["kind"] == "open"]
    base = sweep[0]["summary"]["ttft_ms"]["p50"] or float("inf")
    ok = [ph["rate"] for ph in sweep if ph["summary"]["failed"] == 0
          and (ph["summary"]["ttft_ms"]["p50"] or float("inf")) <= 2 * base]
    if not ok:
        return f"< {sweep[0]['rate']:g} req/s"
    top = max(ok)
    return f"> {top:g} req/s" if top == sweep[-1]["rate"] else f"{top:g} req/s"


def _say(message: str) -> None:
    print(f"[serve_bench] {message}", file=sys.stderr, flush=True)


def _progress(args, name: str, ph: dict) -> None:
    s = ph["summary"]
    print(f"[serve_bench] {name:<20} {ph['load']:<22} {s['request_throughput']:5.2f} req/s "
          f"{s['output_token_throughput']:6.1f} tok/s  TTFT p50 {s['ttft_ms']['p50'] or 0:6.0f} ms  "
          f"TPOT p50 {s['tpot_ms']['p50'] or 0:5.1f} ms  failed {s['failed']}", file=sys.stderr, flush=True)


def cap_scores(configs: list[dict]) -> None:
    best_cost = min(c["cpu_s_per_1k_tokens"] for c in configs)
    best_perf = max(c["best_output_tok_s"] for c in configs)
    for c in configs:
        c["cap_scores"] = {"cost": best_cost / c["cpu_s_per_1k_tokens"], "accuracy": c["accuracy"]["accuracy"],
                           "performance": c["best_output_tok_s"] / best_perf}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 configs, 3 rates, shorter phases (~3 min)")
    p.add_argument("--configs", help=f"comma-separated, the first is the baseline (default {DEFAULT_CONFIGS}); "
                                     "any of: " + ", ".join(c.name for c in CONFIGS))
    p.add_argument("--rates", help="comma-separated offered request rates (req/s) of the Poisson sweep")
    p.add_argument("--send-s", type=float, help="seconds of arrivals per rate (default 16, quick 8)")
    p.add_argument("--drain-s", type=float, default=30.0, help="bound on waiting for a phase's last requests")
    p.add_argument("--max-requests", type=int, default=100, help="requests per rate at most")
    p.add_argument("--clients", type=int, default=16, help="closed loop: concurrent clients")
    p.add_argument("--closed-requests", type=int, help="closed loop: requests (default 32, quick 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    p.add_argument("--max-running", type=int, default=16, help="the server's --max-running")
    p.add_argument("--accuracy-tokens", type=int, default=16)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput SLO (see SLO_NOTE)")
    p.add_argument("--slo-tpot-ms", type=float, default=175.0, help="goodput SLO (see SLO_NOTE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "local")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    args.configs = args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    args.rates = [float(r) for r in (args.rates or ("1,3,6" if args.quick else "1,2,3,4,6,8")).split(",")]
    args.send_s = args.send_s or (8.0 if args.quick else 16.0)
    args.closed_requests = args.closed_requests or (16 if args.quick else 32)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    if args.render_only:
        render(out)
        print_summary(out)
        return 0
    by_name = {c.name: c for c in CONFIGS}
    unknown = [n for n in args.configs.split(",") if n not in by_name]
    if unknown:
        print(f"serve_bench: unknown config {unknown[0]!r}; known: {', '.join(by_name)}", file=sys.stderr)
        return 2
    configs = [by_name[n] for n in args.configs.split(",")]
    t_start = time.time()
    model_dir = default_model_dir()
    model_cfg = ModelConfig.from_dir(model_dir)
    peaks = cap.probe_peaks(min(RANKS, os.cpu_count() or 1), tries=4 if args.quick else 8)
    expected = cap.reference(model_dir, ACCURACY_PROMPTS, args.accuracy_tokens)
    _say(f"probe and reference done ({time.time() - t_start:.0f} s): peak {peaks['peak_bytes_per_s'] / 1e9:.1f} GB/s, "
         f"{peaks['peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        placement, doc = solve_placement(work, time_limit_s=5 if args.quick else 30)
        _say(f"placement solved ({time.time() - t_start:.0f} s)")
        rows = [run_config(cfg, placement, work, args, model_cfg, peaks, expected) for cfg in configs]
    cap_scores(rows)
    result = {"setup": setup(args, peaks, doc, time.time() - t_start, model_cfg), "peaks": peaks, "configs": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    render(out)
    print_summary(out)
    return 0


def setup(args, peaks: dict, doc: dict, wall_s: float, model_cfg: ModelConfig) -> dict:
    from _serve_bench_setup import describe
    return describe(args, peaks, doc, wall_s, ranks=RANKS, prompts=PROMPTS, accuracy_prompts=ACCURACY_PROMPTS,
                    knee_rule=KNEE_RULE, model=model_cfg)


def print_summary(out: Path) -> None:
    md = (out / "serve_bench.md").read_text().splitlines()
    print("\n".join(line for line in md if line.startswith("|")))
    r = json.loads((out / "serve_bench.json").read_text())
    print(f"serve_bench: {len(r['configs'])} configs, rates {r['setup']['rates']} req/s + closed loop; knees "
          f"{', '.join(c['config'] + ' ' + c['knee'] for c in r['configs'])}; {r['setup']['wall_s']:.0f} s; "
          f"wrote {out}/serve_bench.{{json,md}} and PNGs")


if __name__ == "__main__":
    sys.exit(main())
