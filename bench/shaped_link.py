"""Two nodes on a bandwidth-limited link: the real ``epserve serve --nnodes 2`` (2 ranks per node, 4 in all) in two
network namespaces joined by a veth pair shaped with tbf, every strategy x transport x placement in one run.

    `ip`/`tc`/root/tbf present? (else: print why, exit 0)
    for each model (the bundled default model, top-2; a tiny random Qwen3-MoE, 64 experts top-8, built here):
        routing trace (default: bench/results/default_model_trace.npz; Qwen3: `epserve trace` on other prompts)
        --epserve place --nodes 2 --gpus-per-node 2--> two-node placement + predictor
        baseline (two_a2a + contiguous) on the unshaped link --> its step time, for the link-bound check
        tbf RATE on both veth ends; then for each config (options `epserve serve --help` lacks: "not yet
        available"; a config that fails: its error):
            node 1 then node 0 (GLOO_SOCKET_IFNAME = their veth ends) --> /health --> one warm-up request
            --> inside node 0's namespace: /placement + /metrics, veth counters, closed loop (C clients, R
                streaming greedy requests), veth counters, /placement + /metrics
            --> stop both nodes
        --> ratios to the shaped baseline, same text asserted, cost model's step beside the measured one
    --> DIR/shaped_link.json + shaped_link.md, and a compact table on stdout

Run (root):  nice -n 10 python bench/shaped_link.py [--rate 2mbit] [--requests 24] [--models default qwen3_top8]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_io import LOCAL_OUT, OUT_HELP  # noqa: E402  (--out default: untracked)

from bench.serve_load import PROMPTS, closed_loop, one_request  # noqa: E402  (the same load as serve_load)
from comm.spawn import free_port  # noqa: E402
from launch.netns import (LinkShape, NetnsUnavailable, TwoNodes, format_rate, rate_argument,  # noqa: E402
                          read_link_bytes)
from launch.serve_cmd import default_model_dir  # noqa: E402
from launch.serve_process import ServeProcess, serve_env  # noqa: E402
from bench.shaped_link_report import columns_note, model_summary, ratios, write_report  # noqa: E402

TRACE = ROOT / "bench" / "results" / "default_model_trace.npz"
RANKS_PER_NODE = 2
SERVED_NAME = "default_model"   # both models are served under this name (serve_load's requests ask for it)
TRACE_PROMPTS = [   # routing-trace prompts of the built Qwen3 model: not the served prompts
    "import sys\n", "def main(argv):\n", "class Node:\n    def __init__(self", "for key, value in d.items():",
    "async def fetch(url):\n", "return [x for x in", "lambda a, b:", "self.assertEqual(", "from pathlib import",
    "data = json.loads(", "while queue:\n    item =", "except KeyError as exc:", "yield from", "@property\n",
    "def __repr__(self):\n", "assert isinstance(", "os.path.join(", "with lock:\n", "np.zeros((", "if not path:",
]


@dataclass(frozen=True)
class Config:
    name: str
    strategy: str
    transport: str | None   # None: serve's default (a2a); the flag is not passed
    solved: bool            # the two-node placement (else contiguous)
    attention: str | None = None   # "tp": --attention tp (tp_two_a2a / tp_speculative)

    def argv(self, placement: Path) -> list[str]:
        argv = ["--strategy", self.strategy]
        if self.transport:
            argv += ["--transport", self.transport]
        if self.attention:
            argv += ["--attention", self.attention]
        return argv + (["--placement", str(placement)] if self.solved else [])


BASELINE = Config("two_a2a+contiguous", "two_a2a", None, False)
CONFIGS = (BASELINE, Config("two_a2a+solved", "two_a2a", None, True),
           Config("node_aware+solved", "two_a2a", "node_aware", True), Config("fixed+solved", "two_a2a", "fixed", True),
           Config("coherent+solved", "coherent", None, True), Config("speculative+solved", "speculative", None, True),
           Config("auto+solved", "auto", "auto", True),
           Config("tp_two_a2a+solved", "two_a2a", None, True, "tp"),
           Config("tp_speculative+solved", "speculative", None, True, "tp"))


# ---- what `epserve serve` offers today ----------------------------------------------------------------------
def serve_choices() -> dict[str, set[str]]:
    """``{"--strategy": {...}, "--transport": {...}, "flags": {every --flag}}`` from ``epserve serve --help``
    (a flag it lacks: no key)."""
    text = subprocess.run([sys.executable, "-m", "launch.cli", "serve", "--help"], cwd=ROOT, env=serve_env(),
                          capture_output=True, text=True, timeout=60).stdout
    out = {"flags": set(re.findall(r"(--[a-z][a-z-]*)", text))}
    for flag in ("--strategy", "--transport"):
        m = re.search(re.escape(flag) + r"\s+\{([^}]*)\}", text)
        if m:
            out[flag] = {c.strip() for c in m.group(1).split(",")}
    return out


def missing_option(cfg: Config, choices: dict[str, set[str]]) -> str | None:
    for flag, value in (("--strategy", cfg.strategy), ("--transport", cfg.transport)):
        if value is None:
            continue
        if flag not in choices:
            return f"`epserve serve` has no {flag} option yet"
        if value not in choices[flag]:
            return f"`epserve serve {flag}` has no choice {value!r} yet (it offers {sorted(choices[flag])})"
    return None


# ---- models, traces, placements -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    key: str
    directory: Path
    trace: Path
    placement: Path         # the solved two-node placement (its predictor beside it)
    placement_doc: dict
    contiguous: Path        # the contiguous placement as a file (for the cost model's simulation)
    description: str


def epserve(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=ROOT, env=serve_env(),
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"epserve {argv[0]} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def place(trace: Path, out: Path, solver: str = "local") -> dict:
    epserve(["place", "--trace", str(trace), "--nodes", "2", "--gpus-per-node", str(RANKS_PER_NODE),
             "--solver", solver, "--held-out", "0.4", "--time-limit", "30", "-o", str(out)])
    return json.loads(out.read_text())


def build_qwen3_top8(out: Path) -> Path:
    """A seeded tiny random Qwen3-MoE: 4 layers, 64 experts, top-8, hidden 128 (float32: 512 B per row), with the
    default model's tokenizer; std 0.1 so greedy choices do not hang on rounding."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                            max_position_embeddings=512, initializer_range=0.1, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=[1, 5], pad_token_id=1)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).to(torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(default_model_dir() / name, out / name)
    return out


def prepare_model(key: str, work: Path, trace_arg: Path) -> Model:
    if key == "default":
        directory, trace = default_model_dir(), trace_arg
        description = "bundled default model (tiny Mixtral: 6 MoE layers, 16 experts, top-2, hidden 128, fp32)"
    else:
        directory = build_qwen3_top8(work / "qwen3_top8")
        prompts = work / "qwen3_prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TRACE_PROMPTS))
        trace = work / "qwen3_trace.npz"
        epserve(["trace", "--model", str(directory), "--prompts", str(prompts), "-o", str(trace),
                 "--max-tokens", "48"])
        description = ("tiny random Qwen3-MoE built here (4 MoE layers, 64 experts, top-8, hidden 128, fp32; "
                       f"trace: `epserve trace` on {len(TRACE_PROMPTS)} other prompts x 48 tokens)")
    solved, contiguous = work / f"{key}_solved.json", work / f"{key}_contiguous.json"
    place(trace, contiguous, "contiguous")
    return Model(key, directory, trace, solved, place(trace, solved), contiguous, description)


# ---- one config: two nodes, one load ------------------------------------------------------------------------
def auto_argv(model: Model, cfg: Config, flags: set[str], rate_bit_s: int) -> list[str]:
    """What an auto choice is told: the shaped link's profile and the model's routing trace (where serve takes
    them)."""
    if "auto" not in (cfg.strategy, cfg.transport):
        return []
    return ((["--hardware", f"shaped:{rate_bit_s}bit"] if "--hardware" in flags else [])
            + (["--trace", str(model.trace)] if "--trace" in flags else []))


def run_config(net: TwoNodes, model: Model, cfg: Config, work: Path, args, *, tag: str,
               extra: list[str] = ()) -> dict:
    (n0, n1), master_port, port = net.nodes, free_port(), free_port()
    common = ["--model", str(model.directory), "--served-model-name", SERVED_NAME, "--nnodes", "2",
              "--nproc-per-node", str(RANKS_PER_NODE), "--master-addr", n0.addr, "--master-port", str(master_port),
              "--max-running", str(args.clients), "--collective-timeout", "120", *cfg.argv(model.placement),
              *extra]
    logs = [work / f"{model.key}.{tag}.{cfg.name}.node{i}.log" for i in (0, 1)]
    servers = []
    try:
        # gloo picks its interface from the hostname by default, which is not reachable inside a namespace
        servers.append(ServeProcess([*common, "--node-rank", "1"], port=port, log_path=logs[1], netns=n1.netns,
                                    env={"GLOO_SOCKET_IFNAME": n1.dev}))
        servers.append(ServeProcess([*common, "--node-rank", "0"], port=port, log_path=logs[0], netns=n0.netns,
                                    env={"GLOO_SOCKET_IFNAME": n0.dev}))
        t0 = time.perf_counter()
        servers[1].wait_ready(args.ready_timeout)
        startup = time.perf_counter() - t0
        spec = {"url": servers[1].url, "clients": args.clients, "max_tokens": args.max_tokens,
                "deadline": args.deadline, "dev": n0.dev,
                "prompts": [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]}
        out = subprocess.run(net.exec_argv(0, [sys.executable, str(Path(__file__).resolve()), "--client",
                                               json.dumps(spec)]),
                             cwd=ROOT, env=serve_env(), capture_output=True, text=True,
                             timeout=args.deadline + 300)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"load client failed ({out.returncode}): {last}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        if "auto" in (cfg.strategy, cfg.transport):   # what auto chose, and why, as the server logged it
            row["auto_log"] = [line.strip() for line in servers[1].log().splitlines()
                               if "chose" in line or "auto" in line][-3:]
    except Exception as exc:   # a config that fails is reported with its error, and the run goes on
        return {"config": cfg.name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:1000],
                "server_errors": {f"node{i}": log_errors(srv.log()) for i, srv in enumerate(reversed(servers))}}
    finally:
        for s in reversed(servers):
            s.stop(timeout_s=30)
    return {"config": cfg.name, "status": "ok", "startup_s": startup, **row}


def log_errors(log: str, keep: int = 6) -> list[str]:
    """The lines of a server log that say what went wrong (not torchrun's banners and tracebacks)."""
    hits = [line.strip() for line in log.splitlines()
            if re.search(r"error|failed|refused", line, re.IGNORECASE) and not line.startswith((" ", "\t", "[", "="))
            and "ChildFailedError" not in line and "error_file" not in line]
    return hits[-keep:]


# ---- the load client (runs inside node 0's namespace) -------------------------------------------------------
def client_main(spec: dict) -> dict:
    import httpx

    def server_state() -> dict:
        time.sleep(2.5)   # the engine gathers its live stats when idle, at most once a second
        doc = httpx.get(f"{spec['url']}/placement", timeout=30).json()
        metrics = httpx.get(f"{spec['url']}/metrics", timeout=30).text
        steps = re.search(r"^epserve_engine_steps(?:_total)?\s+(\S+)", metrics, re.MULTILINE)
        return {"layers": doc["layers"], "steps": float(steps.group(1)) if steps else None}

    with httpx.Client(base_url=spec["url"], timeout=300) as c:   # warm-up
        one_request(c, spec["prompts"][0], 4)
    before = server_state()
    link0 = read_link_bytes(spec["dev"])
    load = closed_loop(spec["url"], spec["prompts"], clients=spec["clients"], max_tokens=spec["max_tokens"],
                       deadline_s=spec["deadline"])
    moved = read_link_bytes(spec["dev"]) - link0
    after = server_state()
    return {**load, "link_sent": moved.sent, "link_received": moved.received, "link_bytes": moved.total,
            "server": server_delta(before, after, load["wall_s"])}


def server_delta(before: dict, after: dict, wall_s: float) -> dict:
    """What epserve counted during the load (after - before): all-to-all and K/V bytes over every link, and the
    inter-node share when /placement reports one (a key naming cross/inter node bytes)."""
    sums = {}
    for key in after["layers"][0] if after["layers"] else ():
        if isinstance(after["layers"][0][key], (int, float)) and "bytes" in key:
            sums[key] = sum(l[key] for l in after["layers"]) - sum(l[key] for l in before["layers"])
    cross = sorted(k for k in sums if re.search(r"(cross|inter)_?node", k))
    steps = (after["steps"] - before["steps"]) if after["steps"] is not None and before["steps"] is not None else None
    return {"bytes": sums, "epserve_bytes": sum(v for k, v in sums.items() if k in ("a2a_bytes", "kv_bytes")),
            "cross_node_keys": cross, "cross_node_bytes": sum(sums[k] for k in cross) if cross else None,
            "steps": steps, "step_ms": 1e3 * wall_s / steps if steps else None}


# ---- the cost model (placement.cost_model, issue 8 item 4) ---------------------------------------------------
def predicted_step(model: Model, cfg: Config, rate_bit_s: int, args, *, unshaped_step_ms: float | None,
                   steps: int | None) -> tuple[dict | None, str]:
    """placement.cost_model's prediction of this config's measured step: the simulator's report on the model
    trace's held-out 40%, priced on ``shaped_profile(rate, step_fixed_s = the unshaped baseline's measured step)``
    (the compute + host part, which no link model gives), for the load's mix of steps: requests // clients
    prefill steps of (served prompt tokens / that many) tokens, the other steps decode steps of ``clients``
    tokens. Returns ({step_ms, inter_node_bytes_per_step, bottleneck}, "") or (None, why not); never raises."""
    if cfg.strategy == "auto":
        return None, "auto: see the config it picks"
    if cfg.attention == "tp":
        return None, "TP attention: modelled by bench/tp_bench.py (placement/cost_model_tp.py), not here"
    if not unshaped_step_ms or not steps:
        return None, "no unshaped baseline step or no step count to calibrate with"
    try:
        from tokenizers import Tokenizer

        from epserve.model.config import ModelConfig
        from placement import cost_model, hardware
        from placement.placement import Placement
        from placement.predictor import SpeculativePredictor
        from placement.simulate import SimOptions, Strategy, simulate
        from placement.trace import RoutingTrace
        from placement.transport import Transport

        mc = ModelConfig.from_dir(model.directory)
        strategy = Strategy.parse(cfg.strategy)
        placement = Placement.load(model.placement if cfg.solved else model.contiguous)
        trace = RoutingTrace.load(model.trace).split(0.6)[1]
        extra = {"transport": Transport.parse(cfg.transport or "a2a")}
        if strategy.needs_predictor:
            extra["predictor"] = SpeculativePredictor.load(model.placement.with_suffix(".predictor.npz"))
        report = simulate(trace, placement, strategy, **extra,
                          options=SimOptions(hidden_size=mc.hidden_size, dtype_bytes=4,
                                             kv_entry_bytes=2 * mc.num_kv_heads * mc.head_dim * 4))
        shape = cost_model.ModelShape.from_fields(
            hidden_size=mc.hidden_size, num_layers=mc.num_layers, moe_layers=len(mc.moe_layer_ids), top_k=mc.top_k,
            dtype_bytes=4, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, num_experts=mc.num_experts)
        profile = hardware.shaped_profile(rate_bit_s / 8, step_fixed_s=unshaped_step_ms / 1e3)
        tok = Tokenizer.from_file(str(model.directory / "tokenizer.json"))
        prompt_tokens = sum(len(tok.encode(PROMPTS[i % len(PROMPTS)]).ids) for i in range(args.requests))
        waves = max(1, args.requests // args.clients)
        at = lambda n: cost_model.predict(report, model=shape, hardware=profile, tokens_per_step=n,  # noqa: E731
                                          sequences_per_step=args.clients)
        decode, prefill = at(args.clients), at(max(1, round(prompt_tokens / waves)))
        mix = lambda f: (waves * f(prefill) + (steps - waves) * f(decode)) / steps  # noqa: E731
        return {"step_ms": 1e3 * mix(lambda c: c.step_s), "bottleneck": decode.bottleneck,
                "inter_node_bytes_per_step": mix(lambda c: c.bytes_per_step.get("inter_node", 0.0))}, ""
    except Exception as exc:   # the hook must never sink the measurement
        return None, f"cost model failed: {type(exc).__name__}: {exc}"[:300]


def repredict(path: Path, work: Path, args) -> dict:
    """Recompute the predicted columns of a saved run (the measurements are kept as they are)."""
    result = json.loads(path.read_text())
    rate = result["setup"]["rate_bit_s"]
    result["setup"]["notes"] = columns_note(result["setup"]["clients"])
    for key, m in result["models"].items():
        model = prepare_model(key, work, args.trace)
        base_ms = (m["unshaped_baseline"].get("server") or {}).get("step_ms")
        for row in m["rows"]:
            if row.get("status") == "ok":
                cfg = next(c for c in CONFIGS if c.name == row["config"])
                row["predicted"], row["predicted_note"] = predicted_step(
                    model, cfg, rate, args, unshaped_step_ms=base_ms, steps=(row.get("server") or {}).get("steps"))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--rate", type=rate_argument, default="1mbit",
                   help="tbf rate on each veth end, tc units (default: 1mbit: the baseline's step >= 3x unshaped)")
    p.add_argument("--trace", type=Path, default=TRACE, help="routing trace of the default model")
    p.add_argument("--models", nargs="+", default=["default", "qwen3_top8"], choices=["default", "qwen3_top8"])
    p.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS[1:]], metavar="CONFIG",
                   help=f"configs to run besides the baseline (default: all: {', '.join(c.name for c in CONFIGS[1:])})")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--deadline", type=float, default=240.0, help="seconds of load per config at most")
    p.add_argument("--ready-timeout", type=float, default=240.0)
    p.add_argument("--out", type=Path, default=LOCAL_OUT,
                   help=OUT_HELP)
    p.add_argument("--repredict", type=Path, metavar="JSON",
                   help="recompute the cost model's columns of a saved run's JSON, write it to --out, and stop")
    p.add_argument("--client", help=argparse.SUPPRESS)   # internal: the load, inside node 0's namespace
    args = p.parse_args(argv)
    if args.client:
        print(json.dumps(client_main(json.loads(args.client))))
        return 0
    if args.repredict:
        with tempfile.TemporaryDirectory(prefix="shaped-link-") as tmp:
            result = repredict(args.repredict, Path(tmp), args)
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_report(args.out, result))
        return 0
    shape = LinkShape(args.rate)
    try:   # no root, no ip/tc, or tbf refused: skip before any model work
        net = TwoNodes.create_for(shape)
    except NetnsUnavailable as exc:
        print(f"shaped_link: skipped: {exc}")
        return 0
    with net, tempfile.TemporaryDirectory(prefix="shaped-link-") as tmp:
        result = run_all(net, shape, Path(tmp), args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = write_report(args.out, result)
    print(text)
    bad = [k for k, m in result["models"].items() if not m["summary"]["same_text_all"]]
    if bad:
        print(f"shaped_link: generated text differs between configs for {bad}", file=sys.stderr)
        return 1
    return 0


def run_all(net: TwoNodes, shape: LinkShape, work: Path, args) -> dict:
    choices = serve_choices()
    wanted = [c for c in CONFIGS if c is BASELINE or not args.configs or c.name in args.configs]
    result = {"models": {}}
    for key in args.models:
        log = lambda msg: print(f"[shaped_link] {key}: {msg}", file=sys.stderr, flush=True)  # noqa: E731
        model = prepare_model(key, work, args.trace)
        log(f"placement objective gap {model.placement_doc['objective'].get('gap', float('nan')):.1%}")
        net.unshape()
        unshaped = run_config(net, model, BASELINE, work, args, tag="unshaped")
        log(f"unshaped baseline: {unshaped.get('output_tokens_per_s', unshaped.get('error', ''))}")
        net.shape(shape)
        rows, missing = [], {}
        for cfg in wanted:
            why = missing_option(cfg, choices)
            if why:
                missing[cfg.name] = why
                continue
            row = run_config(net, model, cfg, work, args, tag="shaped",
                             extra=auto_argv(model, cfg, choices["flags"], shape.rate_bit_s))
            if row["status"] == "ok":
                row["predicted"], row["predicted_note"] = predicted_step(
                    model, cfg, shape.rate_bit_s, args, unshaped_step_ms=(unshaped.get("server") or {}).get("step_ms"),
                    steps=(row.get("server") or {}).get("steps"))
            rows.append(row)
            log(f"{cfg.name}: {row.get('output_tokens_per_s', row.get('error', '')[:200])}")
        net.unshape()
        ratios(rows, rows[0])
        summary = model_summary(key, rows, unshaped)
        for r in (unshaped, *rows[1:]):
            r.pop("texts", None)
        result["models"][key] = {"description": model.description, "placement_objective": model.placement_doc.get(
            "objective"), "unshaped_baseline": unshaped, "rows": rows, "not_available": missing, "summary": summary}
    result["setup"] = setup(shape, choices, args)
    return result


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def setup(shape: LinkShape, choices: dict, args) -> dict:
    summary = (f"Two network namespaces joined by a veth pair on one 2-core CPU machine shared with other work, "
               f"`epserve serve --nnodes 2 --nproc-per-node 2` in each (gloo over the veth, GLOO_SOCKET_IFNAME "
               f"per node, OMP_NUM_THREADS=1); the link shaped with {shape.describe()} "
               f"({format_rate(shape.rate_bit_s)} each way). Closed loop from inside node 0's namespace: "
               f"{args.clients} clients, {args.requests} streaming greedy requests (serve_load's prompts in turn, "
               f"max_tokens {args.max_tokens}, ignore_eos), one warm-up request first; a fresh pair of servers "
               f"per config. Ratios are against two_a2a+contiguous on the same shaped link.")
    notes = columns_note(args.clients)
    return {"rate_bit_s": shape.rate_bit_s, "tbf": shape.describe(), "clients": args.clients,
            "requests": args.requests, "max_tokens": args.max_tokens, "trace": _rel(args.trace),
            "serve_choices": {k: sorted(v) for k, v in choices.items() if k != "flags"},
            "summary": summary, "notes": notes}


if __name__ == "__main__":
    sys.exit(main())
