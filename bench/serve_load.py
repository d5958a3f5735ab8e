"""Serving benchmark: the real ``epserve serve`` (4 gloo ranks, the bundled default model) under a closed-loop load,
one server per config, all in one run.

    bench/results/default_model_trace.npz --epserve place --solver local (4 GPUs)--> solved placement + predictor
    for each config (two_a2a+contiguous = baseline, two_a2a+solved, coherent+contiguous, coherent+solved,
    speculative+solved):
        start epserve serve --> wait for /health (bounded) --> one warm-up request
        --> N client threads pull from a fixed list of R streaming greedy requests (fixed prompts, max_tokens)
        --> requests/s, output tokens/s, TTFT p50/p99, TPOT p50/p99 (from the client's clock)
        --> /placement: the server's own LAR, transfers per token-layer, all-to-all bytes (whole run)
        --> Ctrl-C the server (every process of the group killed after a bound)
    repeated for --rounds rounds (configs in the same order each round); speeds: medians over the rounds
    --> bench/results/serve_load.json + serve_load.md (ratios against the baseline of the same run)

Run:  nice -n 10 python bench/serve_load.py [--clients 8] [--requests 32] [--max-tokens 32] [--rounds 3] [-v]
Prints the markdown table and a one-line summary. bench/serve_bench.py reuses its configs, prompts and placement
solve for the open-loop rate sweep in vllm bench serve's terms (TTFT / TPOT / ITL / E2EL percentiles, goodput,
S-MBU / S-MFU); this script stays the place for the server's traffic counters (LAR, transfers, bytes) per config.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from comm.spawn import free_port  # noqa: E402
from epserve.model.config import ModelConfig  # noqa: E402
from launch.serve_cmd import default_model_dir  # noqa: E402
from launch.serve_process import ServeProcess  # noqa: E402

TRACE = ROOT / "bench" / "results" / "default_model_trace.npz"
RANKS = 4
PROMPTS = [   # Python code: what the default model was trained on
    "def ", "import os\n", "class Stack:\n    def push(self, x):", "for i in range(10):",
    "def fibonacci(n):\n", "with open(path) as f:\n", "    return sorted(", "if __name__ == \"__main__\":\n",
    "x = [i * i for i in", "try:\n    import numpy as np\nexcept", "def __init__(self, name):\n        self.",
    "print(\"hello", "def read_config(path):\n    ", "while True:\n    line = ", "return {k: v for k, v in",
    "raise ValueError(",
]


@dataclass(frozen=True)
class Config:
    strategy: str
    solved: bool
    transport: str = "a2a"

    @property
    def name(self) -> str:
        tail = "" if self.transport == "a2a" else f" [{self.transport}]"
        return f"{self.strategy}+{'solved' if self.solved else 'contiguous'}{tail}"


CONFIGS = (Config("two_a2a", False), Config("two_a2a", True), Config("coherent", False), Config("coherent", True),
           Config("speculative", True), Config("two_a2a", False, "fixed"), Config("two_a2a", True, "fixed"),
           Config("coherent", True, "fixed"), Config("speculative", True, "fixed"))


# ---- the load -----------------------------------------------------------------------------------------------
def one_request(client: httpx.Client, prompt: str, max_tokens: int) -> dict:
    """A streaming greedy request: arrival times of its text chunks, and its token count (usage)."""
    body = {"model": "default_model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks, tokens, prompt_tokens, text = [], None, None, ""
    with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"ok": False, "error": f"HTTP {r.status_code}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
                prompt_tokens = event["usage"].get("prompt_tokens")
            if event["choices"] and event["choices"][0]["text"]:
                chunks.append(time.perf_counter())
                text += event["choices"][0]["text"]
    end = time.perf_counter()
    if not chunks or tokens is None:
        return {"ok": False, "error": "no tokens"}
    return {"ok": True, "start": start, "end": end, "ttft": chunks[0] - start, "tokens": tokens, "text": text,
            "prompt_tokens": prompt_tokens, "chunks": chunks,
            "tpot": (end - chunks[0]) / (tokens - 1) if tokens > 1 else None}


def closed_loop(url: str, prompts: list[str], *, clients: int, max_tokens: int, deadline_s: float) -> dict:
    """``clients`` threads take the next request from the list until it is empty or the deadline passes."""
    lock, results, next_i = threading.Lock(), [None] * len(prompts), [0]
    stop_at = time.monotonic() + deadline_s

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(120, connect=10)) as client:
            while time.monotonic() < stop_at:
                with lock:
                    i, next_i[0] = next_i[0], next_i[0] + 1
                if i >= len(prompts):
                    return
                try:
                    results[i] = one_request(client, prompts[i], max_tokens)
                except httpx.HTTPError as exc:
                    results[i] = {"ok": False, "error": repr(exc)}

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.monotonic()) + 130)
    wall = time.perf_counter() - t0
    done = [r for r in results if r and r["ok"]]
    ttft = np.array([r["ttft"] for r in done]) * 1e3
    tpot = np.array([r["tpot"] for r in done if r["tpot"] is not None]) * 1e3
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    return {"requests": len(prompts), "completed": len(done), "failed": len(prompts) - len(done),
            "wall_s": wall, "requests_per_s": len(done) / wall,
            "output_tokens": int(sum(r["tokens"] for r in done)),
            "output_tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
            "texts": [r["text"] if r and r["ok"] else None for r in results]}


def server_figures(url: str) -> dict:
    """The server's own traffic figures (/placement), summed over the MoE layers."""
    time.sleep(2.5)   # the engine gathers its live stats when idle, at most once a second
    doc = httpx.get(f"{url}/placement", timeout=10).json()
    layers, top_k = doc["layers"], ModelConfig.from_dir(default_model_dir()).top_k
    acts = sum(l["activations"] for l in layers)
    token_layers = acts / top_k
    return {"lar": sum(l["local_activations"] for l in layers) / acts if acts else None,
            "transfers_per_token_layer": sum(l["transfers"] for l in layers) / token_layers if acts else None,
            "a2a_bytes": int(sum(l["a2a_bytes"] for l in layers)),
            "a2a_bytes_per_token_layer": sum(l["a2a_bytes"] for l in layers) / token_layers if acts else None,
            "kv_bytes_per_token_layer": sum(l["kv_bytes"] for l in layers) / token_layers if acts else None,
            "a2a_calls": int(sum(l["a2a_calls"] for l in layers)), "token_layers": token_layers,
            "imbalance_mean": float(np.mean([l["imbalance"] for l in layers])) if layers else None}


def start_server(cfg: Config, placement: Path, work: Path, *, max_running: int) -> ServeProcess:
    """`epserve serve` for ``cfg`` on RANKS ranks (not yet ready: call wait_ready)."""
    argv = ["--nproc-per-node", str(RANKS), "--strategy", cfg.strategy, "--transport", cfg.transport,
            "--max-running", str(max_running)]
    if cfg.solved:
        argv += ["--placement", str(placement)]
    return ServeProcess(argv, port=free_port(), log_path=work / f"{cfg.name}.log")


def wait_ready(server: ServeProcess, timeout_s: float) -> float:
    """Seconds until the server answered /health."""
    t0 = time.perf_counter()
    server.wait_ready(timeout_s)
    return time.perf_counter() - t0


def run_config(cfg: Config, placement: Path, work: Path, args) -> dict:
    server = start_server(cfg, placement, work, max_running=args.clients)
    try:
        startup = wait_ready(server, args.ready_timeout)
        with httpx.Client(base_url=server.url, timeout=120) as c:   # warm-up
            one_request(c, PROMPTS[0], 4)
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        load = closed_loop(server.url, prompts, clients=args.clients, max_tokens=args.max_tokens,
                           deadline_s=args.deadline)
        figures = server_figures(server.url)
    finally:
        code = server.stop()
    return {"config": cfg.name, "strategy": cfg.strategy, "transport": cfg.transport,
            "placement": "solved" if cfg.solved else "contiguous",
            "startup_s": startup, "exit_status": code, **load, "server": figures}


# ---- report -------------------------------------------------------------------------------------------------
SPEEDS = ("requests_per_s", "output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per config: the median of each speed over the rounds (each round runs every config once, in
    order, so slow drifts of the shared machine hit every config alike), the server counters of the first
    round, and whether every round gave the baseline's text."""
    rows = []
    for i, first in enumerate(rounds[0]):
        runs = [rnd[i] for rnd in rounds]
        row = {k: v for k, v in first.items() if k not in SPEEDS + ("texts",)}
        row.update({k: float(np.median([r[k] for r in runs])) for k in SPEEDS})
        row["failed"] = sum(r["failed"] for r in runs)
        row["same_text_as_base"] = all(r["texts"] == rnd[0]["texts"] for r, rnd in zip(runs, rounds))
        row["per_round"] = [{k: r[k] for k in ("requests_per_s", "output_tokens_per_s", "ttft_ms_p50",
                                                "tpot_ms_p50", "wall_s")} for r in runs]
        rows.append(row)
    base = rows[0]
    for r in rows:
        for key in ("requests_per_s", "output_tokens_per_s", "ttft_ms_p50", "tpot_ms_p50"):
            r[f"{key}_vs_base"] = r[key] / base[key] if base[key] else float("nan")
        b, t = base["server"]["transfers_per_token_layer"], r["server"]["transfers_per_token_layer"]
        r["transfers_vs_base"] = t / b if b else float("nan")
        b, t = (x["server"]["a2a_bytes_per_token_layer"] + x["server"]["kv_bytes_per_token_layer"]
                for x in (base, r))
        r["total_bytes_vs_base"] = t / b if b else float("nan")
    return rows


def write_report(out: Path, result: dict) -> None:
    (out / "serve_load.json").write_text(json.dumps(result, indent=1) + "\n")
    s = result["setup"]
    lines = [f"# Serving benchmark: epserve serve, {s['ranks']} gloo ranks, default model", "", s["summary"], "",
             "| config | req/s (vs base) | out tok/s (vs base) | out tok/s each round | TTFT p50 / p99 ms | "
             "TPOT p50 / p99 ms | LAR | transfers/token-layer (vs base) | a2a B/token-layer | a2a MB total | "
             "K/V copy B/token-layer | a2a + K/V B/token-layer (vs base) | same text as base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        f = r["server"]
        each_round = ", ".join(f"{x['output_tokens_per_s']:.0f}" for x in r["per_round"])
        lines.append(f"| {r['config']} | {r['requests_per_s']:.2f} ({r['requests_per_s_vs_base']:.2f}) | "
                     f"{r['output_tokens_per_s']:.1f} ({r['output_tokens_per_s_vs_base']:.2f}) | "
                     f"{each_round} | "
                     f"{r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | {r['tpot_ms_p50']:.1f} / "
                     f"{r['tpot_ms_p99']:.1f} | {f['lar']:.3f} | {f['transfers_per_token_layer']:.3f} "
                     f"({r['transfers_vs_base']:.3f}) | {f['a2a_bytes_per_token_layer']:.0f} | "
                     f"{f['a2a_bytes'] / 1e6:.1f} | {f['kv_bytes_per_token_layer']:.0f} | "
                     f"{f['a2a_bytes_per_token_layer'] + f['kv_bytes_per_token_layer']:.0f} "
                     f"({r['total_bytes_vs_base']:.3f}) | {r['same_text_as_base']} |")
    failed = sum(r["failed"] for r in result["rows"])
    lines += ["", f"Requests failed: {failed}. Placement: {s['placement_note']}", "",
              "Reading: the `each round` column shows how much the speed of one config moves between rounds on "
              "this shared 2-core machine; speed differences between configs smaller than that spread are not "
              "measurable here. The traffic columns (LAR, transfers, bytes) are counted, not timed: they are what "
              "the placement and the strategy change. Coherent strategies also copy every new token's K and V "
              "to every other rank (the replicated context): the K/V column. With this model a token's K/V of "
              "one layer (2 KV heads x 32 x 2 x 4 B = 512 B) is as wide as its hidden state (128 x 4 B), so "
              "3 copies cost more than the hidden-state transfers saved; for models whose KV is narrow "
              "against the hidden size (GQA with few KV heads) the balance differs.", ""]
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")


def render_only(out: Path) -> None:
    write_report(out, json.loads((out / "serve_load.json").read_text()))


def solve_placement(work: Path, time_limit_s: float = 30) -> tuple[Path, dict]:
    """``epserve place --solver local`` on the default model's trace; its output (a JSON summary on stdout,
    progress on stderr) is kept and shown only if it fails."""
    from launch.cli import main as epserve
    out = work / "solved4.json"
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        code = epserve(["place", "--trace", str(TRACE), "--gpus-per-node", str(RANKS), "--solver", "local",
                        "--held-out", "0.25", "--time-limit", f"{time_limit_s:g}", "-o", str(out), "--json"])
    if code != 0:
        raise RuntimeError(f"epserve place failed with {code}:\n{said.getvalue()[-4000:]}")
    doc = json.loads(out.read_text())
    return out, doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="each config runs once per round (medians reported)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--deadline", type=float, default=240.0, help="seconds of load per config at most")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON in --out")
    p.add_argument("-v", "--verbose", action="store_true", help="a progress line per config and round")
    p.add_argument("--configs", help="comma-separated config names to run (default: all; the first is the "
                                     "baseline): " + ", ".join(c.name for c in CONFIGS))
    args = p.parse_args(argv)
    configs = CONFIGS if not args.configs else tuple(c for c in CONFIGS if c.name in args.configs.split(","))
    if args.render_only:
        render_only(Path(args.out))
        print_summary(Path(args.out), json.loads((Path(args.out) / "serve_load.json").read_text()))
        return 0
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        work = Path(tmp)
        placement, doc = solve_placement(work)
        rounds = []
        for n in range(args.rounds):
            rounds.append([])
            for cfg in configs:
                row = run_config(cfg, placement, work, args)
                rounds[-1].append(row)
                if args.verbose:
                    print(f"[serve_load] round {n + 1}/{args.rounds} {cfg.name}: {row['output_tokens_per_s']:.1f} "
                          f"tok/s, {row['failed']} failed", file=sys.stderr, flush=True)
        rows = combine_rounds(rounds)
    summary = (f"{RANKS} EP ranks (`epserve serve --nproc-per-node {RANKS}`, gloo, OMP_NUM_THREADS=1) on one "
               f"2-core CPU machine shared with other work; the bundled default model (tiny Mixtral: 6 MoE layers, "
               f"16 experts, top-2, hidden 128, float32). Closed loop: {args.clients} client threads, "
               f"{args.requests} streaming greedy requests ({len(PROMPTS)} fixed code prompts in turn, max_tokens "
               f"{args.max_tokens}, ignore_eos), one warm-up request first; a fresh server per config and round; "
               f"{args.rounds} round{'s' if args.rounds != 1 else ''}, each running every config once in the order below; speeds are medians over "
               f"the rounds. TTFT and TPOT on the client's clock; LAR, transfers and all-to-all bytes are the "
               f"server's own /placement counters over the first round's run (warm-up included). Speeds on this "
               f"machine are dominated by Python and loopback latency, not bandwidth; the counts are exact. "
               f"Ratios are against two_a2a+contiguous of the same run.")
    note = (f"`solved` = `epserve place --solver local --held-out 0.25` on bench/results/default_model_trace.npz "
            f"(fitted on 75% of its tokens; objective gap {doc['objective']['gap']:.1%}); speculative uses the "
            f"predictor it wrote.")
    result = {"setup": {"ranks": RANKS, "clients": args.clients, "requests": args.requests,
                        "max_tokens": args.max_tokens, "prompts": PROMPTS, "trace": str(TRACE.relative_to(ROOT)),
                        "rounds": args.rounds, "summary": summary, "placement_note": note, "placement_solver": doc["solver"],
                        "placement_objective": doc["objective"]}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, result)
    print_summary(out, result)
    return 0


def print_summary(out: Path, result: dict) -> None:
    """The table of serve_load.md and one line: what ran, what failed, where the files are."""
    print("\n".join(l for l in (out / "serve_load.md").read_text().splitlines() if l.startswith("|")))
    rows, s = result["rows"], result["setup"]
    print(f"serve_load: {len(rows)} configs x {s['rounds']} round{'s' if s['rounds'] != 1 else ''}, "
          f"{s['clients']} clients, {s['requests']} requests of {s['max_tokens']} tokens each; "
          f"{sum(r['failed'] for r in rows)} failed; every config gave the baseline's text: "
          f"{all(r['same_text_as_base'] for r in rows)}; wrote {out / 'serve_load.json'} and serve_load.md")


if __name__ == "__main__":
    sys.exit(main())
