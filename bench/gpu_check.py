"""One-GPU check of the default model at world size 1 (no network needed; under 8 minutes on one H200).

    build_runner(default model, EPTopology.single(device), two_a2a, dtype given explicitly)
    (a) agreement: greedy tokens of bfloat16 on the device against float32 on the CPU, fixed code prompts
    (b) speed: output tokens/s at batch 1 / 32 / 128, 64 new tokens each (prefill included in the wall; decode
        dominates), plus the median decode step
    (c) layer times: Runner._moe and Runner._attention wrapped with device syncs, decode steps at batch 32 / 128
        (ms per layer call and share of the step; the syncs make this a separate pass)
    (d) MoE-CAP S-MBU / S-MFU (epserve/engine/moe_cap.py) of the median decode step of (b), from that step's
        real routing (a second runner with a RoutingRecorder replays the same greedy run) and each sequence's
        own context; peaks: H200 4.8 TB/s HBM3e, 989 TFLOP/s dense BF16 (NVIDIA H200 datasheet)
    each part runs on its own: a failure is reported as SKIPPED with the reason, the others still run
    --> bench/results/local/gpu_check.json + gpu_check.md (the device, torch and CUDA versions stated)

Run on the GPU machine:  python bench/gpu_check.py            (--device cuda, bfloat16)
Test it here:            python bench/gpu_check.py --device cpu --quick --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_io import LOCAL_OUT, OUT_HELP  # noqa: E402  (--out default: untracked)

import torch  # noqa: E402

from comm.strategy import Strategy  # noqa: E402
from comm.topology import EPTopology  # noqa: E402
from epserve.engine import moe_cap  # noqa: E402
from epserve.engine.builder import build_runner  # noqa: E402
from epserve.engine.plan import GREEDY, SeqWork, StepPlan  # noqa: E402
from epserve.model.config import ModelConfig  # noqa: E402

MODEL_DIR = ROOT / "epserve" / "assets" / "default_model"
PROMPTS = [
    "def ", "import os\n", "class Stack:\n    def push(self, x):", "for i in range(10):",
    "def fibonacci(n):\n", "with open(path) as f:\n", "    return sorted(", "if __name__ == \"__main__\":\n",
    "x = [i * i for i in", "try:\n    import numpy as np\nexcept", "def __init__(self, name):\n        self.",
    "print(\"hello", "def read_config(path):\n    ", "while True:\n    line = ", "return {k: v for k, v in",
    "raise ValueError(",
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def prompt_ids(n: int) -> list[list[int]]:
    from epserve.server.text import Tokenizer
    tok = Tokenizer.from_dir(MODEL_DIR)
    return [tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_runner(device: torch.device, dtype: torch.dtype, *, record_tokens: int = 0, kv_tokens: int = 16384):
    return build_runner(MODEL_DIR, EPTopology.single(device), strategy=Strategy.TWO_A2A, dtype=dtype,
                        kv_cache_tokens=kv_tokens, record_tokens=record_tokens)


_SEQ_BASE = [0]


def run_batch(runner, prompts: list[list[int]], new_tokens: int, device: torch.device) -> dict:
    """One prefill step for all prompts, then new_tokens - 1 decode steps (greedy, EOS ignored); every step
    timed with a device sync; the sequences are released at the end. Fresh sequence ids on every call."""
    base, _SEQ_BASE[0] = _SEQ_BASE[0], _SEQ_BASE[0] + len(prompts)
    ids = [base + i for i in range(len(prompts))]
    sync(device)
    t_start = time.perf_counter()
    works = tuple(SeqWork(s, tuple(p), 0, 0, GREEDY) for s, p in zip(ids, prompts))
    last = dict(runner.execute(StepPlan(step=0, work=works)).next_token_ids)
    sync(device)
    prefill_s = time.perf_counter() - t_start
    out = {s: [last[s]] for s in ids}
    step_s = []
    for k in range(1, new_tokens):
        works = tuple(SeqWork(s, (last[s],), len(p) + k - 1, 0, GREEDY) for s, p in zip(ids, prompts))
        t0 = time.perf_counter()
        last = dict(runner.execute(StepPlan(step=k, work=works)).next_token_ids)
        sync(device)
        step_s.append(time.perf_counter() - t0)
        for s in ids:
            out[s].append(last[s])
    wall = time.perf_counter() - t_start
    runner.execute(StepPlan(step=new_tokens, release=tuple(ids)))
    return {"tokens": [out[s] for s in ids], "wall_s": wall, "prefill_s": prefill_s, "step_s": step_s}


# ---- (a) agreement ----------------------------------------------------------------------------------------------
def part_agreement(args, device: torch.device, dtype: torch.dtype) -> dict:
    prompts = prompt_ids(args.agree_prompts)
    ref = run_batch(make_runner(torch.device("cpu"), torch.float32), prompts, args.agree_tokens,
                    torch.device("cpu"))["tokens"]
    got = run_batch(make_runner(device, dtype), prompts, args.agree_tokens, device)["tokens"]
    same_prefix = []
    for a, b in zip(ref, got):
        n = 0
        while n < len(a) and a[n] == b[n]:
            n += 1
        same_prefix.append(n)
    positions = sum(x == y for a, b in zip(ref, got) for x, y in zip(a, b))
    return {"prompts": len(prompts), "new_tokens": args.agree_tokens,
            "identical_sequences": sum(a == b for a, b in zip(ref, got)),
            "identical_positions": positions, "total_positions": len(prompts) * args.agree_tokens,
            "tokens_before_first_difference": same_prefix,
            "reference": "float32 on the CPU, same runner code", "checked": f"{args.dtype} on {device}"}


# ---- (b) speed + (d) utilisation ----------------------------------------------------------------------------------
def part_speed(args, device: torch.device, dtype: torch.dtype) -> dict:
    runner = make_runner(device, dtype)
    run_batch(runner, prompt_ids(4), 4, device)   # warm-up (kernels, allocator)
    rows = []
    for B in args.batches:
        r = run_batch(runner, prompt_ids(B), args.new_tokens, device)
        n = B * args.new_tokens
        rows.append({"batch": B, "new_tokens": args.new_tokens, "output_tokens": n, "wall_s": r["wall_s"],
                     "output_tokens_per_s": n / r["wall_s"], "prefill_ms": 1e3 * r["prefill_s"],
                     "decode_step_ms_median": 1e3 * statistics.median(r["step_s"]),
                     "decode_step_ms_p90": 1e3 * sorted(r["step_s"])[int(0.9 * (len(r["step_s"]) - 1))],
                     "step_s": r["step_s"]})
        log(f"speed: batch {B}: {n / r['wall_s']:.0f} tok/s, decode step {rows[-1]['decode_step_ms_median']:.2f} ms")
    return {"rows": rows}


def part_utilisation(args, device: torch.device, dtype: torch.dtype, speed: dict) -> dict:
    """S-MBU / S-MFU of the median decode step of each batch of (b), from the step's own routing."""
    config = ModelConfig.from_dir(MODEL_DIR)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for srow in speed["rows"]:
        B, steps = srow["batch"], srow["step_s"]
        k = steps.index(sorted(steps)[len(steps) // 2])   # the median decode step (0-based among decode steps)
        prompts = prompt_ids(B)
        rec = make_runner(device, dtype, record_tokens=sum(map(len, prompts)) + B * args.new_tokens)
        run_batch(rec, prompts, args.new_tokens, device)
        r = rec.recorder
        # decode step k + 1 feeds position len(prompt) + k of every sequence: pick those recorded rows
        seq_base = int(r.seq_ids_R[:r.count].min())
        want = {seq_base + i: len(p) + k for i, p in enumerate(prompts)}
        rows_k = [i for i in range(r.count) if not r.is_prefill_R[i]
                  and want.get(int(r.seq_ids_R[i])) == int(r.positions_R[i])]
        if len(rows_k) != B:
            raise RuntimeError(f"batch {B}: found {len(rows_k)} recorded rows of decode step {k}, expected {B}")
        topk_TLK = r.experts_RLK[rows_k]
        activated = moe_cap.activated_experts(topk_TLK)
        context = [int(r.positions_R[i]) + 1 for i in rows_k]
        counts = moe_cap.decode_step_counts(config, activated, context, dtype_bytes=dtype_bytes,
                                            token_ids=[int(r.token_ids_R[i]) for i in rows_k])
        step = steps[k]
        all_experts = [range(config.num_experts)] * config.num_moe_layers
        dense_bytes = sum(moe_cap.decode_step_bytes(config, all_experts, context, dtype_bytes=dtype_bytes).values())
        rows.append({"batch": B, "decode_step": k, "step_ms": 1e3 * step,
                     "activated_experts_per_layer": [len(a) for a in activated],
                     "bytes_read": counts.bytes, "bytes_by_part": counts.bytes_by_part, "flops": counts.flops,
                     "flops_by_part": counts.flops_by_part,
                     "s_mbu": moe_cap.s_mbu(counts.bytes, step, args.peak_bw),
                     "s_mfu": moe_cap.s_mfu(counts.flops, step, args.peak_flops),
                     "mbu_if_every_expert_read": moe_cap.s_mbu(dense_bytes, step, args.peak_bw)})
        log(f"utilisation: batch {B}: S-MBU {rows[-1]['s_mbu']:.2e}, S-MFU {rows[-1]['s_mfu']:.2e}")
    return {"peak_bytes_per_s": args.peak_bw, "peak_flops_per_s": args.peak_flops, "dtype_bytes": dtype_bytes,
            "rows": rows}


# ---- (c) layer times ------------------------------------------------------------------------------------------
def part_layers(args, device: torch.device, dtype: torch.dtype) -> dict:
    runner = make_runner(device, dtype)
    missing = [n for n in ("_moe", "_attention") if not callable(getattr(runner, n, None))]
    if missing:
        raise RuntimeError(f"this Runner has no {', '.join(missing)} to time (renamed?)")
    spent: dict[str, list[float]] = {"_moe": [], "_attention": []}

    def timed(name):
        inner = getattr(runner, name)

        def wrapper(*a, **kw):
            sync(device)
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            sync(device)
            spent[name].append(time.perf_counter() - t0)
            return out
        return wrapper

    run_batch(runner, prompt_ids(4), 4, device)   # warm-up, unwrapped
    for name in spent:
        setattr(runner, name, timed(name))
    config = ModelConfig.from_dir(MODEL_DIR)
    rows = []
    for B in args.layer_batches:
        for v in spent.values():
            v.clear()
        r = run_batch(runner, prompt_ids(B), args.layer_tokens, device)
        L_moe, L = config.num_moe_layers, config.num_layers
        moe = spent["_moe"][L_moe:]          # decode steps only (the prefill step's calls come first)
        att = spent["_attention"][L:]
        step_ms = 1e3 * statistics.median(r["step_s"])
        rows.append({"batch": B, "moe_layer_ms_median": 1e3 * statistics.median(moe),
                     "attention_layer_ms_median": 1e3 * statistics.median(att),
                     "decode_step_ms_median_synced": step_ms,
                     "moe_share_of_step": L_moe * statistics.median(moe) * 1e3 / step_ms,
                     "attention_share_of_step": L * statistics.median(att) * 1e3 / step_ms})
        log(f"layers: batch {B}: MoE layer {rows[-1]['moe_layer_ms_median']:.3f} ms, attention "
            f"{rows[-1]['attention_layer_ms_median']:.3f} ms, step {step_ms:.2f} ms")
    return {"rows": rows, "note": "each layer call wrapped with device syncs (a separate pass from (b))"}


# ---- report -----------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_report(out: Path, result: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    s, parts = result["setup"], result["parts"]
    lines = [f"# GPU check: default model, world size 1, {s['dtype']} on {s['env'].get('gpu', s['env']['device'])}",
             "", s["summary"], ""]
    for name, part in parts.items():
        if "skipped" in part:
            lines += [f"**{name}: SKIPPED** ({part['skipped']})", ""]
    a = parts.get("agreement", {})
    if "skipped" not in a and a:
        lines += [f"**(a) agreement** ({a['checked']} against {a['reference']}, {a['prompts']} prompts x "
                  f"{a['new_tokens']} greedy tokens): {a['identical_sequences']}/{a['prompts']} sequences identical, "
                  f"{a['identical_positions']}/{a['total_positions']} positions identical; tokens before the first "
                  f"difference: {a['tokens_before_first_difference']}", ""]
    sp = parts.get("speed", {})
    if sp.get("rows"):
        lines += ["**(b) speed** (one prefill step + decode steps, greedy, EOS ignored; wall includes prefill)", "",
                  "| batch | new tokens | output tok/s | prefill ms | decode step ms (median / p90) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['new_tokens']} | {r['output_tokens_per_s']:.0f} | {r['prefill_ms']:.1f} | "
                  f"{r['decode_step_ms_median']:.2f} / {r['decode_step_ms_p90']:.2f} |" for r in sp["rows"]]
        lines.append("")
    ly = parts.get("layers", {})
    if ly.get("rows"):
        lines += ["**(c) layer times** (decode steps; each call wrapped with device syncs)", "",
                  "| batch | MoE layer ms | attention ms | step ms (synced pass) | MoE share | attention share |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['moe_layer_ms_median']:.3f} | {r['attention_layer_ms_median']:.3f} | "
                  f"{r['decode_step_ms_median_synced']:.2f} | {r['moe_share_of_step']:.0%} | "
                  f"{r['attention_share_of_step']:.0%} |" for r in ly["rows"]]
        lines.append("")
    ut = parts.get("utilisation", {})
    if ut.get("rows"):
        lines += [f"**(d) MoE-CAP utilisation** of the median decode step (peaks {ut['peak_bytes_per_s'] / 1e12:.1f} "
                  f"TB/s, {ut['peak_flops_per_s'] / 1e12:.0f} TFLOP/s; rules in epserve/engine/moe_cap.py)", "",
                  "| batch | step ms | activated experts per layer | bytes read | FLOPs | S-MBU | S-MFU | "
                  "MBU if every expert were read |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['step_ms']:.2f} | {r['activated_experts_per_layer']} | {r['bytes_read']:,} | "
                  f"{r['flops']:,} | {r['s_mbu']:.2e} | {r['s_mfu']:.2e} | {r['mbu_if_every_expert_read']:.2e} |"
                  for r in ut["rows"]]
        lines.append("")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a path check of this script)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="dtype on the device (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quick", action="store_true", help="small batches and few tokens (a smoke run)")
    p.add_argument("--peak-bw", type=float, default=moe_cap.H200_PEAK_BYTES_PER_S, help="bytes/s (H200: 4.8e12)")
    p.add_argument("--peak-flops", type=float, default=moe_cap.H200_PEAK_BF16_FLOPS,
                   help="FLOP/s (H200 dense BF16: 989e12)")
    p.add_argument("--out", default=str(LOCAL_OUT),
                   help=OUT_HELP)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    skipped_device = None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        skipped_device = "no CUDA device visible to torch: ran everything on the CPU instead"
        log(skipped_device)
        device = torch.device("cpu")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = DTYPES[args.dtype]
    if args.quick:
        args.batches, args.new_tokens, args.layer_batches, args.layer_tokens = [1, 8], 8, [8], 6
        args.agree_prompts, args.agree_tokens = 4, 8
    else:
        args.batches, args.new_tokens, args.layer_batches, args.layer_tokens = [1, 32, 128], 64, [32, 128], 16
        args.agree_prompts, args.agree_tokens = 16, 32
    torch.manual_seed(0)
    parts: dict[str, dict] = {}

    def attempt(name: str, fn, *a):
        t0 = time.perf_counter()
        try:
            parts[name] = fn(*a)
        except Exception as exc:  # noqa: BLE001 - a failed part is reported, the others still run
            parts[name] = {"skipped": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                           "traceback": traceback.format_exc()[-3000:]}
            log(f"{name}: SKIPPED: {parts[name]['skipped']}")
        parts[name]["seconds"] = time.perf_counter() - t0

    attempt("agreement", part_agreement, args, device, dtype)
    attempt("speed", part_speed, args, device, dtype)
    attempt("layers", part_layers, args, device, dtype)
    if parts["speed"].get("rows"):
        attempt("utilisation", part_utilisation, args, device, dtype, parts["speed"])
    else:
        parts["utilisation"] = {"skipped": "needs the step times of (b), which was skipped"}
    for row in parts["speed"].get("rows", []):
        row["step_s"] = [round(x, 6) for x in row["step_s"]]
    env = environment(device)
    summary = (f"World size 1 (EPTopology.single on {device}; build_runner, two_a2a, dtype {args.dtype} given "
               f"explicitly), the bundled default model (tiny Mixtral: 6 MoE layers, 16 experts, top-2, hidden 128, "
               f"vocab 4096). torch {env['torch']}, CUDA {env['cuda']}. Prompts: fixed code snippets tokenized by "
               f"the model's tokenizer. Times with a device sync after every step. "
               + ("QUICK run (small batches). " if args.quick else "")
               + (f"NOTE: {skipped_device}. " if skipped_device else "")
               + ("CPU run: S-MBU/S-MFU against the H200 peaks are meaningless here (path check only). "
                  if device.type == "cpu" else ""))
    result = {"setup": {"device": str(device), "dtype": args.dtype, "quick": args.quick, "env": env,
                        "summary": summary, "run_s": time.perf_counter() - t_start,
                        "device_skipped": skipped_device}, "parts": parts}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, result)
    print((out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
