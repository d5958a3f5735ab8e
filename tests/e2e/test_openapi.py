"""The OpenAPI document fuzzed against the real ``epserve serve`` (2 ranks under torchrun, with an API key):
schemathesis generates requests from /openapi.json (valid and invalid bodies) for every operation, and every
response must be no 5xx, a declared status, a declared content type, and a body the declared schema accepts.

Generation requests are kept cheap (the schema allows any max_tokens and any batch): the model is the served one
in most cases, max_tokens at most 3 and a batch at most 3 prompts, so that the whole test takes about a minute
on 2 shared cores."""

from __future__ import annotations

import json

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "e2e-openapi-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_TOKENS, MAX_BATCH = 3, 3
# examples per operation and generation mode: generation requests cost an engine run each
EXAMPLES = {"POST /v1/completions": 300, "POST /v1/chat/completions": 300, "POST /placement": 100}
OTHER_EXAMPLES = 10


def tame(case, keep_model: bool):
    """A generated case made cheap to serve: the served model (unless ``keep_model``), few tokens, few prompts.
    Only bodies that are JSON objects are touched; what the fuzzer made otherwise goes as it is."""
    body = case.body
    if case.path in ("/v1/completions", "/v1/chat/completions") and isinstance(body, dict):
        if not keep_model or "model" not in body:
            body["model"] = "default_model"
        for field in ("max_tokens", "max_completion_tokens"):
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[field] = MAX_TOKENS
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > MAX_BATCH:
            body["prompt"] = body["prompt"][:MAX_BATCH]
    return case


def test_the_openapi_document_holds_for_everything_the_server_answers(serve):
    server = serve(["--nproc-per-node", "2", "--max-model-len", "256", "--replace-window", "0",
                    "--collective-timeout", "60"], env={"EPSERVE_API_KEY": KEY})
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    stats: dict[str, dict] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        strategies = [op.as_strategy(GenerationMode.POSITIVE)]
        if op.method.upper() == "POST":
            strategies.append(op.as_strategy(GenerationMode.NEGATIVE))
        seen = stats.setdefault(label, {"cases": 0, "statuses": {}})

        @settings(max_examples=EXAMPLES.get(label, OTHER_EXAMPLES), deadline=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                  database=None)
        @hypothesis.given(case=st.one_of(strategies), keep_model=st.integers(0, 4).map(lambda i: i == 0))
        def run(case, keep_model):
            case = tame(case, keep_model)
            response = case.call(headers=AUTH, timeout=60)
            seen["cases"] += 1
            seen["statuses"][response.status_code] = seen["statuses"].get(response.status_code, 0) + 1
            case.validate_response(response, checks=CHECKS)

        run()
    print("\nschemathesis:", json.dumps(stats, sort_keys=True))
    assert set(stats) == {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
                          "GET /metrics", "GET /placement", "POST /placement"}
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):   # the fuzzing reached generation
        assert stats[label]["statuses"].get(200, 0) > 0 and stats[label]["statuses"].get(400, 0) > 0, stats
    assert all(code < 500 for s in stats.values() for code in s["statuses"]), stats
    code = server.stop(timeout_s=40)
    assert code == 0, server.log()[-3000:]
