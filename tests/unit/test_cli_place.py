"""``epserve place`` / ``epserve simulate`` end to end: outputs, tables, JSON, and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch.cli import main
from placement import InputError, Placement
from placement.predictor import SpeculativePredictor
from placement.synthetic import SyntheticSpec, synthetic_trace
from tests.conftest import REPO_ROOT

FAST = ["--restarts", "1", "--rounds", "10"]


@pytest.fixture(scope="module")
def synthetic_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "syn.npz"
    spec = SyntheticSpec(num_tokens=1200, num_layers=4, num_experts=16, top_k=2, num_clusters=4, vocab_size=100,
                         seq_len=12, seed=7)
    synthetic_trace(spec).save(path)
    return path


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_place_writes_placement_and_predictor_and_compares(tmp_path, synthetic_path, capsys):
    out_json = tmp_path / "p.json"
    rc, out, err = _run(["place", "--trace", synthetic_path, "--gpus-per-node", 4, "--held-out", 0.25,
                         "-o", out_json, *FAST], capsys)
    assert rc == 0
    placement = Placement.load(out_json)
    assert placement.num_gpus == 4 and placement.expert_to_gpu_LE.shape == (4, 16)
    assert placement.solver["name"] == "local" and placement.solver["predictor"] == "p.predictor.npz"
    assert {"time_s", "cpu_s", "status", "options"} <= placement.solver.keys()
    assert {"value", "upper_bound", "gap"} <= placement.objective.keys()
    assert placement.trace["tokens"] == 900 and placement.trace["total_tokens"] == 1200
    assert len(placement.trace["sha256"]) == 64
    SpeculativePredictor.load(tmp_path / "p.predictor.npz").check_placement(placement)
    assert "local: start 1/1" in err                      # progress goes to stderr
    for name in ("ours", "contiguous", "round_robin", "speculative", "held out (300 tokens)"):
        assert name in out


def test_place_json_and_simulate_on_held_out_real_trace(tmp_path, flame_encoder_trace_path, capsys):
    out_json = tmp_path / "flame.json"
    rc, out, _ = _run(["place", "--trace", flame_encoder_trace_path, "--gpus-per-node", 8, "--held-out", 0.4,
                       "-o", out_json, "--json", *FAST], capsys)
    assert rc == 0
    summary = json.loads(out)
    rows = {(r["placement"], r["strategy"]): r for r in summary["rows"]}
    assert rows[("contiguous", "two_a2a")]["top1_cross_gpu_rate"] == pytest.approx(0.867, abs=0.005)
    assert rows[("ours", "coherent")]["top1_cross_gpu_rate"] < 0.62
    assert rows[("ours", "coherent")]["reduction_vs_baseline"] > 0.3
    assert not (tmp_path / "flame.predictor.npz").exists()   # the FLAME traces carry no vocabulary ids
    rc, out, _ = _run(["simulate", "--trace", flame_encoder_trace_path, "--placement", out_json,
                       "--held-out", 0.4, "--strategy", "all", "--json"], capsys)
    assert rc == 0
    sim_rows = {(r["placement"], r["strategy"]): r for r in json.loads(out)["rows"]}
    assert sim_rows[("ours", "coherent")]["transfers"] == rows[("ours", "coherent")]["transfers"]
    assert {s for _, s in sim_rows} == {"two_a2a", "coherent"}


def test_simulate_speculative_with_the_written_predictor(tmp_path, synthetic_path, capsys):
    out_json = tmp_path / "p.json"
    assert _run(["place", "--trace", synthetic_path, "--gpus-per-node", 4, "-o", out_json, *FAST], capsys)[0] == 0
    rc, out, _ = _run(["simulate", "--trace", synthetic_path, "--placement", out_json, "--strategy", "speculative",
                       "--json"], capsys)
    assert rc == 0
    strategies = {(r["placement"], r["strategy"]) for r in json.loads(out)["rows"]}
    assert ("ours", "speculative") in strategies and ("contiguous", "two_a2a") in strategies


def _trace_file(path, **arrays):
    base = {"experts": np.zeros((4, 2, 2), np.int16) + np.array([0, 1], np.int16),
            "weights": np.full((4, 2, 2), 0.5, np.float32), "meta": np.array(json.dumps({"num_experts": 8}))}
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return path


_META8 = np.array(json.dumps({"num_experts": 8}))
BAD_TRACES = {   # case: (arrays over the good file's, None: the file's bytes instead; what the one-line error says)
    "not_npz": (b"garbage", "not an .npz trace (a text file starting 'garbage'"),
    "csv": (b"token,layer,expert\n0,0,3\n", "not an .npz trace (a text file starting 'token,layer,expert'; "
                                          "FLAME's CSV files convert with bench/get_flame_trace.py)"),
    "npy": (b"\x93NUMPY\x01\x00", "a single .npy array, not an .npz trace"),
    "shape": ({"experts": np.zeros((4, 2), np.int16)},
              "array 'experts' has shape (4, 2), but it must be 3-d [tokens, layers, top_k]"),
    "shape_no_meta": ({"experts": np.zeros((4, 2), np.int16), "weights": np.zeros((4, 2), np.float32), "meta": None},
                      "array 'experts' has shape (4, 2), but it must be 3-d [tokens, layers, top_k]"),
    "shape_flame": ({"experts": np.zeros((4, 2), np.int16), "weights": None, "meta": None,
                     "scores": np.zeros((4, 2), np.float32)},
                    "array 'experts' has shape (4, 2), but it must be 3-d [tokens, layers, top_k]"),
    "no_meta": ({"meta": None}, "meta has no num_experts (experts (4, 2, 2), ids 0..1); pass --num-experts"),
    "dtype": ({"experts": np.zeros((4, 2, 2), np.float32) + np.array([0, 1], np.float32)},
              "array 'experts' has dtype float32, but it holds expert ids: it must be an integer array"),
    "weights_dtype": ({"weights": np.ones((4, 2, 2), np.int32)},
                      "array 'weights' has dtype int32, but router weights must be floating point"),
    "weights_shape": ({"weights": np.ones((4, 2, 3), np.float32)},
                      "array 'weights' has shape (4, 2, 3), but 'experts' has (4, 2, 2)"),
    "scores_shape": ({"weights": None, "scores": np.ones((4, 2), np.float32)},
                     "array 'scores' has shape (4, 2), but 'experts' has (4, 2, 2)"),
    "negative": ({"experts": np.zeros((4, 2, 2), np.int16) + np.array([-1, 1], np.int16)},
                 "array 'experts' holds expert id -1 at token 0, layer 0, slot 0: ids must be in [0, 8), and this "
                 "one is negative"),
    "range": ({"experts": np.full((4, 2, 2), 9, np.int16) + np.array([0, 1], np.int16)},
              "array 'experts' holds expert id 9 at token 0, layer 0, slot 0: ids must be in [0, 8), and this one "
              "is not below num_experts (meta's num_experts 8)"),
    "nan": ({"weights": np.full((4, 2, 2), np.nan, np.float32)}, "weights hold NaN or inf"),
    "missing_weights": ({"weights": None}, "missing array 'weights' (the router weight of each chosen expert, "
                                           "float32 [tokens, layers, top_k]; found: experts, meta)"),
    "missing_experts": ({"experts": None}, "missing array 'experts' (integer expert ids [tokens, layers, top_k]; "
                                           "found: meta, weights)"),
    "pickled": ({"experts": np.array([{"a": 1}], dtype=object)}, "array 'experts' holds Python objects (pickled)"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRACES))
def test_place_refuses_bad_traces_and_writes_nothing(tmp_path, case, capsys):
    """Each malformed trace: one line (exit 2) that names the file and the array, in the trace format's terms."""
    arrays, message = BAD_TRACES[case]
    trace = tmp_path / "t.npz"
    if isinstance(arrays, bytes):
        trace.write_bytes(arrays)
    else:
        _trace_file(trace, **arrays)
    before = sorted(os.listdir(tmp_path))
    rc, out, err = _run(["place", "--trace", trace, "--gpus-per-node", 2, "-o", tmp_path / "p.json"], capsys)
    assert rc == 2
    assert f"error: {trace}: " in err and message in err and "Traceback" not in err, err
    assert "pickle" not in err.replace("(pickled)", "")          # never numpy's allow_pickle advice
    assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before


def test_num_experts_names_its_source_when_ids_exceed_it(tmp_path, capsys):
    trace = _trace_file(tmp_path / "t.npz", experts=np.zeros((4, 2, 2), np.int16) + np.array([0, 5], np.int16))
    rc, _, err = _run(["place", "--trace", trace, "--gpus-per-node", 2, "--num-experts", 4, "-o", tmp_path / "p.json"],
                      capsys)
    assert rc == 2 and f"{trace}: array 'experts' holds expert id 5 at token 0, layer 0, slot 1: ids must be in " \
                       f"[0, 4), and this one is not below num_experts (--num-experts 4)" in err


def test_place_refuses_other_bad_inputs(tmp_path, capsys):
    trace = _trace_file(tmp_path / "t.npz")
    cases = [
        (["--gpus-per-node", 3], "8 experts cannot be split evenly over 3 GPUs"),
        (["--gpus-per-node", 2, "--held-out", 1.5], "--held-out must be a fraction in (0, 1)"),
        (["--gpus-per-node", 0], "cluster.gpus_per_node must be a positive integer"),
        (["--gpus-per-node", 2, "--time-limit", -1], "time limit must be a positive number"),
    ]
    for extra, message in cases:
        rc, _, err = _run(["place", "--trace", trace, "-o", tmp_path / "p.json", *extra], capsys)
        assert (rc, message in err) == (2, True), (extra, err)
    rc, _, err = _run(["place", "--trace", trace, "--gpus-per-node", 2, "-o", tmp_path / "no" / "p.json"], capsys)
    assert rc == 2 and "output directory does not exist" in err
    assert sorted(os.listdir(tmp_path)) == ["t.npz"]


def test_simulate_refuses_bad_placements(tmp_path, flame_encoder_trace_path, synthetic_path, capsys):
    good = tmp_path / "good.json"
    assert _run(["place", "--trace", synthetic_path, "--gpus-per-node", 4, "-o", good, *FAST], capsys)[0] == 0
    d = json.loads(good.read_text())
    assert d["version"] == 2 and d["slots_per_gpu"] == 4
    uneven_v1 = {k: v for k, v in dict(d, version=1, expert_to_gpu=[[0] * 16] * 4).items() if k != "expert_to_gpus"}
    uneven_v2 = dict(d, expert_to_gpus=[[[0]] * 16] * 4)
    files = {"broken.json": ("{not json", "not valid JSON"),
             "uneven.json": (json.dumps(uneven_v1), "layer 0: GPU 0 holds 16 experts, every GPU must hold 4"),
             "uneven2.json": (json.dumps(uneven_v2), "layer 0: GPU 1 holds 0 copies, every GPU must hold the same"),
             "v3.json": (json.dumps(dict(d, version=3)), "placement version 3 is not supported")}
    for name, (text, message) in files.items():
        (tmp_path / name).write_text(text)
        rc, _, err = _run(["simulate", "--trace", synthetic_path, "--placement", tmp_path / name], capsys)
        assert (rc, message in err, "Traceback" in err) == (2, True, False), (name, err)
    rc, _, err = _run(["simulate", "--trace", flame_encoder_trace_path, "--placement", good], capsys)
    assert rc == 2 and "placement is for 4 MoE layers x 16 experts, but the trace has 8 x 64" in err
    rc, _, err = _run(["simulate", "--trace", synthetic_path, "--placement", tmp_path / "absent.json"], capsys)
    assert rc == 2 and "placement file not found" in err


def test_speculative_on_an_id_less_trace_is_refused_in_a_real_process(tmp_path, flame_encoder_trace_path):
    placement = tmp_path / "p.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "launch.cli"]
    ok = subprocess.run(cmd + ["place", "--trace", str(flame_encoder_trace_path), "--gpus-per-node", "8",
                               "--solver", "contiguous", "-o", str(placement)], env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(cmd + ["simulate", "--trace", str(flame_encoder_trace_path), "--placement", str(placement),
                                "--strategy", "speculative"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "has no vocabulary ids (token_ids): the speculative strategies need them" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == ""


def test_place_writes_an_anchor_table_that_simulate_applies(tmp_path, flame_encoder_trace_path, capsys):
    """top-6 FLAME routing, 8 GPUs, held out 40%: the table is written beside the placement, loaded back by
    simulate, and on held-out tokens it saves coherent transfers against the same placement's top-1 rule."""
    out_json = tmp_path / "f.json"
    rc, out, _ = _run(["place", "--trace", flame_encoder_trace_path, "--gpus-per-node", 8, "--held-out", 0.4,
                       "-o", out_json, "--json", *FAST], capsys)
    assert rc == 0
    assert json.loads(out_json.read_text())["solver"]["anchors"] == "f.anchors.npz"
    placement = Placement.load(out_json)
    assert placement.anchors.shape == (8, 64, 8) and placement.anchors.meta["fit_tokens"] == 1229
    rows = {(r["placement"], r["strategy"]): r for r in json.loads(out)["rows"]}
    table, top1 = rows[("ours", "coherent")], rows[("ours_top1_anchor", "coherent")]
    assert table["combine"] == top1["combine"]            # the anchor is always one of the token's expert ranks
    assert table["dispatch"] < top1["dispatch"] - 400      # 462 here: 0.07 per token-layer (819 x 8 held out)
    assert rows[("ours", "two_a2a")]["transfers"] == rows[("ours_top1_anchor", "two_a2a")]["transfers"]
    rc, out, _ = _run(["simulate", "--trace", flame_encoder_trace_path, "--placement", out_json,
                       "--held-out", 0.4, "--json"], capsys)
    sim_rows = {(r["placement"], r["strategy"]): r for r in json.loads(out)["rows"]}
    assert sim_rows[("ours", "coherent")]["transfers"] == table["transfers"]
    assert sim_rows[("ours_top1_anchor", "coherent")]["transfers"] == top1["transfers"]
    rc, out, _ = _run(["place", "--trace", flame_encoder_trace_path, "--gpus-per-node", 8, "--held-out", 0.4,
                       "-o", tmp_path / "g.json", "--no-anchors", *FAST], capsys)
    assert rc == 0 and Placement.load(tmp_path / "g.json").anchors is None
    assert not (tmp_path / "g.anchors.npz").exists()


def test_place_refine_lowers_fit_transfers(tmp_path, flame_encoder_trace_path, capsys):
    out_json = tmp_path / "r.json"
    rc, out, _ = _run(["place", "--trace", flame_encoder_trace_path, "--gpus-per-node", 8, "--held-out", 0.4,
                       "-o", out_json, "--json", "--refine", *FAST], capsys)
    assert rc == 0
    placement = Placement.load(out_json)
    info = placement.solver["refine"]
    assert info["anchored"] and info["fit_tokens"] == 1229 and info["swaps"] > 0
    assert info["fit_transfers_with_table_after"] < info["fit_transfers_with_table_before"]
    summary = json.loads(out)
    assert summary["objective"]["value"] <= summary["objective"]["upper_bound"]
    assert placement.anchors is not None


# ---- simulate --hardware: the cost model ---------------------------------------------------------------------
from tests.conftest import DEFAULT_MODEL_DIR  # noqa: E402


@pytest.fixture(scope="module")
def two_node_placement(tmp_path_factory, synthetic_path):
    out = tmp_path_factory.mktemp("placements") / "p2.json"
    assert main(["place", "--trace", str(synthetic_path), "--nodes", "2", "--gpus-per-node", "2", "-o", str(out),
                 *FAST]) == 0
    return out


def test_simulate_hardware_models_every_strategy_and_transport(two_node_placement, synthetic_path, capsys):
    rc, out, _ = _run(["simulate", "--trace", synthetic_path, "--placement", two_node_placement, "--hardware",
                       "h800-ib400", "--model", DEFAULT_MODEL_DIR, "--tokens-per-step", 32, "--json"], capsys)
    assert rc == 0
    cost = json.loads(out)["cost"]
    assert cost["tokens_per_step"] == 32 and cost["hardware"]["name"] == "h800-ib400"
    assert cost["model"]["hidden_size"] == 128 and cost["model"]["kv_entry_bytes"] == 2 * 2 * 32 * 4  # float32
    keys = {(r["placement"], r["strategy"], r["transport"]) for r in cost["rows"]}
    assert {(s, t) for p, s, t in keys if p == "ours"} == {(s, t) for s in ("two_a2a", "coherent", "speculative",
                                                                          "speculative_two_a2a")
                                                            for t in ("a2a", "fixed", "node_aware")}
    base = next(r for r in cost["rows"] if (r["placement"], r["strategy"], r["transport"]) ==
                ("contiguous", "two_a2a", "a2a"))
    assert base["vs_baseline"] == 1.0 and base["bottleneck"] in ("intra_node", "inter_node")
    best = cost["rows"][0]
    assert (best["strategy"], best["transport"]) == (cost["choice"]["strategy"], cost["choice"]["transport"])
    na = {r["strategy"]: r for r in cost["rows"] if r["placement"] == "ours" and r["transport"] == "node_aware"}
    a2a = {r["strategy"]: r for r in cost["rows"] if r["placement"] == "ours" and r["transport"] == "a2a"}
    assert na["two_a2a"]["inter_MB"] < a2a["two_a2a"]["inter_MB"]
    rc, out, _ = _run(["simulate", "--trace", synthetic_path, "--placement", two_node_placement, "--hardware",
                       "shaped:20mbit", "--model", DEFAULT_MODEL_DIR, "--transport", "fixed"], capsys)
    assert rc == 0
    assert "modelled communication time on shaped:20 Mbit/s, 64 tokens per step (MODELLED" in out
    for text in ("us/MoE layer", "ms/step", "vs two_a2a+a2a", "bottleneck", "inter-node MB/step", "choice: ",
                 "profile sources: bench/calibrate_gloo.py"):
        assert text in out
    assert " node_aware " not in out and " a2a " not in out.split("MODELLED")[1].split("choice:")[0]


def test_simulate_hardware_bad_inputs(tmp_path, synthetic_path, two_node_placement, capsys):
    one_node = tmp_path / "p1.json"
    assert _run(["place", "--trace", synthetic_path, "--gpus-per-node", 4, "-o", one_node, *FAST], capsys)[0] == 0
    common = ["simulate", "--trace", synthetic_path, "--model", DEFAULT_MODEL_DIR]
    rc, out, _ = _run(common + ["--placement", one_node, "--hardware", "cpu-gloo", "--json"], capsys)
    assert rc == 0 and {r["transport"] for r in json.loads(out)["cost"]["rows"]} == {"a2a", "fixed"}
    profile = tmp_path / "hw.json"
    profile.write_text(json.dumps({"name": "x", "intra_node": {"alpha_s": 1e-6, "beta_bytes_per_s": 1e9},
                                   "inter_node": {"alpha_s": -2e-6, "beta_bytes_per_s": 1e9}}))
    cases = [(["--placement", one_node, "--hardware", "cpu-gloo", "--transport", "node_aware"],
              "node_aware needs at least 2 nodes"),
             (["--placement", two_node_placement, "--hardware", "a100"],
              "unknown hardware 'a100' (known: cpu-gloo, h800-ib400, shaped:RATE, or a profile .json file)"),
             (["--placement", two_node_placement, "--hardware", profile], "inter_node.alpha_s must be a finite "
                                                                          "number >= 0, got -2e-06"),
             (["--placement", two_node_placement, "--hardware", tmp_path / "none.json"],
              "hardware profile file not found"),
             (["--placement", two_node_placement, "--hardware", "shaped:0mbit"], "must be > 0")]
    for extra, message in cases:
        rc, _, err = _run(common + extra, capsys)
        assert (rc, message in err, "Traceback" in err) == (2, True, False), (extra, err)
    rc, _, err = _run(["simulate", "--trace", synthetic_path, "--placement", two_node_placement, "--hardware",
                       "cpu-gloo"], capsys)
    assert rc == 2 and "pass --model DIR (its config.json), or --hidden-size and --kv-entry-bytes" in err
    rc, out, _ = _run(["simulate", "--trace", synthetic_path, "--placement", two_node_placement, "--hardware",
                       "cpu-gloo", "--hidden-size", 64, "--kv-entry-bytes", 256, "--json"], capsys)
    assert rc == 0 and json.loads(out)["cost"]["model"]["top_k"] == 2


def test_model_shape_from_hf_configs(tmp_path):
    from launch.place_cmd import model_shape_from_dir
    configs = {
        "dsv3": ({"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
                  "num_attention_heads": 128, "n_routed_experts": 256, "num_experts_per_tok": 8,
                  "first_k_dense_replace": 3, "moe_layer_freq": 1, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                  "torch_dtype": "bfloat16"}, (58, 61, 576 * 2, 8, 256)),
        "qwen3": ({"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                   "num_experts_per_tok": 8, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "torch_dtype": "bfloat16"}, (48, 48, 2 * 4 * 128 * 2, 8, 128)),
    }
    for name, (cfg, (moe, attn, kv, k, e)) in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        m = model_shape_from_dir(tmp_path / name)
        assert (m.moe_layers, m.attention_layers, m.kv_entry_bytes, m.top_k, m.num_experts) == (moe, attn, kv, k, e)
    with pytest.raises(InputError, match="missing integer field 'num_experts_per_tok'"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 2,
                                                                  "num_experts": 4}))
        model_shape_from_dir(tmp_path / "bad")


def test_place_ilp_prints_no_highs_banner_and_keeps_its_gap(tmp_path, synthetic_path):
    """highspy prints "Running HiGHS ..." on fd 1 at the process's first Highs, before PuLP's msg=False applies:
    a real process, stdout and stderr captured at the file-descriptor level."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "launch.cli", "place", "--trace", str(synthetic_path),
                          "--gpus-per-node", "4", "--solver", "ilp", "--time-limit", "20", "--held-out", "0.25",
                          "-o", str(tmp_path / "p.json")], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "HiGHS" not in run.stdout + run.stderr and "THIRD_PARTY" not in run.stdout + run.stderr
    assert run.stdout.startswith("wrote ") and "solver ilp (optimal)" in run.stdout and ", gap 0.00%" in run.stdout
    assert "ilp: objective" in run.stderr and "upper bound" in run.stderr


def test_place_and_simulate_agree_on_the_held_out_objective(tmp_path, synthetic_path, capsys):
    """Same trace, same placement, same --held-out: the table's objective / bound / gap are the same figures in
    `place` and `simulate`, computed on the held-out part; the fit part's objective is on the `wrote` line."""
    out_json = tmp_path / "p.json"
    common = ["--trace", synthetic_path, "--held-out", 0.25, "--json"]
    rc, out, _ = _run(["place", *common, "--gpus-per-node", 4, "-o", out_json, *FAST], capsys)
    assert rc == 0
    placed = json.loads(out)
    rc, out, _ = _run(["simulate", *common, "--placement", out_json, "--strategy", "coherent"], capsys)
    assert rc == 0
    simulated = json.loads(out)
    key = lambda r: (r["placement"], r["strategy"])  # noqa: E731
    sim_rows = {key(r): r for r in simulated["rows"]}
    assert {("ours", "two_a2a"), ("contiguous", "coherent")} <= sim_rows.keys()
    for row in placed["rows"]:
        if key(row) in sim_rows:
            assert [row[k] for k in ("objective", "upper_bound", "gap")] == \
                   [sim_rows[key(row)][k] for k in ("objective", "upper_bound", "gap")], key(row)
    fit_value = placed["objective"]["value"]
    ours = next(r for r in placed["rows"] if key(r) == ("ours", "two_a2a"))
    assert ours["objective"] < 0.5 * fit_value      # 300 held-out tokens against 900 fitted: not the fit figure
    assert placed["objective_note"] == simulated["objective_note"]
    rc, out, _ = _run(["place", "--trace", synthetic_path, "--held-out", 0.25, "--gpus-per-node", 4,
                       "-o", out_json, *FAST], capsys)
    first, second = out.splitlines()[:2]
    assert "on the 900 fit tokens: objective" in first and "held out (300 tokens)" in second
    assert "the placement's surrogate on the same tokens as the traffic" in out
    assert f"{ours['objective']:.1f}" in out and f"{fit_value:.1f}" in first
