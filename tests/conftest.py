"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "epserve" / "assets" / "default_model"


def shared_traces_dir() -> Path | None:
    """``../shared/traces`` beside the checkout (or $EPSERVE_SHARED_TRACES), if present."""
    env = os.environ.get("EPSERVE_SHARED_TRACES")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "traces"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def flame_encoder_trace_path() -> Path:
    """The real FLAME-MoE-290M encoder trace (2048 tokens, 8 MoE layers, 64 experts, top-6)."""
    root = shared_traces_dir()
    path = None if root is None else root / "flame-moe-290m" / "flame290m_encoder_2048tok_top6.npz"
    if path is None or not path.is_file():
        pytest.skip("real routing traces not found: ../shared/traces/flame-moe-290m is absent "
                    "(set EPSERVE_SHARED_TRACES to its traces/ folder)")
    return path


@pytest.fixture(scope="session")
def flame_decoder_trace_path() -> Path:
    """The real FLAME-MoE-290M decoder trace (64 sequences x positions 0..9)."""
    root = shared_traces_dir()
    path = None if root is None else root / "flame-moe-290m" / "flame290m_decoder_10pos_x64seq_top6.npz"
    if path is None or not path.is_file():
        pytest.skip("real routing traces not found: ../shared/traces/flame-moe-290m is absent "
                    "(set EPSERVE_SHARED_TRACES to its traces/ folder)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory ``(family, *, seed=0, fused_experts=False, **config_overrides) -> Path`` of a tiny random HF
    checkpoint (tests/tiny_models.py), built once per pytest session for each distinct set of arguments.
    Treat the directory as read-only; copy it (shutil.copytree) before editing."""
    from tests.tiny_models import make_tiny_checkpoint

    cache: dict[str, Path] = {}

    def make(family, **kwargs) -> Path:
        key = repr((str(getattr(family, "value", family)), sorted(kwargs.items())))
        if key not in cache:
            cache[key] = make_tiny_checkpoint(family, tmp_path_factory.mktemp("tiny_ckpt"), **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): a tiny model
    runs fastest so, and far slower on two threads when the cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled default model's tokenizer, as the server makes ids and text (epserve.server.text.Tokenizer)."""
    from epserve.server.text import Tokenizer

    return Tokenizer.from_dir(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def greedy_reference():
    """``(prompt ids, n, eos=True) -> ids``: the bundled default model's ``greedy_reference`` (stopping at its
    engine eos ids unless ``eos`` is False), memoised."""
    from epserve.engine.engine import EngineConfig
    from epserve.model.loader import load_model

    model, _ = load_model(DEFAULT_MODEL_DIR)
    eos_ids = EngineConfig.from_model_dir(DEFAULT_MODEL_DIR).eos_token_ids
    cache: dict = {}

    def greedy(ids, max_new: int, eos: bool = True) -> list[int]:
        key = (tuple(ids), max_new, eos)
        if key not in cache:
            cache[key] = model.greedy_reference([list(ids)], max_new, eos_token_ids=eos_ids if eos else ())[0]
        return cache[key]

    return greedy
