"""`epserve serve --attention tp` under torchrun (2 and 4 ranks): the batch answer is the one-process model's,
/placement names the strategy tp_two_a2a, and the group stops cleanly."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import PROMPTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_TOKENS = 12


@pytest.mark.parametrize("ranks", [2, 4])
def test_tp_attention_serves_the_one_process_tokens(ranks, serve, tokenizer, reference):
    server = serve(["--nproc-per-node", str(ranks), "--attention", "tp", "--strategy", "two_a2a"])
    refs = reference(PROMPTS[:6], MAX_TOKENS)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post("/v1/completions", json={"model": "default_model", "prompt": PROMPTS[:6],
                                            "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.status_code == 200, r.text
        assert [ch["text"] for ch in r.json()["choices"]] == [tokenizer.decode(x) for x in refs]
        assert c.get("/placement").json()["strategy"] == "tp_two_a2a"
    assert "strategy tp_two_a2a" in server.log()
    assert server.stop(timeout_s=40) == 0, server.log()[-3000:]
