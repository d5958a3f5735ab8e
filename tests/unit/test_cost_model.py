"""The cost model (placement/cost_model.py) and hardware profiles (placement/hardware.py) against hand-computed
values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from placement import ClusterShape, InputError, Placement, RoutingTrace
from placement.cost_model import ModelShape, choose, predict
from placement.hardware import HardwareProfile, LinkProfile, load_profile, parse_rate
from placement.simulate import SimOptions, Strategy, simulate
from placement.transport import Transport

# alpha 10 us on both classes, 1 GB/s inside a node, 0.1 GB/s across: easy arithmetic.
HW = HardwareProfile(name="toy", intra_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e9),
                     inter_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e8))
# hidden 1000 x 2 B; top-2: a dispatch row is 2000 + 2 x 8 + 8 = 2024 B, a combine row 2000 B.
MODEL = ModelShape(hidden_size=1000, top_k=2, moe_layers=1, attention_layers=1, kv_entry_bytes=500)


def _trace(experts, E):
    e = np.array(experts, dtype=np.int16)
    return RoutingTrace(e, np.full(e.shape, 0.5, np.float32), E, None, None, None)


# 2 nodes x 2 GPUs, expert e on GPU e; token 0 (home 0) uses experts 2, 3 (node 1); token 1 (home 1) 0, 1.
PLACEMENT = Placement(np.array([[0, 1, 2, 3]]), ClusterShape(nodes=2, gpus_per_node=2))
TRACE = _trace([[[2, 3]], [[0, 1]]], E=4)


def test_model_shape_rows_and_constructors():
    assert (MODEL.dispatch_row_bytes, MODEL.combine_row_bytes) == (2024, 2000)
    mixtral = ModelShape.from_fields(hidden_size=4096, num_layers=32, moe_layers=32, top_k=2, num_kv_heads=8,
                                     head_dim=128)
    assert mixtral.kv_entry_bytes == 2 * 8 * 128 * 2
    dsv3 = ModelShape.from_fields(hidden_size=7168, num_layers=61, moe_layers=58, top_k=8, kv_latent_dim=576)
    assert dsv3.kv_entry_bytes == 576 * 2 and dsv3.attention_layers == 61
    with pytest.raises(InputError, match="num_kv_heads and head_dim"):
        ModelShape.from_fields(hidden_size=8, num_layers=1, moe_layers=1, top_k=1)
    with pytest.raises(InputError, match="model shape hidden_size must be a positive integer"):
        ModelShape(hidden_size=0, top_k=1, moe_layers=1, attention_layers=1, kv_entry_bytes=1)


def test_a2a_two_a2a_by_hand():
    r = simulate(TRACE, PLACEMENT, Strategy.TWO_A2A)
    c = predict(r, model=MODEL, hardware=HW, tokens_per_step=2)    # the trace is one step
    # dispatch: 0 -> 2, 0 -> 3 (inter: rank 0 sends 2 rows = 4048 B), 1 -> 0 (intra, 2024 B)
    inter = 10e-6 + 2 * 2024 / 1e8
    assert c.phase_s["dispatch"] == pytest.approx(max(inter, 10e-6 + 2024 / 1e9))
    assert c.phase_s["combine"] == pytest.approx(10e-6 + 2 * 2000 / 1e8)          # 2 -> 0, 3 -> 0 received by 0
    assert c.phase_s["counts"] == pytest.approx(10e-6 + 2 * 16 / 1e8)             # 2 peers across nodes
    assert c.step_s == pytest.approx(c.phase_s["dispatch"] + c.phase_s["combine"] + c.phase_s["counts"])
    assert c.layer_s == pytest.approx(c.step_s)
    assert c.bottleneck == "inter_node"
    assert c.bytes_per_step["inter_node"] == pytest.approx(2 * 2024 + 2 * 2000 + 4 * 2 * 16)   # + counts
    assert c.collectives_per_step == 3


def test_node_aware_halves_the_bottleneck_bytes_across_nodes():
    r = simulate(TRACE, PLACEMENT, Strategy.TWO_A2A, transport=Transport.NODE_AWARE)
    c = predict(r, model=MODEL, hardware=HW, tokens_per_step=2)
    assert c.phase_s["dispatch"] == pytest.approx(10e-6 + 2024 / 1e8)             # one row 0 -> 2 crosses
    assert c.phase_s["dispatch_intra"] == pytest.approx(10e-6 + 2024 / 1e9)       # 2 -> 3 and 1 -> 0 (stage 1)
    assert c.phase_s["combine"] == pytest.approx(10e-6 + 2000 / 1e8)
    assert c.collectives_per_step == 5
    assert c.bytes_per_step["inter_node"] == pytest.approx(2024 + 2000 + 4 * 2 * 16)


def test_fixed_moves_capacity_rows_and_doubles_on_overflow():
    r = simulate(TRACE, PLACEMENT, Strategy.TWO_A2A, transport=Transport.FIXED)
    c = predict(r, model=MODEL, hardware=HW, tokens_per_step=2, capacity_factor=1.0)
    # capacity: 1 per peer (a pair never needs more here): each rank sends 1 row to its 2 other-node peers
    assert c.phase_s["dispatch"] == pytest.approx(10e-6 + 2 * 2024 / 1e8)
    assert "counts" not in c.phase_s and c.collectives_per_step == 2
    # 4 tokens of the same row: pair (0, 2) needs 2 rows -> rerun with 2 per peer
    big = simulate(_trace([[[2, 3]], [[0, 1]], [[2, 3]], [[0, 1]]], E=4), PLACEMENT, Strategy.TWO_A2A,
                   home_rank_T=np.array([0, 1, 0, 1]), transport=Transport.FIXED)
    c = predict(big, model=MODEL, hardware=HW, tokens_per_step=4, capacity_factor=0.5)
    assert c.phase_s["dispatch"] == pytest.approx(10e-6 + 2 * 2024 / 1e8 + 10e-6 + 4 * 2024 / 1e8)
    assert c.collectives_per_step == 4


def test_coherent_adds_kv_copies_and_sampled_ids():
    opts = SimOptions(attention_layers=1)
    a2a = predict(simulate(TRACE, PLACEMENT, Strategy.COHERENT, options=opts), model=MODEL, hardware=HW,
                  tokens_per_step=2)
    # token 0 attends on rank 0, token 1 on rank 1: each sends its 500 B entry to 3 ranks, 2 of them across
    assert a2a.phase_s["kv_copy"] == pytest.approx(10e-6 + 2 * 500 / 1e8)
    na = predict(simulate(TRACE, PLACEMENT, Strategy.COHERENT, options=opts, transport=Transport.NODE_AWARE),
                 model=MODEL, hardware=HW, tokens_per_step=2)
    # node_aware: 0 -> 2 and 1 -> 3 once across, then inside each node every rank sends the 1 entry it has
    assert na.phase_s["kv_copy"] == pytest.approx(10e-6 + 500 / 1e8 + 10e-6 + 500 / 1e9)
    assert a2a.phase_s["sampled_ids"] == pytest.approx(10e-6 + 8 / 2 * 2 / 1e8)


def test_choose_ranks_and_explains():
    cands = {(Strategy.TWO_A2A, t): simulate(TRACE, PLACEMENT, Strategy.TWO_A2A, transport=t) for t in Transport}
    best, rows, why = choose(cands, model=MODEL, hardware=HW, tokens_per_step=2)
    # bytes bound: node_aware's 4 calls + counts (94.6 us) beat a2a's 3 (110.5 us) and fixed's 2 (100.5 us)
    assert best == (Strategy.TWO_A2A, Transport.NODE_AWARE)
    assert [r["transport"] for r in rows] == ["node_aware", "fixed", "a2a"]
    assert [round(r["step_ms"] * 1e3, 2) for r in rows] == [94.58, 100.48, 110.8]
    assert rows[1]["vs_baseline"] == pytest.approx(100.48 / 110.8, abs=1e-3)
    assert why.startswith("two_a2a+node_aware has the lowest modelled communication time: 0.095 ms per step of 2 "
                          "tokens") and "inter-node link" in why and "runner-up two_a2a+fixed" in why
    fast = HardwareProfile(name="fast-link", intra_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e12),
                           inter_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e12))
    assert choose(cands, model=MODEL, hardware=fast, tokens_per_step=2)[0] == (Strategy.TWO_A2A, Transport.FIXED)


def test_profiles_load_and_refuse_bad_figures(tmp_path):
    h800 = load_profile("h800-ib400")
    assert h800.inter_node.beta_bytes_per_s == 50e9 and h800.intra_node.beta_bytes_per_s == 153e9
    assert all("github.com/deepseek-ai/DeepEP" in s["url"] for s in h800.sources)
    assert "measured 2026-12-02" in load_profile("cpu-gloo").sources[0]["says"]
    shaped = load_profile("shaped:20mbit")
    assert shaped.inter_node.beta_bytes_per_s == 2.5e6 and shaped.inter_node.shared_per_node
    assert parse_rate("5mbps") == 5e6 and parse_rate("1gbit") == 1.25e8
    path = tmp_path / "p.json"
    path.write_text(json.dumps(h800.to_dict()))
    assert load_profile(str(path)) == h800
    with pytest.raises(InputError, match="unknown hardware 'tpu' .known: cpu-gloo, h800-ib400, shaped:RATE"):
        load_profile("tpu")
    for edit, message in [(lambda d: d["inter_node"].pop("beta_bytes_per_s"), "missing figure 'inter_node.beta"),
                          (lambda d: d["intra_node"].update(alpha_s=-1), "intra_node.alpha_s must be a finite "
                                                                         "number >= 0, got -1"),
                          (lambda d: d.update(step_s=-0.5), "step_s must be a finite number >= 0"),
                          (lambda d: d.pop("intra_node"), "missing figure 'intra_node'")]:
        d = h800.to_dict()
        edit(d)
        path.write_text(json.dumps(d))
        with pytest.raises(InputError, match=message):
            load_profile(str(path))
    with pytest.raises(InputError, match="not a tc rate"):
        load_profile("shaped:fast")
