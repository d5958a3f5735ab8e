"""OpenAI-compatible request and response bodies (pydantic v2), validated strictly.

    JSON body --parse_body (strict types, unknown fields refused)--> CompletionRequest / ChatCompletionRequest
              --check_unsupported (n, echo, logprobs, best_of, suffix, penalties)--> the app

Every refusal is an ``APIError`` (HTTP 400) whose ``param`` names the field at fault, e.g. ``"temperature"``
or ``"messages[1].role"``. Limits that need the tokenizer or the model (prompt length, max_tokens against the
context, token ids in the vocabulary) are checked by the app.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epserve.server.errors import APIError, bad_request

MAX_STOP_STRINGS = 4
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by both endpoints. None means "the server's default"."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)                       # extension (vLLM); 0: no cut
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    ignore_eos: bool = False                                    # extension (vLLM)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


PromptT = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptT
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None


# ---------------------------------------------------------------- parsing

_UNION_FIELDS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
}
R = TypeVar("R", bound=_SamplingFields)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or APIError(400)."""
    try:
        data = json.loads(raw)
        where = _non_finite(data) if isinstance(data, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object")
    if where is not None:   # Python's json reads NaN, Infinity, -Infinity and overflowing numbers (1e999)
        param, value = where
        raise bad_request(f"Invalid value for '{param}': must be a finite number, got {_JSON_NAMES[repr(value)]}",
                          param, "invalid_value")
    return data


_JSON_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _non_finite(value, path: str = "") -> tuple[str, float] | None:
    """(the field, the value) of the first non-finite number in a parsed body, named as errors name fields:
    ``temperature``, ``prompt[1][0]``, ``logit_bias.42``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found is not None:
            return found
    return None


def parse_body(raw: bytes, model_cls: type[R]) -> R:
    """The request, or APIError(400) naming the first field at fault."""
    data = parse_json(raw)
    try:
        req = model_cls.model_validate(data)
    except ValidationError as exc:
        raise _to_api_error(exc) from None
    check_unsupported(req)
    return req


def _to_api_error(exc: ValidationError) -> APIError:
    err = exc.errors()[0]
    param, union_msg = "", None
    for item in err["loc"]:
        if isinstance(item, int):
            param += f"[{item}]"
            continue
        param += f".{item}" if param else str(item)
        if item in _UNION_FIELDS:
            union_msg = _UNION_FIELDS[item]
            break
    if err["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if err["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param, "missing_required_parameter")
    if union_msg is not None:
        return bad_request(f"Invalid value for '{param}': {union_msg}", param, "invalid_type")
    return bad_request(f"Invalid value for '{param}': {err['msg']}", param, "invalid_value")


def check_unsupported(req: _SamplingFields) -> None:
    """Fields that parse but that this server does not implement (or only at their neutral value)."""
    if req.n not in (None, 1):
        raise bad_request(f"n={req.n} is not supported: this server returns exactly one choice per prompt "
                          "(send a list of prompts to get several)", "n", "unsupported_value")
    stops = req.stop_strings()
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise bad_request("stop: stop strings must not be empty", "stop")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported (only 0)", name, "unsupported_parameter")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    if isinstance(req, CompletionRequest):
        _check_completion_only(req)
    else:
        _check_chat_only(req)


def _check_completion_only(req: CompletionRequest) -> None:
    if req.echo:
        raise bad_request("echo is not supported", "echo", "unsupported_parameter")
    if req.logprobs is not None:
        raise bad_request("logprobs is not supported", "logprobs", "unsupported_parameter")
    if req.best_of not in (None, 1):
        raise bad_request("best_of is not supported (only 1)", "best_of", "unsupported_parameter")
    if req.suffix is not None:
        raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
    p = req.prompt
    if (isinstance(p, (str, list)) and len(p) == 0) or (isinstance(p, list) and any(len(x) == 0 for x in p
                                                                                      if not isinstance(x, int))):
        raise bad_request("prompt must not be empty (nor hold an empty prompt)", "prompt", "empty_prompt")


def _check_chat_only(req: ChatCompletionRequest) -> None:
    if not req.messages:
        raise bad_request("messages must hold at least one message", "messages")
    if req.logprobs or req.top_logprobs is not None:
        raise bad_request("logprobs is not supported", "logprobs", "unsupported_parameter")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree; send one", "max_completion_tokens")


def prompt_list(prompt: PromptT) -> list[str | list[int]]:
    """The prompts of a completion request: a list (of strings or of token-id lists) is a batch."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return list(prompt)


def prompt_param(prompt: PromptT, index: int) -> str:
    """The field that holds prompt ``index`` of ``prompt_list(prompt)`` (errors name it): ``prompt[i]`` in a
    batch, ``prompt`` for a single prompt."""
    single = isinstance(prompt, str) or all(isinstance(x, int) for x in prompt)
    return "prompt" if single else f"prompt[{index}]"


# ---------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chunk(rid: str, obj: str, model: str, created: int, choices: list[dict], use: dict | None = None) -> dict:
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def models_list(names: tuple[str, ...], created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "epserve",
                                        "max_model_len": max_model_len} for n in names]}
