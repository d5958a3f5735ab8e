"""The benchmarks' inputs: where the FLAME trace is looked for, the one line when it is absent, the CSV converter."""

from __future__ import annotations

import numpy as np
import pytest

from bench import bench_io
from bench.get_flame_trace import main as convert
from placement import RoutingTrace


def test_flame_trace_from_env_folder_either_layout(tmp_path, monkeypatch):
    flat = tmp_path / "flat" / bench_io.FLAME_ENCODER
    nested = tmp_path / "traces" / "flame-moe-290m" / bench_io.FLAME_ENCODER
    for path in (flat, nested):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    monkeypatch.setenv("EPSERVE_SHARED_TRACES", str(flat.parent))
    assert bench_io.require_flame_trace(None, "b") == flat
    monkeypatch.setenv("EPSERVE_SHARED_TRACES", str(tmp_path / "traces"))
    assert bench_io.require_flame_trace(None, "b") == nested
    assert bench_io.require_flame_trace(flat, "b") == flat           # --trace wins


def test_absent_flame_trace_is_one_line_naming_the_source(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EPSERVE_SHARED_TRACES", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        bench_io.require_flame_trace(None, "placement_bench")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"placement_bench: FLAME trace not found: {tmp_path / bench_io.FLAME_ENCODER} "
                          f"($EPSERVE_SHARED_TRACES)")
    assert "CMU-FLAME/FLAME-MoE-Traces" in err and "experts int16 [T, 8, 6]" in err and "--trace PATH" in err


def test_get_flame_trace_converts_per_layer_csvs(tmp_path):
    rng = np.random.default_rng(0)
    T, E, K = 5, 16, 3
    chosen = {}
    files = []
    for layer in (3, 2):                                    # given out of order: sorted by the file name's number
        dense = np.zeros((T, E))
        for t in range(T):
            ids = rng.choice(E, K, replace=False)
            dense[t, ids] = np.round(rng.uniform(0.01, 0.5, K), 6)
        chosen[layer] = dense
        f = tmp_path / f"flame_layer{layer}_tokens.csv"
        header = "layer_id,token_id," + ",".join(f"expert_{e}" for e in range(E))
        np.savetxt(f, np.c_[np.full(T, layer), np.arange(T), dense], delimiter=",", header=header, comments="",
                   fmt=["%d", "%d"] + ["%.6f"] * E)
        files.append(str(f))
    out = tmp_path / "t.npz"
    assert convert([*files, "-o", str(out), "--top-k", str(K)]) == 0
    trace = RoutingTrace.load(out)
    assert (trace.num_tokens, trace.num_layers, trace.top_k, trace.meta["moe_layers"]) == (T, 2, K, [2, 3])
    for l, layer in enumerate((2, 3)):
        best = np.argsort(-chosen[layer], axis=1, kind="stable")[:, :K]
        assert (trace.experts_TLK[:, l] == best).all()
        assert np.allclose(trace.weights_TLK[:, l], np.take_along_axis(chosen[layer], best, 1))
    with pytest.raises(SystemExit, match="has 3 non-zero expert scores, expected --top-k 2"):
        convert([*files, "-o", str(out), "--top-k", "2"])
