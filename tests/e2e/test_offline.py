"""``epserve trace`` and ``epserve batch`` on the default model (world size 1, in this process)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from launch.cli import main
from placement import Placement
from placement.trace import RoutingTrace
from tests.e2e.conftest import DEFAULT, PROMPTS

pytestmark = pytest.mark.e2e


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
