"""The server against the REAL engine at world size 1 (EPTopology.single(), the bundled default model), served by
uvicorn on a free loopback port in a thread. Tokens are checked against ``MoEModel.greedy_reference``."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from comm.strategy import Strategy
from comm.topology import EPTopology
from epserve.engine.builder import build_runner
from epserve.engine.engine import EngineConfig, start_engine
from epserve.model.loader import load_model
from epserve.server import ServerConfig, create_app
from epserve.server.text import Tokenizer
from tests.conftest import REPO_ROOT

MODEL_DIR = REPO_ROOT / "epserve" / "assets" / "default_model"
PROMPTS = ["def ", "import os\n", "class Stack:\n    def push(self, x):", "for i in range(10):"]
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sort a list"}]


class LiveServer:
    """uvicorn serving create_app(engine, config) on 127.0.0.1:<free port>, in a daemon thread."""

    def __init__(self, engine, config: ServerConfig) -> None:
        self.engine = engine
        self.app = create_app(engine, config)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "uvicorn to start")

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_for(cond, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def make_engine(**overrides):
    runner = build_runner(MODEL_DIR, EPTopology.single(), strategy=Strategy.TWO_A2A, kv_cache_tokens=4096)
    return start_engine(runner, EngineConfig.from_model_dir(MODEL_DIR, stats_min_interval_s=0.0, **overrides))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def reference(engine):
    """greedy_reference(prompt ids, n, eos ids), memoised."""
    model, _ = load_model(MODEL_DIR)
    cache = {}

    def ref(ids, max_new: int, eos=True) -> list[int]:
        key = (tuple(ids), max_new, eos)
        if key not in cache:
            cache[key] = model.greedy_reference([list(ids)], max_new,
                                                eos_token_ids=engine.eos_token_ids if eos else ())[0]
        return cache[key]

    return ref


def finish_of(ref_ids, max_new, eos_ids) -> str:
    return "stop" if ref_ids and ref_ids[-1] in eos_ids and len(ref_ids) <= max_new else "length"


def sse_events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---------------------------------------------------------------- generation equals the reference

def test_completions_batch_equals_greedy_reference(live, tok, reference, engine):
    with live.client() as c:
        r = c.post("/v1/completions", json={"model": engine.model_name, "prompt": PROMPTS, "max_tokens": 12,
                                            "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "default_model"
    assert [ch["index"] for ch in body["choices"]] == list(range(len(PROMPTS)))
    total = 0
    for prompt, choice in zip(PROMPTS, body["choices"]):
        ref = reference(tok.encode(prompt), 12)
        total += len(ref)
        assert choice["text"] == tok.decode(ref)
        assert choice["finish_reason"] == finish_of(ref, 12, engine.eos_token_ids)
    assert body["usage"] == {"prompt_tokens": sum(len(tok.encode(p)) for p in PROMPTS),
                             "completion_tokens": total, "total_tokens": body["usage"]["prompt_tokens"] + total}
    # the shipped model's pinned greedy continuation of "def " (tests/unit/test_default_model.py)
    assert body["choices"][0]["text"][:10] == " #  #  #  "


def test_token_id_prompts_and_ignore_eos(live, tok, reference, engine):
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    with live.client() as c:
        r = c.post("/v1/completions", json={"model": "default_model", "prompt": ids, "max_tokens": 40,
                                            "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    for p, choice in zip(ids, r.json()["choices"]):
        assert choice["text"] == tok.decode(reference(p, 40, eos=False))
        assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 80


def test_chat_completion_equals_reference(live, tok, reference):
    with live.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "default_model", "messages": CHAT,
                                                 "max_completion_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = reference(tok.encode_chat(CHAT), 24)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": tok.decode(ref)}
    assert body["usage"]["prompt_tokens"] == len(tok.encode_chat(CHAT))
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


def test_stop_string_cuts_the_text_and_cancels(live, tok, reference, engine):
    full = tok.decode(reference(tok.encode("def "), 16))   # " #  #  #  0x1,     #  0x00"
    cut = full.index("0x")
    body = {"model": "default_model", "prompt": "def ", "max_tokens": 16, "temperature": 0, "stop": ["0x", "zz"]}
    with live.client() as c:
        r = c.post("/v1/completions", json=body)
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            events = sse_events(s)
    choice = r.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (full[:cut], "stop")
    assert r.json()["usage"]["completion_tokens"] < 16
    assert "".join(ev["choices"][0]["text"] for ev in events[:-1]) == full[:cut]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    wait_for(lambda: engine.snapshot().running == 0, "the stopped request to leave the batch")


def test_concurrent_clients_all_answered(live, tok, reference):
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
        assert r.json()["choices"][0]["text"] == tok.decode(reference(tok.encode(prompt), 8))
