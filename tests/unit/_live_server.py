"""Helpers for the server tests against the REAL engine at world size 1 (EPTopology.single(), the bundled default
model), served by uvicorn on a free loopback port in a thread. Fixtures live in tests/conftest.py."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import uvicorn

from comm.strategy import Strategy
from comm.topology import EPTopology
from epserve.engine.builder import build_runner
from epserve.engine.engine import EngineConfig, start_engine
from epserve.server import ServerConfig, create_app
from tests.conftest import DEFAULT_MODEL_DIR as MODEL_DIR

PROMPTS = ["def ", "import os\n", "class Stack:\n    def push(self, x):", "for i in range(10):"]
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sort a list"}]
# Long enough (4 x 490 tokens, at least 490 engine steps) that the engine is still at it when the test acts.
LONG_BODY = {"model": "default_model", "prompt": PROMPTS, "max_tokens": 490, "temperature": 0, "ignore_eos": True}
LONG_TOKENS = 4 * 490


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


def make_engine(*, kv_cache_tokens: int = 4096, window_tokens: int = 0, **overrides):
    runner = build_runner(MODEL_DIR, EPTopology.single(), strategy=Strategy.TWO_A2A, kv_cache_tokens=kv_cache_tokens,
                          window_tokens=window_tokens)
    return start_engine(runner, EngineConfig.from_model_dir(MODEL_DIR, stats_min_interval_s=0.0, **overrides))


def idle(engine) -> bool:
    s = engine.snapshot()
    return s.running == 0 and s.waiting == 0 and s.kv_used_tokens == 0


def sse_events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
