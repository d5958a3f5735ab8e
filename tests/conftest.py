"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


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
