"""``epserve serve`` as a command: bad input is refused before torchrun starts (exit status 2, one line)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import psutil
import pytest

from launch.serve_process import REPO_ROOT, serve_env
from placement.cluster import ClusterShape
from placement.placement import contiguous_placement
from tests.e2e.conftest import DEFAULT

pytestmark = pytest.mark.e2e


def _serve(*argv: str, marker: str) -> subprocess.CompletedProcess:
    """Run ``epserve serve`` to its end (bounded); no process whose command line holds ``marker`` (a path of
    this test's) may exist afterwards, so nothing it started outlives it."""
    out = subprocess.run([sys.executable, "-m", "launch.cli", "serve", *argv], cwd=REPO_ROOT, env=serve_env(),
                         capture_output=True, text=True, timeout=120)
    stray = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert stray == []
    return out


def _contiguous(path, *, layers: int, gpus: int):
    contiguous_placement(layers, 16, ClusterShape(nodes=1, gpus_per_node=gpus)).save(path)
    return path


def test_mismatched_placements_start_nothing(tmp_path):
    four = _contiguous(tmp_path / "four_gpus.json", layers=6, gpus=4)
    out = _serve("--nproc-per-node", "2", "--placement", str(four), marker=str(four))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"epserve serve: error: {four} is for 4 GPUs, but --nnodes 1 x --nproc-per-node 2 = 2 ranks"]
    assert "torch.distributed" not in out.stderr and out.stdout == ""


def test_placement_for_another_model_starts_nothing(tmp_path):
    other = _contiguous(tmp_path / "five_layers.json", layers=5, gpus=2)
    out = _serve("--nproc-per-node", "2", "--placement", str(other), marker=str(other))
    assert out.returncode == 2
    assert out.stderr.strip() == ("epserve serve: error: placement is for 5 MoE layers x 16 experts, but the model "
                                  "(default_model) has 6 x 16")


def test_broken_checkpoint_starts_nothing(tmp_path):
    bad = tmp_path / "broken_model"
    shutil.copytree(DEFAULT, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(4096)                     # a download cut short
    out = _serve("--model", str(bad), "--nproc-per-node", "2", marker=str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"epserve serve: error: {bad / 'model.safetensors'}: not a readable "
                                         f"safetensors file")
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("change, dtype, message", [
    ({"dtype": "bfloat16"}, "float16", "--dtype float16 cannot hold this bfloat16 checkpoint's range"),
    ({"model_type": "llama"}, "auto", "model_type 'llama' is not supported"),
    ({"model_type": "deepseek_v3", "n_routed_experts": 16, "n_group": 3}, "auto",
     "n_routed_experts=16 is not divisible by n_group=3"),
])
def test_bad_model_or_dtype_starts_nothing(tmp_path, change, dtype, message):
    import json
    bad = tmp_path / "model_to_refuse"
    shutil.copytree(DEFAULT, bad)
    config = json.loads((bad / "config.json").read_text())
    config.update(change)
    (bad / "config.json").write_text(json.dumps(config))
    out = _serve("--model", str(bad), "--nproc-per-node", "2", "--dtype", dtype, marker=str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().startswith("epserve serve: error: ") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

