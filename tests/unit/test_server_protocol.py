"""Request validation (no engine): every bad field gives 400 with ``param`` naming it, in OpenAI's error shape."""

from __future__ import annotations

import json

import pytest

from epserve.server.errors import APIError
from epserve.server.protocol import (ChatCompletionRequest, CompletionRequest, parse_body, prompt_list,
                                     prompt_param)

OK_COMPLETION = {"model": "m", "prompt": "hi"}
OK_CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(body, cls) -> APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(APIError) as info:
        parse_body(raw, cls)
    return info.value


@pytest.mark.parametrize("change, param, words", [
    ({"model": None}, "model", "valid string"),
    ({"model": 3}, "model", "valid string"),
    ({"prompt": 5}, "prompt", "list of token ids"),
    ({"prompt": [1, "a"]}, "prompt", "list of token ids"),
    ({"prompt": [[1], [2.5]]}, "prompt", "list of token-id lists"),
    ({"prompt": []}, "prompt", "must not be empty"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": ["a", ""]}, "prompt", "must not be empty"),
    ({"prompt": [[1], []]}, "prompt", "must not be empty"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": -3}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": 1.5}, "max_tokens", "valid integer"),
    ({"max_tokens": "16"}, "max_tokens", "valid integer"),
    ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"temperature": "1"}, "temperature", "valid number"),
    ({"temperature": True}, "temperature", "valid number"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_p": 1.01}, "top_p", "less than or equal to 1"),
    ({"top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"seed": 1 << 63}, "seed", "less than or equal to"),
    ({"seed": "7"}, "seed", "valid integer"),
    ({"stop": 3}, "stop", "string or a list of strings"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": ["a", ""]}, "stop", "must not be empty"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", "valid boolean"),
    ({"stream": True, "stream_options": {"other": 1}}, "stream_options.other", "Unrecognized"),
    ({"n": 2}, "n", "not supported"),
    ({"echo": True}, "echo", "not supported"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"best_of": 3}, "best_of", "not supported"),
    ({"suffix": "x"}, "suffix", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"frequency_penalty": 1}, "frequency_penalty", "not supported"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
    ({"ignore_eos": "no"}, "ignore_eos", "valid boolean"),
    ({"user": 5}, "user", "valid string"),
    ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
])
def test_completion_bad_field_names_it(change, param, words):
    err = refused({**OK_COMPLETION, **change}, CompletionRequest)
    assert err.status == 400
    assert err.param == param
    assert words in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi"}, "model"),
    ({"model": "m"}, "prompt"),
])
def test_completion_missing_field(body, param):
    err = refused(body, CompletionRequest)
    assert (err.status, err.param, err.code) == (400, param, "missing_required_parameter")
    assert f"'{param}'" in err.message


@pytest.mark.parametrize("change, param, words", [
    ({"messages": []}, "messages", "at least one message"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'system', 'user'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "Missing required parameter"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 5}]}, "messages[1].content",
     "list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}]},
     "messages[0].content", "list of text parts"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}, "messages[0].tool_calls",
     "Unrecognized"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "disagree"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"n": 0}, "n", "not supported"),
    ({"prompt": "x"}, "prompt", "Unrecognized"),
])
def test_chat_bad_field_names_it(change, param, words):
    err = refused({**OK_CHAT, **change}, ChatCompletionRequest)
    assert (err.status, err.param) == (400, param)
    assert words in err.message


@pytest.mark.parametrize("cls, field, param, shown", [
    (CompletionRequest, '"temperature": NaN', "temperature", "NaN"),
    (CompletionRequest, '"temperature": Infinity', "temperature", "Infinity"),
    (CompletionRequest, '"top_p": -Infinity', "top_p", "-Infinity"),
    (CompletionRequest, '"max_tokens": NaN', "max_tokens", "NaN"),
    (CompletionRequest, '"max_tokens": 1e999', "max_tokens", "Infinity"),   # json reads it as inf
    (CompletionRequest, '"top_k": Infinity', "top_k", "Infinity"),
    (CompletionRequest, '"seed": NaN', "seed", "NaN"),
    (CompletionRequest, '"presence_penalty": NaN', "presence_penalty", "NaN"),
    (CompletionRequest, '"logit_bias": {"5": NaN}', "logit_bias.5", "NaN"),
    (CompletionRequest, '"logprobs": NaN', "logprobs", "NaN"),
    (CompletionRequest, '"best_of": Infinity', "best_of", "Infinity"),
    (CompletionRequest, '"n": NaN', "n", "NaN"),
    (ChatCompletionRequest, '"max_completion_tokens": NaN', "max_completion_tokens", "NaN"),
    (ChatCompletionRequest, '"frequency_penalty": -Infinity', "frequency_penalty", "-Infinity"),
    (ChatCompletionRequest, '"top_logprobs": NaN', "top_logprobs", "NaN"),
])
def test_non_finite_numbers_are_refused_naming_the_field(cls, field, param, shown):
    base = OK_COMPLETION if cls is CompletionRequest else OK_CHAT
    raw = (json.dumps(base)[:-1] + ", " + field + "}").encode()
    err = refused(raw, cls)
    assert (err.status, err.param, err.code) == (400, param, "invalid_value")
    assert f"'{param}': must be a finite number, got {shown}" in err.message


def test_non_finite_number_inside_a_prompt_names_the_element():
    err = refused(b'{"model": "m", "prompt": [[1, 2], [3, NaN]]}', CompletionRequest)
    assert (err.status, err.param) == (400, "prompt[1][1]") and "finite number" in err.message


def test_finite_floats_still_parse():
    req = parse_body(json.dumps({**OK_COMPLETION, "temperature": 1e-300, "top_p": 0.5}).encode(), CompletionRequest)
    assert (req.temperature, req.top_p) == (1e-300, 0.5)


@pytest.mark.parametrize("raw, words", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\xff\xfe", "not valid JSON"),
    (b'{"model": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
])
def test_body_that_is_not_a_json_object(raw, words):
    err = refused(raw, CompletionRequest)
    assert err.status == 400 and err.param is None
    assert words in err.message


def test_good_requests_parse_with_their_values():
    req = parse_body(json.dumps({**OK_COMPLETION, "prompt": ["a", "b"], "max_tokens": 7, "temperature": 1,
                                 "top_p": 0.5, "top_k": 3, "seed": -5, "stop": "x", "n": 1, "stream": True,
                                 "stream_options": {"include_usage": True}, "ignore_eos": True,
                                 "user": "u", "presence_penalty": 0}).encode(), CompletionRequest)
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (7, 1.0, 0.5, 3, -5)
    assert req.stop_strings() == ("x",) and req.stream_options.include_usage and req.ignore_eos
    chat = parse_body(json.dumps({**OK_CHAT, "messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 9, "stop": ["p", "q"]}).encode(), ChatCompletionRequest)
    assert [m.text() for m in chat.messages] == ["s", "a\nb"]
    assert chat.max_completion_tokens == 9 and chat.stop_strings() == ("p", "q")


@pytest.mark.parametrize("prompt, expected, params", [
    ("abc", ["abc"], ["prompt"]),
    (["a", "b"], ["a", "b"], ["prompt[0]", "prompt[1]"]),
    ([1, 2, 3], [[1, 2, 3]], ["prompt"]),
    ([[1], [2, 3]], [[1], [2, 3]], ["prompt[0]", "prompt[1]"]),
    ([[1]], [[1]], ["prompt[0]"]),
])
def test_prompt_list_batch_shapes_and_the_field_each_prompt_came_from(prompt, expected, params):
    assert prompt_list(prompt) == expected
    assert [prompt_param(prompt, i) for i in range(len(expected))] == params
