"""The OpenAPI document (/openapi.json, /docs) against the REAL engine at world size 1: every route is in it,
with its statuses, and real responses validate against the schemas it declares; HEAD on the GET endpoints."""

from __future__ import annotations

import json

import jsonschema
import pytest

from epserve.server import ServerConfig
from tests.unit._live_server import CHAT, MODEL_DIR, LiveServer, make_engine, sse_events

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

KEY = "unit-openapi-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROUTES = {"/v1/completions": {"post"}, "/v1/chat/completions": {"post"}, "/v1/models": {"get"},
          "/health": {"get"}, "/metrics": {"get"}, "/placement": {"get", "post"}}


@pytest.fixture(scope="module")
def live():
    engine = make_engine()
    srv = LiveServer(engine, ServerConfig(model_dir=MODEL_DIR, api_key=KEY))
    yield srv
    srv.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def doc(live):
    with live.client() as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    return r.json()


def validate(doc: dict, schema: dict, instance) -> None:
    """``instance`` against ``schema``, whose ``#/components/...`` refs resolve in ``doc``."""
    jsonschema.validate(instance, {**schema, "components": doc["components"]},
                        cls=jsonschema.Draft202012Validator)


def response_schema(doc: dict, path: str, method: str, status: int, media: str = "application/json") -> dict:
    return doc["paths"][path][method]["responses"][str(status)]["content"][media]["schema"]


def test_every_route_and_status_is_declared(doc):
    assert doc["openapi"].startswith("3.")
    assert {p: set(ops) for p, ops in doc["paths"].items()} == ROUTES
    statuses = {(p, m): set(op["responses"]) for p, ops in doc["paths"].items() for m, op in ops.items()}
    gen = {"200", "400", "401", "404", "408", "413", "500", "503"}
    assert statuses[("/v1/completions", "post")] == gen
    assert statuses[("/v1/chat/completions", "post")] == gen
    assert statuses[("/placement", "post")] == {"202", "400", "401", "403", "408", "409", "413", "503"}
    assert statuses[("/health", "get")] == {"200", "503"}
    assert set(doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]) == \
        {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" not in json.dumps(body)     # inlined: nothing to resolve
    assert {"model", "prompt"} <= set(body["required"]) and "temperature" in body["properties"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for status in ("400", "401", "404"):
        assert doc["paths"]["/v1/completions"]["post"]["responses"][status]["content"]["application/json"][
            "schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def test_docs_page(live):
    with live.client() as c:
        r = c.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower() and "/openapi.json" in r.text


def test_real_responses_validate_against_the_declared_schemas(live, doc):
    with live.client(headers=AUTH) as c:
        r = c.post("/v1/completions", json={"model": "default_model", "prompt": ["def ", "x = "], "max_tokens": 3,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        validate(doc, response_schema(doc, "/v1/completions", "post", 200), r.json())
        r = c.post("/v1/chat/completions", json={"model": "default_model", "messages": CHAT, "max_tokens": 3})
        assert r.status_code == 200, r.text
        validate(doc, response_schema(doc, "/v1/chat/completions", "post", 200), r.json())
        for path, method in (("/v1/models", "get"), ("/health", "get"), ("/placement", "get")):
            r = c.get(path)
            assert r.status_code == 200, r.text
            validate(doc, response_schema(doc, path, method, 200), r.json())
        r = c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404
        validate(doc, response_schema(doc, "/v1/completions", "post", 404), r.json())
        r = c.post("/placement", json={"solve": 1})
        assert r.status_code == 400
        validate(doc, response_schema(doc, "/placement", "post", 400), r.json())
        with c.stream("POST", "/v1/chat/completions", json={"model": "default_model", "messages": CHAT,
                                                            "max_tokens": 3, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
    assert events[-1] == "[DONE]"
    event = response_schema(doc, "/v1/chat/completions", "post", 200, "text/event-stream")
    validate(doc, event, {"data": "[DONE]", "event": "message"})
    ref = event["properties"]["data"]["else"]["contentSchema"]["anyOf"][0]
    assert ref == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    for e in events[:-1]:
        validate(doc, ref, e)


@pytest.mark.parametrize("path", ["/health", "/metrics", "/placement", "/v1/models"])
def test_head_answers_as_get_without_a_body(live, path):
    with live.client(headers=AUTH) as c:
        get, head = c.get(path), c.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_head_needs_the_key_where_get_does(live):
    with live.client() as c:
        assert c.get("/v1/models").status_code == c.head("/v1/models").status_code == 401
        assert c.head("/v1/models").content == b""


def test_non_finite_numbers_are_refused_naming_the_field(live):
    raw = '{"model": "default_model", "prompt": "x", "top_p": NaN}'
    with live.client(headers=AUTH | {"Content-Type": "application/json"}) as c:
        r = c.post("/v1/completions", content=raw)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "top_p" and "finite number" in err["message"]
