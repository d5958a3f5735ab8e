"""serve_bench's MoE-CAP side: the machine's peaks (a probe), S-MBU / S-MFU of a load phase, the greedy
reference for the accuracy axis, and the server's CPU seconds (the cost axis).

    probe_peaks():  P processes at once (P = min(ranks, cores); one thread each, as the ranks run with
                    OMP_NUM_THREADS=1): a float32 tensor copy (bytes read + written / s) and a float32 matmul
                    (2 n^3 / s), best of several tries; and one process alone --> machine peak = the better of
                    one alone and the sum over the P at once (on a shared machine P at once may get less)
    phase_cap():    /metrics deltas (engine steps, generated tokens) --> mean batch B = tokens / steps;
                    client usage --> mean decode context; /placement expert loads --> expected experts a batch of
                    B tokens activates per layer (1 - (1 - k p_e)^B summed over experts e, p_e = the expert's share
                    of the layer's activations); epserve/engine/moe_cap.py counts the step's bytes and FLOPs;
                    step time = mean TPOT (MoE-CAP's decode-step time) --> S-MBU, S-MFU
    reference():    MoEModel.greedy_reference (one process, whole forward every step) on fixed prompts
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import numpy as np

from epserve.engine import moe_cap
from epserve.model.config import ModelConfig

_PROBE = r"""
import json, sys, time, torch
torch.set_num_threads(1)
mb, n, tries = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
src = torch.ones(mb * 2**20 // 4); dst = torch.empty_like(src); dst.copy_(src)
a = torch.randn(n, n); b = torch.randn(n, n); a @ b
best_copy = best_mm = float("inf")
for _ in range(tries):
    t = time.perf_counter(); dst.copy_(src); best_copy = min(best_copy, time.perf_counter() - t)
    t = time.perf_counter(); a @ b; best_mm = min(best_mm, time.perf_counter() - t)
print(json.dumps({"bytes_per_s": 2 * src.numel() * 4 / best_copy, "flops_per_s": 2 * n ** 3 / best_mm}))
"""


def probe_peaks(processes: int, *, mb: int = 256, n: int = 1024, tries: int = 8) -> dict:
    """Peak memory bandwidth (copy: read + write) and float32 FLOP/s, one thread per process, ``processes``
    at once (and one alone). Best of ``tries`` per process: the machine is shared, the best try is the least
    disturbed."""
    def run(p: int) -> list[dict]:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, "-c", _PROBE, str(mb), str(n), str(tries)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(p)]
        return [json.loads(pr.communicate(timeout=300)[0]) for pr in procs]

    one, many = run(1)[0], run(processes)
    together_bytes, together_flops = sum(r["bytes_per_s"] for r in many), sum(r["flops_per_s"] for r in many)
    return {"processes": processes, "copy_mib": mb, "matmul_n": n, "tries": tries,
            "one_thread_bytes_per_s": one["bytes_per_s"], "one_thread_flops_per_s": one["flops_per_s"],
            "together_bytes_per_s": together_bytes, "together_flops_per_s": together_flops,
            # the machine can do at least the better of the two (processes at once share cores with other work)
            "peak_bytes_per_s": max(one["bytes_per_s"], together_bytes),
            "peak_flops_per_s": max(one["flops_per_s"], together_flops)}


_COUNTER = re.compile(r"^(epserve_engine_(?:steps|prompt_tokens|generation_tokens))(?:_total)? (\S+)$", re.M)


def engine_counters(url: str) -> dict:
    """The engine's step and token counters (Prometheus /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {k: float(v) for k, v in _COUNTER.findall(text)}


def expert_shares(url: str) -> list[np.ndarray]:
    """Per MoE layer, each expert's share of the layer's activations so far (/placement)."""
    out = []
    for layer in httpx.get(f"{url}/placement", timeout=10).json()["layers"]:
        load = np.asarray(layer["expert_load"], dtype=float)
        out.append(load / load.sum() if load.sum() else np.full(len(load), 1.0 / len(load)))
    return out


def expected_activated(shares: list[np.ndarray], top_k: int, batch: int) -> list[float]:
    """Expected number of distinct experts ``batch`` tokens route to, per layer (tokens independent, a token
    picks expert e with probability min(1, k p_e))."""
    return [float(np.sum(1 - (1 - np.minimum(1.0, top_k * p)) ** batch)) for p in shares]


def phase_cap(cfg: ModelConfig, summary: dict, before: dict, after: dict, shares: list[np.ndarray],
              peaks: dict, dtype_bytes: int = 4) -> dict:
    """S-MBU and S-MFU of one load phase (see the module docstring)."""
    steps = after.get("epserve_engine_steps", 0) - before.get("epserve_engine_steps", 0)
    gen = after.get("epserve_engine_generation_tokens", 0) - before.get("epserve_engine_generation_tokens", 0)
    tpot = summary["tpot_ms"]["mean"]
    if steps <= 0 or not summary["decode_tokens"] or not tpot:
        return {"s_mbu": None, "s_mfu": None}
    batch = max(1, round(gen / steps))
    ctx = max(1, round(summary["decode_context_sum"] / summary["decode_tokens"]))
    activated = [frozenset(range(max(1, round(x)))) for x in expected_activated(shares, cfg.top_k, batch)]
    counts = moe_cap.decode_step_counts(cfg, activated, [ctx] * batch, dtype_bytes=dtype_bytes)
    step_s = tpot / 1e3
    return {"engine_steps": int(steps), "generated_tokens": int(gen), "mean_batch": gen / steps,
            "batch_used": batch, "mean_decode_context": ctx,
            "activated_experts_per_layer": float(np.mean([len(a) for a in activated])),
            "step_bytes": counts.bytes, "step_flops": counts.flops, "step_s": step_s,
            "s_mbu": moe_cap.s_mbu(counts.bytes, step_s, peaks["peak_bytes_per_s"]),
            "s_mfu": moe_cap.s_mfu(counts.flops, step_s, peaks["peak_flops_per_s"])}


def reference(model_dir, prompts: list[str], max_tokens: int) -> list[str]:
    """The one-process greedy text of each prompt (EOS ends it), encoded and decoded as the server does."""
    from epserve.model.loader import load_model
    from epserve.server.text import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    model, _ = load_model(model_dir)
    eos = ModelConfig.from_dir(model_dir).eos_token_ids
    ids = model.greedy_reference([tok.encode(p) for p in prompts], max_tokens, eos_token_ids=eos)
    return [tok.decode(x) for x in ids]


def accuracy(url: str, prompts: list[str], expected: list[str], max_tokens: int) -> dict:
    """Greedy requests sent together (batched by the server); the fraction whose text equals the reference."""
    import asyncio

    from _serve_bench_load import _client, stream_one

    async def go():
        async with _client(url, 120) as c:
            return await asyncio.gather(*(stream_one(c, p, max_tokens, ignore_eos=False) for p in prompts))

    got = asyncio.run(go())
    same = [g["ok"] and g["text"] == e for g, e in zip(got, expected)]
    return {"requests": len(prompts), "equal": int(sum(same)), "accuracy": sum(same) / len(prompts),
            "max_tokens": max_tokens}


def cpu_seconds(server) -> float:
    """User + system CPU seconds of every process of the server's tree so far (children that exited
    included where the OS reports them)."""
    total = 0.0
    for p in server.tree():
        try:
            t = p.cpu_times()
            total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
        except Exception:   # a process that just exited
            continue
    return total
