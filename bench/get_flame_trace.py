"""Convert FLAME-MoE routing CSV files to the .npz trace the benchmarks and `epserve place --trace` read.

Source: the Hugging Face dataset CMU-FLAME/FLAME-MoE-Traces (Apache-2.0; model FLAME-MoE-290M-1.3B, arXiv
2505.20225). Nothing is downloaded here: fetch the CSV files yourself, then

    python bench/get_flame_trace.py CSV [CSV ...] -o flame290m_encoder_2048tok_top6.npz [--top-k 6] [--tokens 2048]

ASSUMED CSV layout (the one seen in the public copy github.com/Akash-N-Pai/DynaNDE-Simulator, commit f274466b;
check yours against it, the script refuses anything else):
    - one file per MoE layer; the layers are ordered by the number after "layer" in the file name (layer2 ..
      layer9 for FLAME-MoE-290M's 8 MoE layers), else by the order given;
    - header `layer_id,token_id,expert_0,...,expert_{E-1}` (E = 64); one row per token;
    - expert_e holds the router's softmax score of expert e for that token, 0 for the experts it did not choose
      (top-k non-zero entries per row);
    - the same token_id sequence in every file (rows aligned across layers: a row is one token at every layer).
Output (the FLAME layout of placement/trace.py): experts int16 [T, L, K] (highest score first), scores float32
[T, L, K], token_id int32 [T] (a row index, not a vocabulary id), moe_layers int64 [L].
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np


def read_layer(path: Path, top_k: int, tokens: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(experts [T, K] int16, scores [T, K] float32, token_id [T]) of one layer's CSV."""
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    experts = [c for c in header[2:]]
    want = [f"expert_{e}" for e in range(len(experts))]
    if header[:2] != ["layer_id", "token_id"] or experts != want or not experts:
        raise SystemExit(f"get_flame_trace: {path}: header is {','.join(header[:4])},...; expected "
                         f"layer_id,token_id,expert_0,...,expert_{{E-1}} (see this script's docstring)")
    table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, max_rows=tokens)
    token_id, scores_TE = table[:, 1].astype(np.int64), table[:, 2:].astype(np.float32)
    chosen = (scores_TE > 0).sum(1)
    bad = np.flatnonzero(chosen != top_k)
    if len(bad):
        raise SystemExit(f"get_flame_trace: {path}: row {int(bad[0]) + 2} (token_id {token_id[bad[0]]}) has "
                         f"{chosen[bad[0]]} non-zero expert scores, expected --top-k {top_k}")
    order = np.argsort(-scores_TE, axis=1, kind="stable")[:, :top_k]
    return order.astype(np.int16), np.take_along_axis(scores_TE, order, 1), token_id


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="+", type=Path, help="one CSV per MoE layer")
    p.add_argument("-o", "--output", type=Path, required=True, help=".npz to write")
    p.add_argument("--top-k", type=int, default=6, help="experts chosen per token (FLAME-MoE-290M: 6)")
    p.add_argument("--tokens", type=int, help="keep the first N tokens (rows) of each file")
    args = p.parse_args(argv)
    for f in args.csv:
        if not f.is_file():
            p.exit(2, f"get_flame_trace: not found: {f}\n")
    number = [re.search(r"layer_?(\d+)", f.name) for f in args.csv]
    files = list(args.csv)
    layers = list(range(len(files)))
    if all(number):
        layers, files = zip(*sorted((int(m.group(1)), f) for m, f in zip(number, files)))
    per_layer = [read_layer(f, args.top_k, args.tokens) for f in files]
    first = per_layer[0][2]
    for f, (_, _, ids) in zip(files, per_layer):
        if not np.array_equal(ids, first):
            p.exit(2, f"get_flame_trace: {f}: its token_id column differs from {files[0]}'s: rows are not the "
                      f"same tokens at every layer\n")
    experts = np.stack([e for e, _, _ in per_layer], axis=1)
    scores = np.stack([s for _, s, _ in per_layer], axis=1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, experts=experts, scores=scores, token_id=first.astype(np.int32),
                        moe_layers=np.asarray(layers, dtype=np.int64))
    print(f"wrote {args.output}: experts / scores {experts.shape} (tokens, layers {list(layers)}, top-{args.top_k})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
