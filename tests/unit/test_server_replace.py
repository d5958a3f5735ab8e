"""POST /placement on a live server (the real engine at world size 1, the bundled default model): who may swap
a placement in, what is refused (each with a 4xx that names the field, the running placement untouched), and
that an accepted swap bumps the version in GET /placement and /metrics. The multi-rank swap itself (weights
moving, tokens unchanged) is tests/dist/test_replace_live.py and tests/e2e/test_serve.py's."""

from __future__ import annotations

import copy

import pytest

from epserve.engine.replace_control import ReplaceConfig
from epserve.server import ServerConfig
from placement.pipeline import RefitOptions
from tests.unit._live_server import LONG_BODY, MODEL_DIR, LiveServer, make_engine, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine():
    eng = make_engine(window_tokens=256,
                      replace=ReplaceConfig(min_window_tokens=8, refit=RefitOptions(time_limit=1.0)))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def live(engine):
    srv = LiveServer(engine, ServerConfig(model_dir=MODEL_DIR, api_key=KEY))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def open_live():
    """A server without an API key: POST /placement is refused outright."""
    eng = make_engine()
    srv = LiveServer(eng, ServerConfig(model_dir=MODEL_DIR))
    yield srv
    srv.stop()
    eng.shutdown()


def _doc(live) -> dict:
    with live.client(headers=AUTH) as c:
        return c.get("/placement").json()


def _version(live) -> int:
    return _doc(live)["version"]


def test_post_needs_a_configured_key(open_live):
    with open_live.client() as c:
        r = c.post("/placement", json={"solve": True})
        assert r.status_code == 403 and r.json()["error"]["code"] == "api_key_required"
        assert c.get("/placement").json()["version"] == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_post_without_the_key_is_401(live, headers):
    before = _doc(live)
    with live.client(headers=headers) as c:
        r = c.post("/placement", json=before["placement"])
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _doc(live)["placement"] == before["placement"]


def _bad_docs(doc: dict):
    """(name, document, expected param): each must be refused with a 400 naming the field."""
    v2 = {k: v for k, v in doc.items() if k != "expert_to_gpu"}
    v2.update(version=2, slots_per_gpu=16, expert_to_gpus=[[[0] for _ in row] for row in doc["expert_to_gpus"]])
    yield "other model (experts)", {**v2, "num_experts": 8,
                                    "expert_to_gpus": [row[:8] for row in v2["expert_to_gpus"]], "slots_per_gpu": 8}, \
        "num_experts"
    yield "other model (layers)", {**v2, "num_layers": 2, "expert_to_gpus": v2["expert_to_gpus"][:2]}, "num_layers"
    yield "other cluster", {**v2, "cluster": {"nodes": 1, "gpus_per_node": 2}, "slots_per_gpu": 8,
                            "expert_to_gpus": [[[e // 8] for e in range(16)] for _ in v2["expert_to_gpus"]]}, \
        "cluster.gpus_per_node"
    no_copy = copy.deepcopy(v2)
    no_copy["expert_to_gpus"][1][3] = []
    yield "expert without a copy", no_copy, "expert_to_gpus"
    twice = copy.deepcopy(v2)
    twice["expert_to_gpus"][0][0] = [0, 0]
    yield "duplicate copy on one GPU", twice, "expert_to_gpus"
    outside = copy.deepcopy(v2)
    outside["expert_to_gpus"][2][5] = [0, 3]
    yield "replica on a GPU outside the cluster", outside, "expert_to_gpus"
    yield "slots over the count", {**v2, "slots_per_gpu": 17}, "slots_per_gpu"
    yield "unknown version", {**v2, "version": 7}, "version"
    yield "missing table", {k: v for k, v in v2.items() if k != "expert_to_gpus"}, "expert_to_gpus"


def test_bad_placements_are_400_naming_the_field(live):
    before = _doc(live)
    current = before["placement"]
    with live.client(headers=AUTH) as c:
        for name, doc, param in _bad_docs(current):
            r = c.post("/placement", json=doc)
            assert r.status_code == 400, (name, r.text)
            err = r.json()["error"]
            assert err["param"] == param, (name, err)
            assert err["message"].startswith("placement: "), (name, err)
        r = c.post("/placement", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = c.post("/placement", json={"solve": "yes"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "solve"
    after = _doc(live)
    assert after["placement"] == current and after["version"] == before["version"]


def test_accepted_swap_bumps_the_version_in_placement_and_metrics(live):
    before = _doc(live)
    with live.client(headers=AUTH) as c:
        r = c.post("/placement", json=before["placement"])
        assert r.status_code == 202, r.text
        assert r.json() == {"status": "swapping", "version": before["version"] + 1}
        wait_for(lambda: _version(live) == before["version"] + 1, "the swap to finish")
        doc = c.get("/placement").json()
        assert doc["replacement"]["state"] == "idle" and doc["replacement"]["swaps"] >= 1
        assert doc["changed_at"] > before["changed_at"]
        assert doc["replacement"]["last_swap"]["source"] == "POST /placement"
        metrics = c.get("/metrics").text
    assert f"epserve_placement_version {float(before['version'] + 1)}" in metrics
    assert "epserve_placement_swaps_total" in metrics


def test_solve_from_live_routing_runs_in_the_background_and_refuses_a_second_request(live):
    with live.client(headers=AUTH) as c:
        assert c.post("/v1/completions", json={**LONG_BODY, "prompt": "def f(x):", "max_tokens": 24}).status_code == 200
        version = _version(live)
        r = c.post("/placement", json={"solve": True})
        assert r.status_code == 202 and r.json()["status"] == "solving"
        busy = c.post("/placement", json={"solve": True})   # the solve takes seconds (a spawned process)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "placement_busy"
        solved = wait_for(lambda: (d := c.get("/placement").json())["replacement"]["state"] == "idle"
                          and d["replacement"]["last_solve"], "the background solve", timeout_s=90)
    assert solved["window_tokens"] >= 24
    # one GPU: every placement is the same, so nothing pays and nothing is swapped
    assert solved["swapped"] is False and "min_gain" in solved["reason"]
    assert _version(live) == version


def test_replace_every_solves_from_live_routing_without_a_request():
    eng = make_engine(window_tokens=64, replace=ReplaceConfig(every_tokens=16, min_window_tokens=8,
                                                             refit=RefitOptions(time_limit=0.5)))
    srv = LiveServer(eng, ServerConfig(model_dir=MODEL_DIR, api_key=KEY))
    try:
        with srv.client(headers=AUTH) as c:
            assert c.get("/placement").json()["replacement"]["every_tokens"] == 16
            assert c.post("/v1/completions", json={**LONG_BODY, "prompt": "x = ", "max_tokens": 40}).status_code == 200
            solve = wait_for(lambda: c.get("/placement").json()["replacement"]["last_solve"], "an automatic solve",
                             timeout_s=90)
        assert solve["window_tokens"] >= 16 and solve["swapped"] is False   # one GPU: nothing to gain
    finally:
        srv.stop()
        eng.shutdown()
