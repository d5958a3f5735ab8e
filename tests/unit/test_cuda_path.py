"""The data path on a CUDA device at world size 1 (skipped without one): the runner in float32 on the GPU gives
the tokens of the same runner in float32 on the CPU (TF32 is off for matmuls by default, so the two differ by
float32 rounding only; bfloat16 GPU-vs-CPU agreement is reported by bench/gpu_check.py, not asserted) for a tiny top-8 model and a tiny DeepSeek-V3 (MLA). (Host
syncs per layer are counted device-independently by tests/dist/test_host_syncs.py.)"""

from __future__ import annotations

import pytest
import torch

from comm.strategy import Strategy
from comm.topology import EPTopology
from epserve.engine.builder import build_runner
from epserve.engine.generate import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3], [40, 41, 42, 43, 44]]


@pytest.mark.parametrize("family, overrides", [("qwen3_moe", dict(num_experts=16, num_experts_per_tok=8)),
                                               ("deepseek_v3", {})])
def test_cuda_tokens_equal_cpu_tokens(tiny_checkpoint, family, overrides):
    ckpt = tiny_checkpoint(family, **overrides)
    out = {}
    for device in ("cpu", "cuda"):
        runner = build_runner(ckpt, EPTopology.single(device), strategy=Strategy.TWO_A2A, dtype=torch.float32,
                              kv_cache_tokens=512, kv_block_size=4)
        out[device] = generate(runner, PROMPTS, 6).tokens
    assert out["cuda"] == out["cpu"]

