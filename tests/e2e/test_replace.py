"""Live re-placement through the real ``epserve serve`` under torchrun: a placement POSTed while a batch is being
decoded is swapped in (expert weights moving between ranks, one MoE layer per step) and the batch still
returns the one-process model's tokens; then a placement solved from the live routing window (POST
{"solve": true}) is swapped in or kept as the solve reports, and serving stays lossless. GET /placement and
/metrics show the version and the swap."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import PROMPTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "replace-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 80

CONFIGS = [(2, "two_a2a", "a2a"), (4, "coherent", "fixed")]


@pytest.fixture(scope="module")
def ignore_eos_reference(tokenizer):
    from epserve.model.loader import load_model
    from tests.e2e.conftest import DEFAULT
    model, _ = load_model(DEFAULT)
    return model.greedy_reference([tokenizer.encode(p) for p in PROMPTS], MAX_TOKENS, eos_token_ids=())


def _permuted(doc: dict, seed: int) -> dict:
    """The placement document with each layer's experts shuffled over the GPUs (same slots per GPU)."""
    g = np.random.default_rng(seed)
    rows = [[gpus for gpus in np.array(layer, dtype=object)[g.permutation(len(layer))].tolist()]
            for layer in doc["expert_to_gpus"]]
    return {**doc, "expert_to_gpus": rows, "solver": {"name": "permuted", "seed": seed}}


def _metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"/metrics has no {name}")


def _batch(url: str) -> tuple[list[str], float]:
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=180,
                   json={"model": "default_model", "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    return [ch["text"] for ch in r.json()["choices"]], time.time()


@pytest.mark.parametrize("ranks, strategy, transport", CONFIGS, ids=[f"{g}x{s}+{t}" for g, s, t in CONFIGS])
def test_swap_while_decoding_keeps_every_token(ranks, strategy, transport, serve, tokenizer, ignore_eos_reference):
    server = serve(["--nproc-per-node", str(ranks), "--strategy", strategy, "--transport", transport,
                    "--replace-window", "1024", "--replace-time-limit", "3"], env={"EPSERVE_API_KEY": KEY})
    want = [tokenizer.decode(ids) for ids in ignore_eos_reference]
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c, ThreadPoolExecutor(1) as pool:
        start = c.get("/placement").json()
        assert start["version"] == 1 and _metric(c, "epserve_placement_version") == 1.0
        running = pool.submit(_batch, server.url)
        deadline = time.monotonic() + 60
        while _metric(c, "epserve_engine_generation_tokens_total") < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.post("/placement", json=_permuted(start["placement"], seed=ranks))
        assert r.status_code == 202 and r.json()["version"] == 2, r.text
        texts, finished = running.result(timeout=180)
        assert texts == want, "a request in flight during the swap changed its tokens"
        doc = c.get("/placement").json()
        assert doc["version"] == 2 and doc["replacement"]["state"] == "idle", doc["replacement"]
        swap = doc["replacement"]["last_swap"]
        assert swap["finished_at"] < finished and swap["layers"] >= 1 and swap["moved_bytes"] > 0, swap
        assert doc["placement"]["solver"]["name"] == "permuted"
        assert _metric(c, "epserve_placement_version") == 2.0 and _metric(c, "epserve_placement_swaps_total") == 1

        r = c.post("/placement", json={"solve": True})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while (state := c.get("/placement").json()["replacement"])["state"] != "idle" and time.monotonic() < deadline:
            time.sleep(0.2)
        solve = state["last_solve"]
        assert solve is not None and solve["window_tokens"] >= len(PROMPTS) * MAX_TOKENS // 2, state
        assert state["version"] == 2 + solve["swapped"], state
        texts, _ = _batch(server.url)
        assert texts == want, "tokens changed after the solved placement"
    code = server.stop(timeout_s=40)
    assert code == 0, server.log()[-3000:]
