"""The server against the REAL engine at world size 1 (EPTopology.single(), the bundled default model), served by
uvicorn on a free loopback port in a thread. Tokens are checked against ``MoEModel.greedy_reference``."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from epserve.server import ServerConfig
from tests.unit._live_server import (CHAT, LONG_BODY, LONG_TOKENS, MODEL_DIR, PROMPTS, LiveServer, idle,
                                     make_engine, sse_events, wait_for)

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def engine():
    eng = make_engine()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def live(engine):
    srv = LiveServer(engine, ServerConfig(model_dir=MODEL_DIR, max_body_bytes=64 * 1024))
    yield srv
    srv.stop()


def first_with(value, key):
    """``value`` when it holds ``key`` (a non-empty entry for a dict), else None (for wait_for)."""
    if isinstance(value, dict):
        return value if value.get(key) else None
    return value if key in value else None


def finish_of(ref_ids, max_new, eos_ids) -> str:
    return "stop" if ref_ids and ref_ids[-1] in eos_ids and len(ref_ids) <= max_new else "length"


# ---------------------------------------------------------------- generation equals the reference

def test_completions_batch_equals_greedy_reference(live, tokenizer, greedy_reference, engine):
    with live.client() as c:
        r = c.post("/v1/completions", json={"model": engine.model_name, "prompt": PROMPTS, "max_tokens": 12,
                                            "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "default_model"
    assert [ch["index"] for ch in body["choices"]] == list(range(len(PROMPTS)))
    total = 0
    for prompt, choice in zip(PROMPTS, body["choices"]):
        ref = greedy_reference(tokenizer.encode(prompt), 12)
        total += len(ref)
        assert choice["text"] == tokenizer.decode(ref)
        assert choice["finish_reason"] == finish_of(ref, 12, engine.eos_token_ids)
    assert body["usage"] == {"prompt_tokens": sum(len(tokenizer.encode(p)) for p in PROMPTS),
                             "completion_tokens": total, "total_tokens": body["usage"]["prompt_tokens"] + total}
    # the shipped model's pinned greedy continuation of "def " (tests/unit/test_default_model.py)
    assert body["choices"][0]["text"][:10] == " #  #  #  "


def test_token_id_prompts_and_ignore_eos(live, tokenizer, greedy_reference, engine):
    ids = [tokenizer.encode(p) for p in PROMPTS[:2]]
    with live.client() as c:
        r = c.post("/v1/completions", json={"model": "default_model", "prompt": ids, "max_tokens": 40,
                                            "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    for p, choice in zip(ids, r.json()["choices"]):
        assert choice["text"] == tokenizer.decode(greedy_reference(p, 40, eos=False))
        assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 80


def test_chat_completion_equals_reference(live, tokenizer, greedy_reference):
    with live.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "default_model", "messages": CHAT,
                                                 "max_completion_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = greedy_reference(tokenizer.encode_chat(CHAT), 24)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": tokenizer.decode(ref)}
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode_chat(CHAT))
    assert body["usage"]["completion_tokens"] == len(ref)


def test_streaming_gives_the_same_text_as_non_streaming(live):
    body = {"model": "default_model", "prompt": PROMPTS[:3], "max_tokens": 20, "temperature": 0.9, "top_p": 0.95,
            "seed": 1234}
    with live.client() as c:
        whole = c.post("/v1/completions", json=body).json()
        with c.stream("POST", "/v1/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    texts, finish = ["", "", ""], [None] * 3
    for ev in events[:-2]:
        assert ev["object"] == "text_completion" and ev["usage"] is None and len(ev["choices"]) == 1
        ch = ev["choices"][0]
        assert finish[ch["index"]] is None   # nothing after a prompt's final chunk
        texts[ch["index"]] += ch["text"]
        finish[ch["index"]] = ch["finish_reason"]
    assert texts == [ch["text"] for ch in whole["choices"]]
    assert finish == [ch["finish_reason"] for ch in whole["choices"]]
    order = [ev["choices"][0]["index"] for ev in events[:-2]]
    assert order.index(2) < len(order) - 1 - order[::-1].index(0)   # the prompts' chunks interleave


def test_chat_streaming(live):
    body = {"model": "default_model", "messages": CHAT, "max_tokens": 16, "temperature": 0}
    with live.client() as c:
        whole = c.post("/v1/chat/completions", json=body).json()
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(ev["object"] == "chat.completion.chunk" for ev in events[:-1])
    text = "".join(ev["choices"][0]["delta"].get("content", "") for ev in events[:-1])
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_stop_string_cuts_the_text_and_cancels(live, tokenizer, greedy_reference, engine):
    ref = greedy_reference(tokenizer.encode("def "), 16)
    full = tokenizer.decode(ref)   # " #  #  #  0x1,     #  0x00"
    cut = full.index("0x")
    need = next(n for n in range(len(ref)) if "0x" in tokenizer.decode(ref[:n]))   # ids through the one ending "0x"
    assert need == 8
    body = {"model": "default_model", "prompt": "def ", "max_tokens": 16, "temperature": 0, "stop": ["0x", "zz"]}
    with live.client() as c:
        r = c.post("/v1/completions", json=body)
        with c.stream("POST", "/v1/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            events = sse_events(s)
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (full[:cut], "stop")
    assert r.json()["usage"]["completion_tokens"] == need
    assert "".join(ev["choices"][0]["text"] for ev in events[:-2]) == full[:cut]
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["usage"]["completion_tokens"] == need
    wait_for(lambda: engine.snapshot().running == 0, "the stopped request to leave the batch")


def test_concurrent_clients_all_answered(live, tokenizer, greedy_reference):
    async def one(client, i):
        prompt = PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))
        r = await client.post("/v1/completions", json={"model": "default_model", "prompt": prompt,
                                                       "max_tokens": 8, "temperature": 0})
        return prompt, r

    async def main():
        async with httpx.AsyncClient(base_url=live.base, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    for prompt, r in asyncio.run(main()):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tokenizer.decode(greedy_reference(tokenizer.encode(prompt), 8))


# ---------------------------------------------------------------- bad input: 4xx, and the server still serves

LONG_IDS = [7] * 600   # more than the 512-token context


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": "default_model", "prompt": LONG_IDS}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "default_model", "prompt": ["ok", LONG_IDS]}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"model": "default_model", "prompt": [[1, 2], LONG_IDS]}, 400, "prompt[1]",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "default_model", "prompt": "x, " * 400}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": "default_model", "prompt": "hi", "max_tokens": 510}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "default_model", "messages": CHAT, "max_completion_tokens": 600}, 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("/v1/completions", {"model": "default_model", "prompt": [5, 4096]}, 400, "prompt", "invalid_token_id"),
    ("/v1/completions", {"model": "default_model", "prompt": [-1]}, 400, "prompt", "invalid_token_id"),
    ("/v1/completions", {"model": "default_model", "prompt": []}, 400, "prompt", "empty_prompt"),
    ("/v1/completions", {"model": "default_model", "prompt": "x", "max_tokens": 0}, 400, "max_tokens",
     "invalid_value"),
    ("/v1/completions", {"model": "default_model", "prompt": "x", "n": 3}, 400, "n", "unsupported_value"),
    ("/v1/completions", {"model": "default_model", "prompt": "x", "echo": True}, 400, "echo",
     "unsupported_parameter"),
    ("/v1/completions", {"model": "default_model", "prompt": "x", "temperature": 3}, 400, "temperature",
     "invalid_value"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": "default_model", "messages": [{"role": "user", "content": 1}]}, 400,
     "messages[0].content", "invalid_type"),
])
def test_bad_request_is_refused_and_server_still_serves(live, path, body, status, param, code):
    with live.client() as c:
        r = c.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, code)
        assert err["type"] == "invalid_request_error" and err["message"]
        ok = c.post("/v1/completions", json={"model": "default_model", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_not_json_wrong_method_unknown_path(live):
    with live.client() as c:
        r = c.post("/v1/completions", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert c.get("/v1/completions").status_code == 405
        r = c.get("/v2/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_body_over_the_limit_is_413_even_when_chunked(live):
    big = json.dumps({"model": "default_model", "prompt": "a" * (80 * 1024)}).encode()

    def chunks():
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    with live.client() as c:
        r = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/completions", json={"model": "default_model", "prompt": "x",
                                               "max_tokens": 1}).status_code == 200


# ---------------------------------------------------------------- health, models, metrics, placement

def test_health_and_models(live):
    with live.client() as c:
        h = c.get("/health")
        assert (h.status_code, h.json()) == (200, {"status": "ok"})
        m = c.get("/v1/models").json()
    assert m["object"] == "list"
    assert [(d["id"], d["object"], d["max_model_len"]) for d in m["data"]] == [("default_model", "model", 512)]


def test_metrics_has_request_token_latency_and_per_layer_series(live):
    with live.client() as c:
        assert c.post("/v1/completions", json={"model": "default_model", "prompt": PROMPTS, "max_tokens": 6,
                                               "temperature": 0}).status_code == 200
        text = wait_for(lambda: first_with(c.get("/metrics").text, 'epserve_a2a_calls_total{moe_layer="5"}'),
                        "per-layer traffic in /metrics")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['epserve_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples["epserve_prompt_tokens_total"] >= 1 and samples["epserve_generation_tokens_total"] >= 24
    assert samples["epserve_time_to_first_token_seconds_count"] >= 4
    assert samples["epserve_time_per_output_token_seconds_count"] >= 4
    assert samples["epserve_engine_healthy"] == 1.0 and samples["epserve_world_size"] == 1.0
    for name in ("epserve_queue_waiting_requests", "epserve_running_batch_sequences", "epserve_kv_used_tokens"):
        assert name in samples
    for layer in range(6):   # world size 1: every activation is local, nothing crosses a rank
        assert samples[f'epserve_local_activation_ratio{{moe_layer="{layer}"}}'] == 1.0
        assert samples[f'epserve_a2a_bytes_total{{moe_layer="{layer}"}}'] == 0.0
        assert samples[f'epserve_transfers_total{{moe_layer="{layer}"}}'] == 0.0
        assert samples[f'epserve_kv_coherence_bytes_total{{moe_layer="{layer}"}}'] == 0.0
        assert samples[f'epserve_activations_total{{moe_layer="{layer}"}}'] > 0
        assert samples[f'epserve_expert_load_imbalance_ratio{{moe_layer="{layer}"}}'] >= 1.0
        assert f'epserve_a2a_calls_total{{moe_layer="{layer}"}}' in samples


def test_placement_document_and_live_traffic(live):
    with live.client() as c:
        c.post("/v1/completions", json={"model": "default_model", "prompt": "x", "max_tokens": 3})
        doc = wait_for(lambda: first_with(c.get("/placement").json(), "layers"), "live traffic")
    assert (doc["strategy"], doc["world_size"]) == ("two_a2a", 1)
    p = doc["placement"]
    assert (p["version"], p["num_layers"], p["num_experts"], p["slots_per_gpu"]) == (2, 6, 16, 16)
    assert p["expert_to_gpus"] == [[[0]] * 16] * 6
    assert [layer["moe_layer"] for layer in doc["layers"]] == list(range(6))
    for layer in doc["layers"]:
        assert (layer["lar"], layer["transfers_per_token_layer"]) == (1.0, 0.0)
        assert sum(layer["expert_load"]) == layer["activations"] > 0
    assert [sum(row) for row in doc["gpu_load"]] == [layer["activations"] for layer in doc["layers"]]


# ---------------------------------------------------------------- disconnects cancel

def test_stream_disconnect_cancels_and_frees_kv(live, engine):
    wait_for(lambda: idle(engine), "an idle engine")
    before = engine.snapshot().generation_tokens
    with live.client() as c:
        with c.stream("POST", "/v1/completions", json={**LONG_BODY, "stream": True}) as r:
            first = json.loads(next(x for x in r.iter_lines() if x)[len("data: "):])
            assert first["choices"][0]["finish_reason"] is None
    wait_for(lambda: idle(engine), "the cancelled requests' KV to be freed")
    assert engine.snapshot().generation_tokens - before < LONG_TOKENS


def test_non_stream_disconnect_cancels_and_frees_kv(live, engine):
    wait_for(lambda: idle(engine), "an idle engine")
    before = engine.snapshot().generation_tokens
    body = json.dumps(LONG_BODY).encode()
    host, port = live.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: engine.snapshot().generation_tokens > before, "the requests to generate")
    wait_for(lambda: idle(engine), "the cancelled requests' KV to be freed")
    assert engine.snapshot().generation_tokens - before < LONG_TOKENS
