"""End-to-end fixtures: the real pipeline (``epserve trace`` -> ``epserve place --solver local``) once per
session, the one-process greedy reference, and started servers that are always torn down."""

from __future__ import annotations

import pytest

from comm.spawn import free_port
from launch.cli import main
from launch.serve_cmd import default_model_dir
from tests.e2e._serve import ServeProcess

DEFAULT = default_model_dir()

PROMPTS = [
    "The history of the city begins",
    "Once upon a time there was a",
    "In mathematics, a prime number is",
    "The weather today is",
    "She opened the door and saw",
    "Water boils at a temperature of",
    "The best way to learn a language",
    "Scientists have discovered a new",
    "The river runs through the old town and",
    "My favourite food is",
    "He said that the meeting would",
    "A long time ago, in a small village,",
]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """``{"trace": path, 2: placement.json, 4: placement.json}`` made by the real commands (the placements
    name their predictor files, as `epserve place` writes them)."""
    root = tmp_path_factory.mktemp("pipeline")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
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
def tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(DEFAULT / "tokenizer.json"))


@pytest.fixture(scope="session")
def reference(tokenizer):
    """``(prompts, max_tokens) -> [new token ids]``: MoEModel.greedy_reference on the ids the server makes."""
    from epserve.model.config import ModelConfig
    from epserve.model.loader import load_model

    model, _ = load_model(DEFAULT)
    eos = ModelConfig.from_dir(DEFAULT).eos_token_ids
    cache: dict = {}

    def run(prompts: list[str], max_tokens: int) -> list[list[int]]:
        key = (tuple(prompts), max_tokens)
        if key not in cache:
            ids = [tokenizer.encode(p).ids for p in prompts]
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
