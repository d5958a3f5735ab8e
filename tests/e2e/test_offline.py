"""``epserve trace`` and ``epserve batch`` on the default model (world size 1, in this process)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from launch.cli import main
from placement import Placement
from placement.trace import RoutingTrace
from tests.e2e.conftest import PROMPTS

pytestmark = pytest.mark.e2e


@pytest.mark.slow   # builds the session's pipeline (trace + two placements)
def test_trace_records_every_token_with_its_vocabulary_id(pipeline, tokenizer, reference):
    trace = RoutingTrace.load(pipeline["trace"])
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (6, 16, 2)
    assert trace.has_token_ids
    ref = reference(PROMPTS, 32)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    # every fed token once: the prompt, then each generated token but the last
    assert trace.num_tokens == sum(len(p) + len(r) - 1 for p, r in zip(ids, ref))
    for s, (prompt, new) in enumerate(zip(ids, ref)):
        rows = np.flatnonzero(trace.seq_ids_T == s)
        order = rows[np.argsort(trace.positions_T[rows])]
        assert trace.positions_T[order].tolist() == list(range(len(prompt) + len(new) - 1))
        assert trace.token_ids_T[order].tolist() == (prompt + new)[:-1]
    assert ((trace.experts_TLK >= 0) & (trace.experts_TLK < 16)).all()
    np.testing.assert_allclose(trace.weights_TLK.sum(-1), 1.0, rtol=1e-5)   # Mixtral renormalises its top-2
    # `epserve place` accepted it: the placement names a predictor fitted on its vocabulary ids
    placement = Placement.load(pipeline[4])
    assert placement.num_gpus == 4 and placement.solver["name"] == "local"
    assert placement.solver["predictor"] == "placement4.predictor.npz"
    assert placement.trace["tokens"] == trace.num_tokens


def test_trace_refuses_bad_input(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"text": "no prompt"}\n')
    assert main(["trace", "--prompts", str(prompts), "-o", str(tmp_path / "t.npz")]) == 2
    assert f"{prompts}:2: expected an object with a non-empty string 'prompt'" in capsys.readouterr().err
    assert main(["trace", "--prompts", str(prompts), "-o", str(tmp_path / "t.json")]) == 2
    assert "output must be a .npz file" in capsys.readouterr().err
    assert main(["trace", "--prompts", str(tmp_path / "absent.txt"), "-o", str(tmp_path / "t.npz")]) == 2
    assert "prompts file not found" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()


def test_batch_runs_every_line_through_the_server(tmp_path, tokenizer, reference, capsys):
    chat = [{"role": "user", "content": "sort a list"}]
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/completions",
         "body": {"model": "default_model", "prompt": PROMPTS[:2], "max_tokens": 10, "temperature": 0}},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "default_model", "messages": chat, "max_tokens": 10, "temperature": 0}},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions",
         "body": {"model": "default_model", "prompt": "x", "max_tokens": 0}},
        "not json",
        {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}},
        {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "f", "method": "POST", "url": "/v1/completions",
         "body": {"model": "default_model", "prompt": PROMPTS[2], "max_tokens": 10, "temperature": 0}},
    ]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    assert main(["batch", str(src), str(out)]) == 0
    assert f"wrote {out}: 7 lines, 3 answered, 4 errors" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"batch_req_{i}" for i in range(1, 8)]
    assert [r["custom_id"] for r in rows] == ["a", "b", "c", None, "a", "e", "f"]

    a, b, c, bad_json, dup, url, f = rows
    refs = reference(PROMPTS[:3], 10)
    assert a["error"] is None and a["response"]["status_code"] == 200
    assert [ch["text"] for ch in a["response"]["body"]["choices"]] == [tokenizer.decode(r) for r in refs[:2]]
    assert a["response"]["request_id"] == a["response"]["body"]["id"]
    chat_ref = reference([tokenizer.encode_chat(chat)], 10)[0]
    assert b["response"]["body"]["choices"][0]["message"]["content"] == tokenizer.decode(chat_ref)
    assert f["response"]["body"]["choices"][0]["text"] == tokenizer.decode(refs[2])
    assert c["response"]["status_code"] == 400 and c["response"]["body"]["error"]["param"] == "max_tokens"
    assert bad_json["response"] is None and bad_json["error"]["message"].startswith("line 4: not valid JSON")
    assert dup["error"]["message"] == "line 5: custom_id 'a' appears on an earlier line"
    assert url["error"]["message"] == ("line 6: 'url' must be one of /v1/completions, /v1/chat/completions, "
                                       "got '/v1/embeddings'")


def test_batch_refuses_a_missing_input(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "absent.jsonl"), str(tmp_path / "out.jsonl")]) == 2
    assert "batch input not found" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
