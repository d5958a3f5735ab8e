"""serve_bench's load generator and its statistics (asyncio + httpx, one event loop, no thread per request).

    open loop:   Poisson arrivals at ``rate`` req/s (seeded exponential gaps, the same schedule for every config)
                 until ``n`` requests are sent or ``send_s`` passed --> wait for the rest at most ``drain_s``
    closed loop: ``clients`` coroutines, each sending its next request when its last one ended, ``n`` in all
    --> per request: send time, chunk arrival times (streaming), completion and prompt tokens (usage)
    --> summarize(): req/s, output tok/s, TTFT / TPOT / ITL / E2EL (mean, p50, p90, p99), goodput under the SLO

Definitions (as ``vllm bench serve``): duration = first send to last completion; TTFT = first text chunk -
send; TPOT = (E2EL - TTFT) / (output tokens - 1) per request; ITL = gaps between consecutive text chunks of a
request, pooled over requests; E2EL = completion - send; goodput = requests/s that met TTFT <= slo_ttft_ms and
TPOT <= slo_tpot_ms (a one-token request is judged on its TTFT).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np

PCTS = (50, 90, 99)


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int, *, ignore_eos: bool = True) -> dict:
    """One streaming greedy /v1/completions request, timed on the client's clock."""
    body = {"model": "default_model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks, text, usage = [], "", None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}", "start": start}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                if event["choices"] and event["choices"][0]["text"]:
                    chunks.append(time.perf_counter())
                    text += event["choices"][0]["text"]
    except httpx.HTTPError as exc:
        return {"ok": False, "error": repr(exc), "start": start}
    end = time.perf_counter()
    if not chunks or usage is None:
        return {"ok": False, "error": "no tokens", "start": start}
    n = usage["completion_tokens"]
    return {"ok": True, "start": start, "end": end, "text": text, "tokens": n,
            "prompt_tokens": usage.get("prompt_tokens"), "ttft": chunks[0] - start, "e2el": end - start,
            "tpot": (end - chunks[0]) / (n - 1) if n > 1 else None, "itl": list(np.diff(chunks))}


def _client(url: str, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s, connect=10),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))


async def _open_loop(url, prompts, rate, max_tokens, seed, send_s, drain_s) -> tuple[list[dict], float, int]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(prompts))
    offsets = np.cumsum(gaps) - gaps[0]   # the first request goes at once
    async with _client(url, send_s + drain_s) as client:
        t0, tasks = time.perf_counter(), []
        for prompt, at in zip(prompts, offsets):
            if at > send_s:
                break
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            tasks.append(asyncio.create_task(stream_one(client, prompt, max_tokens)))
        sent = len(tasks)
        done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        results = [t.result() if t in done else {"ok": False, "error": "not finished within the drain bound"}
                   for t in tasks]
    return results, t0, sent


async def _closed_loop(url, prompts, clients, max_tokens, deadline_s) -> tuple[list[dict], float, int]:
    queue = list(enumerate(prompts))[::-1]
    results: list[dict | None] = [None] * len(prompts)
    stop_at = time.monotonic() + deadline_s

    async def worker(client):
        while queue and time.monotonic() < stop_at:
            i, prompt = queue.pop()
            results[i] = await stream_one(client, prompt, max_tokens)

    async with _client(url, deadline_s + 60) as client:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(clients))), deadline_s + 60)
        except asyncio.TimeoutError:
            pass
    sent = sum(r is not None for r in results)
    return [r for r in results if r is not None], t0, sent


def open_loop(url: str, prompts: list[str], *, rate: float, max_tokens: int, seed: int, send_s: float,
              drain_s: float) -> tuple[list[dict], float, int]:
    """(results, t0, requests sent): Poisson arrivals at ``rate`` req/s, at most len(prompts) requests."""
    return asyncio.run(_open_loop(url, prompts, rate, max_tokens, seed, send_s, drain_s))


def closed_loop(url: str, prompts: list[str], *, clients: int, max_tokens: int,
                deadline_s: float) -> tuple[list[dict], float, int]:
    return asyncio.run(_closed_loop(url, prompts, clients, max_tokens, deadline_s))


def _stats(values_s) -> dict:
    a = np.asarray(values_s, dtype=float) * 1e3
    if not len(a):
        return {"mean": None, **{f"p{q}": None for q in PCTS}}
    return {"mean": float(a.mean()), **{f"p{q}": float(np.percentile(a, q)) for q in PCTS}}


def summarize(results: list[dict], t0: float, sent: int, *, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    """The field's figures of one load phase (latencies in ms)."""
    ok = [r for r in results if r["ok"]]
    duration = max(r["end"] for r in ok) - t0 if ok else float("nan")
    tokens = sum(r["tokens"] for r in ok)
    good = [r for r in ok if r["ttft"] * 1e3 <= slo_ttft_ms and (r["tpot"] is None or r["tpot"] * 1e3 <= slo_tpot_ms)]
    return {"sent": sent, "completed": len(ok), "failed": sent - len(ok), "duration_s": duration,
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:3],
            "request_throughput": len(ok) / duration if ok else 0.0,
            "output_token_throughput": tokens / duration if ok else 0.0, "output_tokens": tokens,
            "goodput": len(good) / duration if ok else 0.0, "slo_attainment": len(good) / sent if sent else 0.0,
            "ttft_ms": _stats([r["ttft"] for r in ok]),
            "tpot_ms": _stats([r["tpot"] for r in ok if r["tpot"] is not None]),
            "itl_ms": _stats([x for r in ok for x in r["itl"]]),
            "e2el_ms": _stats([r["e2el"] for r in ok]),
            # for S-MBU / S-MFU: decode tokens and the keys they attended to (context = prompt + j at token j)
            "decode_tokens": sum(r["tokens"] - 1 for r in ok),
            "decode_context_sum": sum((r["prompt_tokens"] or 0) * (r["tokens"] - 1) + r["tokens"] * (r["tokens"] - 1) / 2
                                      for r in ok)}
