"""The real ``epserve serve`` under torchrun (gloo, 2 and 4 ranks, every strategy): what it answers equals the
one-process greedy reference token for token; streaming, concurrent clients and the openai client agree; bad
requests get 4xx and the server keeps serving; --record-trace writes the live routing; an API key from EPSERVE_API_KEY is enforced; Ctrl-C stops every
process with status 0.

One server start per configuration (each costs seconds on 2 cores): all the checks of a configuration run
against the same server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from placement import Placement
from placement.trace import RoutingTrace
from tests.e2e.conftest import PROMPTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_TOKENS = 16
API_KEY = "e2e-secret-key"
EOS = (1, 5)
CHAT = [{"role": "user", "content": "sort a list"}]

# (ranks, strategy, solved placement?, transport)
CONFIGS = [(2, "two_a2a", False, "a2a"), (2, "coherent", True, "a2a"), (2, "speculative", True, "fixed"),
           (4, "two_a2a", True, "fixed"), (4, "coherent", True, "a2a"), (4, "speculative", True, "a2a"),
           (4, "speculative_two_a2a", True, "a2a")]


def _finish(ref: list[int], max_tokens: int) -> str:
    return "stop" if ref and ref[-1] in EOS else "length"


def _sse(response) -> list:
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
            for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("ranks, strategy, solved, transport", CONFIGS,
                         ids=[f"{g}x{s}" + ("+solved" if p else "") + f"+{t}" for g, s, p, t in CONFIGS])
def test_serves_the_one_process_tokens(ranks, strategy, solved, transport, pipeline, serve, tokenizer, reference,
                                       tmp_path):
    argv = ["--nproc-per-node", str(ranks), "--strategy", strategy, "--transport", transport,
            "--collective-timeout", "60"]
    if solved:
        argv += ["--placement", str(pipeline[ranks])]
    live_trace = tmp_path / "live.npz" if (ranks, strategy) == (2, "two_a2a") else None
    if live_trace:
        argv += ["--record-trace", str(live_trace), "--record-tokens", "200"]
    key = API_KEY if (ranks, strategy) == (2, "coherent") else None   # from the environment, as documented
    server = serve(argv, env={"EPSERVE_API_KEY": key} if key else None)
    assert sorted(server.rank_processes()) == list(range(ranks))
    refs = reference(PROMPTS, MAX_TOKENS)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if key:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "default_model", "prompt": "x"}, timeout=30)
        assert r.status_code == 401
    with httpx.Client(base_url=server.url, timeout=120, headers=headers) as c:
        _batch_equals_reference(c, tokenizer, refs)
        _stream_equals_reference(c, tokenizer, refs)
        _concurrent_clients(server.url, tokenizer, refs, headers)
        _openai_client(server.url, tokenizer, reference, key or "unused")
        _placement_endpoint(c, ranks, strategy, Placement.load(pipeline[ranks]) if solved else None)
        if (ranks, strategy) == (2, "two_a2a"):
            _bad_requests_then_still_serving(c, tokenizer, refs)
    code = server.stop(timeout_s=40)
    assert code == 0, server.log()[-3000:]
    assert server.alive() == []
    assert "epserve serve: stopped" in server.log()
    if live_trace:   # written by the engine at the clean stop
        _live_trace_holds_the_served_tokens(live_trace, tokenizer, refs)


def _live_trace_holds_the_served_tokens(path, tok, refs) -> None:
    trace = RoutingTrace.load(path)
    assert (trace.num_tokens, trace.num_layers, trace.num_experts, trace.top_k) == (200, 6, 16, 2)
    served = {t for p in PROMPTS for t in tok.encode(p)} | {t for r in refs for t in r}
    assert set(trace.token_ids_T.tolist()) <= served
    assert ((trace.experts_TLK >= 0) & (trace.experts_TLK < 16)).all()


def _batch_equals_reference(c: httpx.Client, tok, refs) -> None:
    r = c.post("/v1/completions", json={"model": "default_model", "prompt": PROMPTS, "max_tokens": MAX_TOKENS,
                                        "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [ch["index"] for ch in body["choices"]] == list(range(len(PROMPTS)))
    for choice, ref in zip(body["choices"], refs):
        assert choice["text"] == tok.decode(ref)
        assert choice["finish_reason"] == _finish(ref, MAX_TOKENS)
    assert body["usage"]["completion_tokens"] == sum(len(r) for r in refs)
    assert body["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in PROMPTS)


def _stream_equals_reference(c: httpx.Client, tok, refs) -> None:
    with c.stream("POST", "/v1/completions", json={"model": "default_model", "prompt": PROMPTS[:3],
                                                   "max_tokens": MAX_TOKENS, "temperature": 0,
                                                   "stream": True}) as r:
        assert r.status_code == 200
        events = _sse(r)
    assert events[-1] == "[DONE]"
    texts = ["", "", ""]
    for ev in events[:-1]:
        texts[ev["choices"][0]["index"]] += ev["choices"][0]["text"]
    assert texts == [tok.decode(ref) for ref in refs[:3]]


def _concurrent_clients(url: str, tok, refs, headers: dict) -> None:
    """Six clients at once, one prompt each, some streaming: every one answered with its reference text."""
    def one(i: int) -> str:
        body = {"model": "default_model", "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "temperature": 0}
        with httpx.Client(base_url=url, timeout=120, headers=headers) as c:
            if i % 2:
                with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    return "".join(ev["choices"][0]["text"] for ev in _sse(r)[:-1])
            return c.post("/v1/completions", json=body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(one, range(6), timeout=180))
    assert texts == [tok.decode(ref) for ref in refs[:6]]


def _openai_client(url: str, tok, reference, api_key: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=120, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["default_model"]
    done = client.completions.create(model="default_model", prompt=PROMPTS[4], max_tokens=MAX_TOKENS, temperature=0)
    assert done.choices[0].text == tok.decode(reference([PROMPTS[4]], MAX_TOKENS)[0])
    chat = client.chat.completions.create(model="default_model", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    ref = reference([tok.encode_chat(CHAT)], MAX_TOKENS)[0]
    assert chat.choices[0].message.content == tok.decode(ref)
    assert chat.usage.completion_tokens == len(ref)


def _placement_endpoint(c: httpx.Client, ranks: int, strategy: str, solved: Placement | None) -> None:
    doc = c.get("/placement").json()
    assert (doc["strategy"], doc["world_size"]) == (strategy, ranks)
    table = np.array(doc["placement"]["expert_to_gpus"])[:, :, 0]   # one copy per expert here
    if solved is not None:
        assert (table == solved.expert_to_gpu_LE).all()
    else:
        assert (table == np.arange(16) // (16 // ranks)).all()   # contiguous


def _bad_requests_then_still_serving(c: httpx.Client, tok, refs) -> None:
    cases = [
        ({"model": "default_model", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "default_model", "prompt": "x", "temperature": 7}, 400, "temperature"),
        ({"model": "default_model", "prompt": "x", "max_tokens": 600}, 400, "max_tokens"),
        ({"model": "default_model", "prompt": [[1, 4096]]}, 400, "prompt[0]"),
        ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
        ({"prompt": "x"}, 400, "model"),
    ]
    for body, status, param in cases:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = c.post("/v1/completions", json={"model": "default_model", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                        "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == tok.decode(refs[0])
    assert c.get("/health").status_code == 200
