"""Every end of a serving group, through the real `epserve serve` under torchrun:
- a rank dies (kill -9) while requests are in flight: every request ends (an error or a closed connection) within
  a bound, /health stops saying ok, every process of the group is gone within 30 s, and the log names the rank
  that was lost in one line (not the survivor that noticed);
- rank 0 (the HTTP rank) is killed: every other rank exits within the collective timeout + 10 s, naming rank 0;
- SIGTERM to the launcher (what Kubernetes sends): new requests get 503 with Retry-After and /health 503 at once,
  the requests in flight finish with their normal ending and the one-process tokens, the group exits 0 with no
  traceback; with a drain timeout shorter than the work, the streams still open end with an error chunk."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import PROMPTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LONG = 480            # tokens asked per request: far more than can finish before the kill
REQUEST_BOUND_S = 30  # every in-flight request must end this soon after the kill
GROUP_BOUND_S = 30    # every process of the group must be gone this soon after the kill


class InFlight(threading.Thread):
    """One request; ``outcome`` ends as "completed" (a whole answer: wrong here), "error: ..." or "closed"."""

    def __init__(self, url: str, prompt: str, stream: bool) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.stream = url, prompt, stream
        self.started = threading.Event()   # a streamed chunk arrived (non-streaming: the request was sent)
        self.outcome: str | None = None

    def run(self) -> None:
        body = {"model": "default_model", "prompt": self.prompt, "max_tokens": LONG, "temperature": 0,
                "ignore_eos": True, "stream": self.stream}
        try:
            with httpx.Client(base_url=self.url, timeout=httpx.Timeout(90, connect=10)) as c:
                if self.stream:
                    self.outcome = self._stream(c, body)
                else:
                    self.started.set()
                    r = c.post("/v1/completions", json=body)
                    finish = r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else None
                    self.outcome = "completed" if finish == "length" else f"error: HTTP {r.status_code} {r.text[:200]}"
        except httpx.TimeoutException as exc:
            self.outcome = f"hung: {exc!r}"
        except httpx.HTTPError as exc:
            self.outcome = f"closed: {exc!r}"
        finally:
            self.started.set()

    def _stream(self, c: httpx.Client, body: dict) -> str:
        with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return f"error: HTTP {r.status_code}"
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                self.started.set()
                data = line[6:]
                if data == "[DONE]":
                    return "closed: [DONE] without a finish"
                event = json.loads(data)
                if "error" in event:
                    return f"error: {event['error']}"
                if event["choices"] and event["choices"][0]["finish_reason"] == "length":
                    return "completed"
                if event["choices"] and event["choices"][0]["finish_reason"] is not None:
                    return f"error: finish_reason {event['choices'][0]['finish_reason']}"
        return "closed: stream ended without a finish"


def test_killing_a_rank_ends_every_request_and_the_group(pipeline, serve):
    server = serve(["--nproc-per-node", "4", "--strategy", "coherent", "--placement", str(pipeline[4]),
                    "--collective-timeout", "60"])
    ranks = server.rank_processes()
    assert sorted(ranks) == [0, 1, 2, 3]
    requests = [InFlight(server.url, PROMPTS[i], stream=bool(i % 2)) for i in range(6)]
    for r in requests:
        r.start()
    for r in requests:
        assert r.started.wait(60), "a request did not start within 60 s"
    time.sleep(0.5)                                   # non-streaming ones admitted too
    assert all(r.outcome is None for r in requests), [r.outcome for r in requests]

    ranks[2].kill()
    killed_at = time.monotonic()
    for r in requests:
        r.join(max(0.0, killed_at + REQUEST_BOUND_S - time.monotonic()))
    late = [r.prompt for r in requests if r.is_alive()]
    assert not late, f"requests still open {REQUEST_BOUND_S} s after the kill: {late}"
    outcomes = [r.outcome for r in requests]
    assert all(o.startswith(("error", "closed")) for o in outcomes), outcomes

    status = server.health_status()
    assert status in (503, None), f"/health answered {status} after a rank died"
    left = server.wait_all_gone(max(0.0, killed_at + GROUP_BOUND_S - time.monotonic()))
    assert not left, f"still alive {GROUP_BOUND_S} s after the kill: {[p.pid for p in left]}\n{server.log()[-4000:]}"
    assert server.proc.returncode != 0
    # one line names the lost rank: rank 0's engine failure (the reason requests got) and each survivor's exit
    assert "epserve worker: engine failed: rank 2 (node 0) stopped answering" in server.log(), server.log()[-4000:]
    assert "Traceback" not in server.log(), server.log()[-4000:]
    # torchrun's failure summary names the killed rank and its signal (the launcher's own "4 rank(s)" line
    # would satisfy a bare "rank" check, whatever happened)
    assert re.search(r"rank\s*:\s*2 \(local_rank: 2\)\s*\n\s*exitcode\s*:\s*-9", server.log()), server.log()[-4000:]


def test_killing_rank_0_ends_every_rank_naming_it(serve):
    server = serve(["--nproc-per-node", "4", "--strategy", "two_a2a", "--collective-timeout", "20"])
    ranks = server.rank_processes()
    request = InFlight(server.url, PROMPTS[0], stream=True)
    request.start()
    assert request.started.wait(60)
    ranks[0].kill()
    killed_at = time.monotonic()
    left = server.wait_all_gone(20 + 10)
    assert not left, f"still alive 30 s after rank 0 was killed: {[p.pid for p in left]}\n{server.log()[-3000:]}"
    log = server.log()
    for r in (1, 2, 3):
        assert f"epserve worker rank {r}: rank 0 (node 0) stopped answering; exiting" in log, log[-3000:]
    assert time.monotonic() - killed_at < 30
    request.join(10)
    assert not request.is_alive() and request.outcome.startswith(("error", "closed")), request.outcome


class Answer(threading.Thread):
    """One greedy request that should complete: its text, finish reason, and (streams) whether [DONE] came."""

    def __init__(self, url: str, prompt: str, stream: bool, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.stream, self.max_tokens = url, prompt, stream, max_tokens
        self.started = threading.Event()
        self.text, self.finish, self.done, self.error, self.status = "", None, False, None, None

    def run(self) -> None:
        body = {"model": "default_model", "prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": self.stream}
        try:
            with httpx.Client(base_url=self.url, timeout=httpx.Timeout(120, connect=10)) as c:
                if not self.stream:
                    self.started.set()
                    r = c.post("/v1/completions", json=body)
                    self.status = r.status_code
                    if r.status_code == 200:
                        self.text, self.finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
                    else:
                        self.error = r.text[:300]
                    return
                with c.stream("POST", "/v1/completions", json=body) as r:
                    self.status = r.status_code
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        self.started.set()
                        if line[6:] == "[DONE]":
                            self.done = True
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.error = event["error"]["message"]
                            continue
                        for ch in event["choices"]:
                            self.text += ch["text"]
                            self.finish = ch["finish_reason"] or self.finish
        except httpx.HTTPError as exc:
            self.error = f"closed: {exc!r}"
        finally:
            self.started.set()


def _ignore_eos_reference(prompts, max_tokens):
    from epserve.model.loader import load_model
    from epserve.server.text import Tokenizer
    from tests.e2e.conftest import DEFAULT
    model, _ = load_model(DEFAULT)
    tok = Tokenizer.from_dir(DEFAULT)
    ids = model.greedy_reference([tok.encode(p) for p in prompts], max_tokens, eos_token_ids=())
    return [tok.decode(x) for x in ids]


def _wait_status(fn, want: int, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        r = fn()
        if r.status_code == want or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_sigterm_drains_the_requests_in_flight_then_exits_0(serve):
    server = serve(["--nproc-per-node", "2", "--strategy", "two_a2a", "--drain-timeout", "60"])
    answers = [Answer(server.url, PROMPTS[i], stream=bool(i % 2), max_tokens=40) for i in range(4)]
    for a in answers:
        a.start()
    for a in answers:
        assert a.started.wait(60)
    time.sleep(0.5)                                   # the non-streaming ones admitted too
    os.kill(server.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        late = _wait_status(lambda: c.post("/v1/completions", json={"model": "default_model", "prompt": "x",
                                                                    "max_tokens": 4}), 503)
        assert late.status_code == 503 and late.headers.get("retry-after"), late.text
        assert "draining" in late.json()["error"]["message"]
        health = _wait_status(lambda: c.get("/health"), 503)
        assert health.status_code == 503 and "draining" in health.json()["reason"], health.text
    for a in answers:
        a.join(90)
    want = _ignore_eos_reference([a.prompt for a in answers], 40)
    for a, text in zip(answers, want):
        assert (a.status, a.error, a.finish) == (200, None, "length"), (a.prompt, a.status, a.error)
        assert a.text == text, a.prompt
        assert a.done or not a.stream, "a stream in flight did not end with [DONE]"
    assert server.wait_exit(60) == 0, server.log()[-3000:]
    assert not server.wait_all_gone(10)
    log = server.log()
    assert "Traceback" not in log and "SignalException" not in log, log[-3000:]
    assert "epserve worker: stopping (drained)" in log and "epserve serve: stopped" in log
    assert time.monotonic() - sent < 60


def test_sigterm_drain_timeout_ends_long_streams_with_an_error_chunk(serve):
    server = serve(["--nproc-per-node", "2", "--strategy", "two_a2a", "--drain-timeout", "1"])
    answers = [Answer(server.url, PROMPTS[i], stream=True, max_tokens=LONG) for i in range(2)]
    for a in answers:
        a.start()
    for a in answers:
        assert a.started.wait(60)
    os.kill(server.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    for a in answers:
        a.join(30)
        assert not a.is_alive()
        assert a.status == 200 and a.error and "shutting down" in a.error and a.finish is None, (a.error, a.finish)
    assert server.wait_exit(30) == 0, server.log()[-3000:]
    assert not server.wait_all_gone(10)
    assert "request(s) cut at the drain timeout" in server.log()
    assert "Traceback" not in server.log()
    assert time.monotonic() - sent < GROUP_BOUND_S
