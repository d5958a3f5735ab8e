"""End-to-end fixtures: the real pipeline (``epserve trace`` -> ``epserve place --solver local``) once per
session, the one-process greedy reference, and started servers that are always torn down."""

from __future__ import annotations

import json

import pytest

from comm.spawn import free_port
from launch.cli import main
from launch.serve_cmd import default_model_dir
from launch.serve_process import ServeProcess

DEFAULT = default_model_dir()

PROMPTS = [   # the default model is trained on Python code
    "def ",
    "import os\n",
    "class Stack:\n    def push(self, x):",
    "for i in range(10):",
    "def fibonacci(n):\n",
    "with open(path) as f:\n",
    "    return sorted(",
    "if __name__ == \"__main__\":\n",
    "x = [i * i for i in",
    "try:\n    import numpy as np\nexcept",
    "def __init__(self, name):\n        self.",
    "print(\"hello",
]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """``{"trace": path, 2: placement.json, 4: placement.json}`` made by the real commands (the placements
    name their predictor files, as `epserve place` writes them)."""
    root = tmp_path_factory.mktemp("pipeline")
    prompts = root / "prompts.jsonl"   # JSONL: the prompts hold newlines
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    trace = root / "trace.npz"
    assert main(["trace", "--prompts", str(prompts), "-o", str(trace), "--max-tokens", "32"]) == 0
    out = {"trace": trace}
    for gpus in (2, 4):
        out[gpus] = root / f"placement{gpus}.json"
        assert main(["place", "--trace", str(trace), "--gpus-per-node", str(gpus), "--solver", "local",
                     "--time-limit", "10", "--restarts", "2", "--rounds", "20", "-o", str(out[gpus])]) == 0
        assert (root / f"placement{gpus}.predictor.npz").is_file()
    return out


@pytest.fixture(scope="session")
def reference(tokenizer):
    """``(prompts or id lists, max_tokens) -> [new token ids]``: MoEModel.greedy_reference on the ids the server
    makes (text is encoded as /v1/completions encodes it)."""
    from epserve.model.config import ModelConfig
    from epserve.model.loader import load_model

    model, _ = load_model(DEFAULT)
    eos = ModelConfig.from_dir(DEFAULT).eos_token_ids
    cache: dict = {}

    def run(prompts: list, max_tokens: int) -> list[list[int]]:
        key = (tuple(p if isinstance(p, str) else tuple(p) for p in prompts), max_tokens)
        if key not in cache:
            ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
            cache[key] = model.greedy_reference(ids, max_tokens, eos_token_ids=eos)
        return cache[key]

    return run


@pytest.fixture
def serve(tmp_path):
    """``(argv, **kwargs) -> ServeProcess``, ready; every process of every started server is killed at
    teardown, whatever the test did."""
    started: list[ServeProcess] = []

    def start(argv: list[str], *, wait: bool = True, port: int | None = None, **kwargs) -> ServeProcess:
        port = port or free_port()
        proc = ServeProcess(argv, port=port, log_path=tmp_path / f"serve{len(started)}.log", **kwargs)
        started.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.stop(timeout_s=20)
