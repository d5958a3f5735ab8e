"""The official ``openai`` client against a real uvicorn server (API key on), the queue-full 503 with Retry-After
(an engine with max_waiting=2), and an engine that goes down (503, error event, /health 503). Real engines at
world size 1 on the bundled default model."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from epserve.server import ServerConfig
from tests.unit._live_server import CHAT, LONG_BODY, MODEL_DIR, PROMPTS, LiveServer, idle, make_engine, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def engine():
    eng = make_engine()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def keyed(engine):
    srv = LiveServer(engine, ServerConfig(model_dir=MODEL_DIR, api_key=KEY, served_model_names=("epserve-tiny",),
                                          default_temperature=0.0))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(keyed):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=keyed.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_api_key_is_required_on_v1(keyed):
    with keyed.client() as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            r = c.post("/v1/completions", json={"model": "epserve-tiny", "prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models", headers=headers).status_code == 401
        assert c.get("/health").status_code == 200     # health and metrics stay open to probes
        assert c.get("/metrics").status_code == 200
        ok = c.post("/v1/completions", json={"model": "epserve-tiny", "prompt": "x", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert c.post("/v1/completions", json={"model": "default_model", "prompt": "x"},
                      headers={"Authorization": f"Bearer {KEY}"}).status_code == 404   # served under its alias


def test_openai_client_completions_batch_and_models(client, tokenizer, greedy_reference):
    assert [m.id for m in client.models.list().data] == ["epserve-tiny"]
    out = client.completions.create(model="epserve-tiny", prompt=PROMPTS[:3], max_tokens=10, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, out.choices):
        assert choice.text == tokenizer.decode(greedy_reference(tokenizer.encode(prompt), 10))
    single = client.completions.create(model="epserve-tiny", prompt=PROMPTS[0], max_tokens=10)   # default T=0
    assert single.choices[0].text == out.choices[0].text
    assert single.usage.completion_tokens == len(greedy_reference(tokenizer.encode(PROMPTS[0]), 10))


def test_openai_client_chat_and_streaming(client, tokenizer, greedy_reference):
    chat = client.chat.completions.create(model="epserve-tiny", messages=CHAT, max_tokens=16, temperature=0)
    expected = tokenizer.decode(greedy_reference(tokenizer.encode_chat(CHAT), 16))
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == expected
    stream = client.chat.completions.create(model="epserve-tiny", messages=CHAT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    texts = ["", ""]
    for c in client.completions.create(model="epserve-tiny", prompt=PROMPTS[:2], max_tokens=8, temperature=0,
                                       stream=True):
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [tokenizer.decode(greedy_reference(tokenizer.encode(p), 8)) for p in PROMPTS[:2]]


def test_openai_client_sees_errors(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="x")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="epserve-tiny", prompt="x", max_tokens=0)
    assert info.value.param == "max_tokens"


# ---------------------------------------------------------------- queue full, engine down

@pytest.fixture()
def fresh_engine():
    eng = make_engine()
    yield eng
    eng.shutdown()


def test_queue_full_is_503_with_retry_after_and_a_batch_larger_than_the_queue_is_400():
    """max_running_seqs=1, max_waiting=2. A runs (its first chunk came), B waits: of a 2-prompt batch the first
    fills the queue and the second finds it full, so the batch is refused whole (503, Retry-After) and its first
    prompt is cancelled. A 3-prompt batch could never be queued whole: 400 naming ``prompt`` and the limit."""
    eng = make_engine(max_running_seqs=1, max_waiting=2, retry_after_s=3)
    assert eng.max_waiting == 2
    srv = LiveServer(eng, ServerConfig(model_dir=MODEL_DIR))
    one = {**LONG_BODY, "stream": True}
    try:
        with srv.client() as c:
            with c.stream("POST", "/v1/completions", json={**one, "prompt": PROMPTS[0]}) as a:
                lines = a.iter_lines()   # kept: a dropped iterator closes the connection, which cancels A
                assert next(lines).startswith("data: ")
                with c.stream("POST", "/v1/completions", json={**one, "prompt": PROMPTS[1]}) as b:
                    assert b.status_code == 200 and (eng.snapshot().running, eng.snapshot().waiting) == (1, 1)
                    r = c.post("/v1/completions", json={**LONG_BODY, "prompt": PROMPTS[2:4]})
                    assert r.status_code == 503 and r.headers["retry-after"] == "3"
                    err = r.json()["error"]
                    assert err["code"] == "queue_full" and "queue is full (2 requests)" in err["message"]
                    wait_for(lambda: eng.snapshot().waiting == 1, "the batch's queued prompt to be cancelled")
                    r = c.post("/v1/completions", json={**LONG_BODY, "prompt": PROMPTS[:3]})
                    assert r.status_code == 400, r.text
                    err = r.json()["error"]
                    assert (err["param"], err["code"]) == ("prompt", "too_many_prompts")
                    assert "batch of 3 prompts" in err["message"] and "at most 2" in err["message"]
            wait_for(lambda: idle(eng), "the streams' requests to be cancelled")
            r = c.post("/v1/completions", json={"model": "default_model", "prompt": PROMPTS[:2], "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 2
    finally:
        srv.stop()
        eng.shutdown()


def test_request_larger_than_the_kv_cache_is_400_naming_the_field():
    eng = make_engine(kv_cache_tokens=128)
    srv = LiveServer(eng, ServerConfig(model_dir=MODEL_DIR))
    try:
        with srv.client() as c:
            r = c.post("/v1/completions", json={"model": "default_model", "prompt": "x", "max_tokens": 300})
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
            assert "KV cache of a rank (128 tokens" in r.json()["error"]["message"]
            r = c.post("/v1/chat/completions", json={"model": "default_model", "messages": CHAT,
                                                     "max_completion_tokens": 300})
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
            r = c.post("/v1/completions", json={"model": "default_model", "prompt": [[5] * 200]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[0]"   # a batch of one
            r = c.post("/v1/completions", json={"model": "default_model", "prompt": [[5], [5] * 200]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[1]"
            r = c.post("/v1/completions", json={"model": "default_model", "prompt": [5] * 200})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            assert c.post("/v1/completions", json={"model": "default_model", "prompt": "x",
                                                   "max_tokens": 100}).status_code == 200
    finally:
        srv.stop()
        eng.shutdown()


def test_engine_going_down_ends_streams_with_an_error_and_503s(fresh_engine):
    srv = LiveServer(fresh_engine, ServerConfig(model_dir=MODEL_DIR))
    try:
        with srv.client() as c:
            with c.stream("POST", "/v1/completions", json={**LONG_BODY, "stream": True}) as r:
                lines = (x for x in r.iter_lines() if x)
                next(lines)
                closer = threading.Thread(target=fresh_engine.shutdown)
                closer.start()
                rest = list(lines)
                closer.join(30)
            assert rest[-1] == "data: [DONE]"
            error = json.loads(rest[-2][len("data: "):])["error"]
            assert error["code"] == "engine_unavailable" and "shutting down" in error["message"]
            h = c.get("/health")
            assert h.status_code == 503 and h.json() == {"status": "unavailable", "reason": "shutting down"}
            r = c.post("/v1/completions", json={"model": "default_model", "prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
            assert c.get("/metrics").status_code == 200
    finally:
        srv.stop()


def test_engine_down_during_non_stream_request_is_503(fresh_engine):
    srv = LiveServer(fresh_engine, ServerConfig(model_dir=MODEL_DIR))
    try:
        with httpx.Client(base_url=srv.base, timeout=60) as c:
            result = {}
            t = threading.Thread(target=lambda: result.setdefault("r", c.post("/v1/completions", json=LONG_BODY)))
            t.start()
            wait_for(lambda: fresh_engine.snapshot().generation_tokens > 0, "the requests to generate")
            fresh_engine.shutdown()
            t.join(30)
        r = result["r"]
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    finally:
        srv.stop()
