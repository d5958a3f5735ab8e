"""The OpenAPI document's models: what each endpoint answers (pydantic), and the request bodies the handlers
parse themselves (protocol.py), declared with ``openapi_extra`` so that the handlers keep OpenAI's error shape.

    protocol.CompletionRequest / ChatCompletionRequest --request_body()--> requestBody (refs inlined)
    CompletionResponse, ChatCompletionResponse, ModelList, Health*, PlacementView, ... --responses()--> responses

These models describe the responses; the handlers build them as plain dicts (protocol.py, app.py, streaming.py)
and tests/unit/test_openapi.py checks that real responses validate against them.
"""

from __future__ import annotations

import copy
import importlib.metadata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- errors

class ErrorDetail(_Out):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error or server_error")
    param: str | None = Field(description="the request field at fault, e.g. 'temperature' or 'messages[1].role'")
    code: str | None


class ErrorResponse(_Out):
    """Every refusal and failure, in OpenAI's shape."""

    error: ErrorDetail


# ---------------------------------------------------------------- generation

FinishReason = Literal["stop", "length"]


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None = Field(description="null only in stream chunks before the last")


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class CompletionChunk(_Out):
    """One ``data:`` line of a /v1/completions stream (the last is ``data: [DONE]``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, description="present with stream_options.include_usage: null in every "
                                                   "chunk but the last, which has no choices")


class ChatCompletionChunk(_Out):
    """One ``data:`` line of a /v1/chat/completions stream (the last is ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- models, health

class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int = Field(description="prompt + generated tokens of one sequence (vLLM's extension)")


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class HealthOk(_Out):
    status: Literal["ok"]


class HealthUnavailable(_Out):
    status: Literal["unavailable"]
    reason: str


# ---------------------------------------------------------------- placement

class LayerTrafficView(_Out):
    moe_layer: int
    lar: float
    imbalance: float
    transfers_per_token_layer: float
    a2a_calls: int
    a2a_bytes: int
    kv_bytes: int
    cross_node_bytes: int
    transfers: int
    activations: int
    local_activations: int
    expert_load: list[int]


class ReplacementStatus(_Out):
    version: int
    changed_at: float
    swaps: int
    state: Literal["idle", "solving", "swapping"]
    swap: dict[str, Any] | None = Field(description="the running swap")
    last_swap: dict[str, Any] | None
    last_solve: dict[str, Any] | None
    every_tokens: int
    live_window: bool


class PlacementView(_Out):
    strategy: str
    world_size: int
    version: int
    changed_at: float
    replacement: ReplacementStatus
    placement: dict[str, Any] = Field(description="the placement document in use (docs/architecture.md)")
    layers: list[LayerTrafficView]
    gpu_load: list[list[int]]


class PlacementAccepted(_Out):
    status: Literal["solving", "swapping"]
    version: int = Field(description="'swapping': the version the posted placement will have; 'solving': the "
                                     "version running now")


class ClusterDoc(BaseModel):
    model_config = ConfigDict(extra="allow")
    nodes: int
    gpus_per_node: int


class PlacementDocument(BaseModel):
    """A placement document (version 2: ``expert_to_gpus``; version 1: ``expert_to_gpu``)."""

    model_config = ConfigDict(extra="allow")
    version: Literal[1, 2]
    num_layers: int
    num_experts: int
    cluster: ClusterDoc
    slots_per_gpu: int | None = None
    expert_to_gpus: list[list[list[int]]] | None = Field(None, description="version 2: GPU ids per expert per "
                                                                           "layer")
    expert_to_gpu: list[list[int]] | None = Field(None, description="version 1: one GPU id per expert per layer")
    solver: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None
    trace: dict[str, Any] | None = None


class SolveRequest(_Out):
    solve: Literal[True]


# ---------------------------------------------------------------- OpenAPI pieces

def inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with every ``$ref`` to its ``$defs`` replaced by the definition (no model here is
    recursive), so that it can sit in an operation's requestBody."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return resolve(copy.deepcopy(defs[ref.rsplit("/", 1)[1]])) | resolve(rest)
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def request_body(schema: dict, example: dict | None = None) -> dict:
    """An ``openapi_extra`` holding a required JSON requestBody."""
    media: dict = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": media}}}


_ERROR_WHEN = {
    400: "The request is invalid; ``param`` names the field",
    401: "Missing or invalid API key",
    403: "The server has no API key, which this endpoint needs",
    404: "No such model",
    408: "The request body did not arrive in time",
    409: "A placement swap or solve is running, or the server records no live routing",
    413: "The request body is larger than the limit",
    500: "The engine failed",
    503: "The engine is unavailable or its queue is full (then with Retry-After)",
}


def error_responses(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": _ERROR_WHEN[s]} for s in statuses}


def generation_responses(model: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """200 (JSON, or with ``stream: true`` Server-Sent Events of ``chunk``) and every error status."""
    return {200: {"model": model, "description": f"The {model.__name__}; with \"stream\": true, Server-Sent "
                                                 f"Events, each 'data: ' line a {chunk.__name__} and the last "
                                                 "'data: [DONE]'",
                  "content": {"text/event-stream": {"schema": sse_event(chunk)}}},
            **error_responses(400, 401, 404, 408, 413, 500, 503)}


def sse_event(chunk: type[BaseModel]) -> dict:
    """One Server-Sent Event of a stream (OpenAPI 3.1: the ``schema`` of text/event-stream is one event): its
    ``data`` a ``chunk`` in JSON, an error body in JSON (the engine failed mid-stream), or the last, [DONE]."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"type": "string", "if": {"const": "[DONE]"}, "then": True,
                                    "else": {"contentMediaType": "application/json", "contentSchema": payload}},
                           "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


STREAM_CHUNKS = (CompletionChunk, ChatCompletionChunk)   # in components: the stream events refer to them
BEARER = {"components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
SECURED = {"security": [{"bearer": []}]}

DESCRIPTION = ("OpenAI-compatible completions and chat completions served by an expert-parallel MoE engine, "
               "plus health, Prometheus metrics and live re-placement. Send 'Authorization: Bearer <key>' when "
               "the server was started with an API key.")
COMPLETION_EXAMPLE = {"model": "default_model", "prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0}
CHAT_EXAMPLE = {"model": "default_model", "messages": [{"role": "user", "content": "sort a list"}],
                "max_tokens": 8}


def version() -> str:
    try:
        return importlib.metadata.version("epserve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def complete_openapi(app) -> None:
    """The document FastAPI builds, plus the bearer security scheme the secured operations name and the stream
    chunk models the text/event-stream schemas refer to."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {})
            components.update(BEARER["components"])
            _, top = models_json_schema([(m, "serialization") for m in STREAM_CHUNKS],
                                        ref_template="#/components/schemas/{model}")
            for name, definition in top.get("$defs", {}).items():
                components.setdefault("schemas", {}).setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
