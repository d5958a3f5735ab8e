"""A client that sends its body slowly or never finishes it holds only its own connection: the engine keeps
stepping and other requests are answered meanwhile; the slow one gets a 408 once ``body_timeout_s`` has passed."""

from __future__ import annotations

import socket
import time

import pytest

from epserve.server import ServerConfig
from tests.unit._live_server import MODEL_DIR, LiveServer, make_engine

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_a_stalled_body_gets_408_while_others_are_served():
    engine = make_engine()
    srv = LiveServer(engine, ServerConfig(model_dir=MODEL_DIR, body_timeout_s=1.5))
    try:
        host, port = srv.base.removeprefix("http://").split(":")
        stalled = socket.create_connection((host, int(port)), timeout=10)
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 200\r\n\r\n{\"model\": \"default_model\",")   # 26 of 200 bytes, then nothing
        started = time.monotonic()
        steps_before = engine.snapshot().steps
        with srv.client() as c:
            r = c.post("/v1/completions", json={"model": "default_model", "prompt": "def ", "max_tokens": 8,
                                                "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert engine.snapshot().steps > steps_before            # the engine stepped while the body stalled
        assert time.monotonic() - started < 1.5                  # ... and did not wait for it
        reply = stalled.recv(4096).decode()
        waited = time.monotonic() - started
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert '"code":"request_timeout"' in reply.replace(" ", "")
        assert 1.4 < waited < 5.0, waited
        stalled.close()
    finally:
        srv.stop()
        engine.shutdown()
