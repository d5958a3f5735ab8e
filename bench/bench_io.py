"""Where the benchmarks write their results and find the FLAME trace.

    --out        default bench/results/local/ (untracked; made at run time). The tracked figures under
                 bench/results/ are reproduced with `--out bench/results`.
    --trace      the FLAME-MoE-290M encoder trace; default: $EPSERVE_SHARED_TRACES (a folder holding
                 flame290m_encoder_2048tok_top6.npz, or the shared traces/ folder holding flame-moe-290m/ with it),
                 else ../shared/traces/flame-moe-290m/ beside the checkout. Absent: one line that says where the
                 data comes from, exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_OUT = ROOT / "bench" / "results" / "local"
OUT_HELP = "results folder (default bench/results/local/, untracked; --out bench/results rewrites the tracked figures)"
FLAME_ENCODER = "flame290m_encoder_2048tok_top6.npz"
FLAME_SOURCE = ("the FLAME-MoE-290M routing traces come from the Hugging Face dataset CMU-FLAME/FLAME-MoE-Traces "
                "(Apache-2.0; model FLAME-MoE-290M-1.3B, arXiv 2505.20225), re-encoded as .npz with arrays experts "
                "int16 [T, 8, 6] and scores float32 [T, 8, 6] (python bench/get_flame_trace.py converts the CSV "
                "files); pass --trace PATH or set EPSERVE_SHARED_TRACES to the folder holding it")


def out_dir(path: str | Path) -> Path:
    """``path`` as a folder that exists (made, with its parents, when absent)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_flame_trace(name: str = FLAME_ENCODER) -> Path:
    """Where a FLAME trace file is looked for when --trace is not given (it may not exist)."""
    env = os.environ.get("EPSERVE_SHARED_TRACES")
    if env:
        folder = Path(env)
        for candidate in (folder / name, folder / "flame-moe-290m" / name):
            if candidate.is_file():
                return candidate
        return folder / name
    return ROOT.parent / "shared" / "traces" / "flame-moe-290m" / name


def require_flame_trace(path: str | Path | None, prog: str, name: str = FLAME_ENCODER) -> Path:
    """``path`` (else the default location) when it is a file; otherwise one line on stderr, exit status 2."""
    given = path is not None
    path = Path(path) if given else default_flame_trace(name)
    if not path.is_file():
        where = "--trace" if given else ("$EPSERVE_SHARED_TRACES" if os.environ.get("EPSERVE_SHARED_TRACES")
                                         else "the default location")
        print(f"{prog}: FLAME trace not found: {path} ({where}); {FLAME_SOURCE}", file=sys.stderr)
        raise SystemExit(2)
    return path
