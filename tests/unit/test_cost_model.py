"""The cost model (placement/cost_model.py) and hardware profiles (placement/hardware.py) against hand-computed
values."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from placement import ClusterShape, InputError, Placement, RoutingTrace
from placement.cost_model import (WIRE_CF21B95, ModelShape, choose, counts_per_peer, plan_frame_bytes,
                                  predict)
from placement.hardware import HardwareProfile, LinkProfile, load_profile, parse_rate, shaped_profile
from placement.simulate import SimOptions, Strategy, simulate
from placement.transport import Transport

# alpha 10 us on both classes, 1 GB/s inside a node, 0.1 GB/s across: easy arithmetic.
HW = HardwareProfile(name="toy", intra_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e9),
                     inter_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e8))
# hidden 1000 x 2 B; top-2: a dispatch row is 2000 + 2 x 12 + 8 = 2032 B, a combine row 4 + 2000 = 2004 B.
MODEL = ModelShape(hidden_size=1000, top_k=2, moe_layers=1, attention_layers=1, kv_entry_bytes=500)


def _trace(experts, E):
    e = np.array(experts, dtype=np.int16)
    return RoutingTrace(e, np.full(e.shape, 0.5, np.float32), E, None, None, None)


# 2 nodes x 2 GPUs, expert e on GPU e; token 0 (home 0) uses experts 2, 3 (node 1); token 1 (home 1) 0, 1.
PLACEMENT = Placement(np.array([[0, 1, 2, 3]]), ClusterShape(nodes=2, gpus_per_node=2))
TRACE = _trace([[[2, 3]], [[0, 1]]], E=4)


def test_model_shape_rows_and_constructors():
    # hidden 1000 x 2 B + 2 experts x (id, weight, chosen copy: 12 B) + token + anchor; combine: + token
    assert (MODEL.dispatch_row_bytes, MODEL.combine_row_bytes) == (2032, 2004)
    mixtral = ModelShape.from_fields(hidden_size=4096, num_layers=32, moe_layers=32, top_k=2, num_kv_heads=8,
                                     head_dim=128)
    assert mixtral.kv_entry_bytes == 2 * 8 * 128 * 2
    dsv3 = ModelShape.from_fields(hidden_size=7168, num_layers=61, moe_layers=58, top_k=8, kv_latent_dim=576)
    assert dsv3.kv_entry_bytes == 576 * 2 and dsv3.attention_layers == 61
    with pytest.raises(InputError, match="num_kv_heads and head_dim"):
        ModelShape.from_fields(hidden_size=8, num_layers=1, moe_layers=1, top_k=1)
    with pytest.raises(InputError, match="model shape hidden_size must be a positive integer"):
        ModelShape(hidden_size=0, top_k=1, moe_layers=1, attention_layers=1, kv_entry_bytes=1)


# Per step, every strategy: the plan broadcast (2 sequences: a 128 B frame; gloo's binomial tree 0 -> 1, 0 -> 2,
# 1 -> 3: ranks 0 and 1 each send 128 B across) and the sampled-id all-gather ((2 + 1) int64 = 24 B per rank;
# ring r -> r + 1 carries 3 x 24 = 72 B an edge, 1 -> 2 and 3 -> 0 cross).
PLAN_S = 10e-6 + 128 / 1e8
SAMPLED_S = 10e-6 + 72 / 1e8
PER_STEP_INTER_B = 2 * 128 + 2 * 72


def test_a2a_two_a2a_by_hand():
    r = simulate(TRACE, PLACEMENT, Strategy.TWO_A2A)
    c = predict(r, model=MODEL, hardware=HW, tokens_per_step=2)    # the trace is one step
    # dispatch: 0 -> 2, 0 -> 3 (inter: rank 0 sends 2 rows = 4064 B), 1 -> 0 (intra, 2032 B)
    inter = 10e-6 + 2 * 2032 / 1e8
    assert c.phase_s["dispatch"] == pytest.approx(max(inter, 10e-6 + 2032 / 1e9))
    assert c.phase_s["combine"] == pytest.approx(10e-6 + 2 * 2004 / 1e8)          # 2 -> 0, 3 -> 0 received by 0
    assert c.phase_s["counts"] == pytest.approx(10e-6 + 2 * 8 / 1e8)              # one int64 to each of 2 peers
    assert c.phase_s["plan"] == pytest.approx(PLAN_S) and c.phase_s["sampled_ids"] == pytest.approx(SAMPLED_S)
    assert c.layer_s == pytest.approx(c.phase_s["dispatch"] + c.phase_s["combine"] + c.phase_s["counts"])
    assert c.step_s == pytest.approx(c.layer_s + PLAN_S + SAMPLED_S)
    assert c.bottleneck == "inter_node"
    assert c.bytes_per_step["inter_node"] == pytest.approx(2 * 2032 + 2 * 2004 + 4 * 2 * 8 + PER_STEP_INTER_B)
    assert c.payload_bytes_per_step == c.bytes_per_step        # this profile has no per-message overhead
    # every call connects all 8 cross-node pairs (3 all-to-alls), the tree 2, the ring 2 edges x 2 x (G - 1)
    assert c.messages_per_step["inter_node"] == 3 * 8 + 2 + 2 * 6
    assert c.collectives_per_step == 5


def test_message_and_byte_overhead_on_a_shared_link():
    hw = HardwareProfile(name="toy-tcp", intra_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e9),
                         inter_node=LinkProfile(alpha_s=10e-6, beta_bytes_per_s=1e8, shared_per_node=True,
                                                message_overhead_bytes=100, payload_overhead=0.5))
    c = predict(simulate(TRACE, PLACEMENT, Strategy.TWO_A2A), model=MODEL, hardware=hw, tokens_per_step=2)
    # dispatch: node 0 sends 2 rows x 2032 B x 1.5 + its 4 cross pairs x 100 B (half of each direction's 8
    # messages' overhead goes each way: 4 x (100 + 100) / 2); node 1 sends only that overhead
    assert c.phase_s["dispatch"] == pytest.approx(10e-6 + (2 * 2032 * 1.5 + 4 * 100) / 1e8)
    # counts: nothing but overhead besides 8 B a pair: node 0 sends 4 x (8 x 1.5 + 100)
    assert c.phase_s["counts"] == pytest.approx(10e-6 + 4 * (8 * 1.5 + 100) / 1e8)
    messages = 3 * 8 + 2 + 12
    payload = 2 * 2032 + 2 * 2004 + 4 * 2 * 8 + PER_STEP_INTER_B
    assert c.messages_per_step["inter_node"] == messages
    assert c.payload_bytes_per_step["inter_node"] == pytest.approx(payload)
    assert c.bytes_per_step["inter_node"] == pytest.approx(payload * 1.5 + messages * 100)


def test_token_bucket_link_hides_compute_and_serves_the_busiest_direction():
    hw = HardwareProfile(name="toy-tbf", intra_node=LinkProfile(alpha_s=0.0, beta_bytes_per_s=1e9),
                         inter_node=LinkProfile(alpha_s=0.0, beta_bytes_per_s=1e5, shared_per_node=True,
                                                burst_bytes=1000), step_fixed_s=0.01)
    c = predict(simulate(TRACE, PLACEMENT, Strategy.TWO_A2A), model=MODEL, hardware=hw, tokens_per_step=2)
    # node 0 sends: dispatch 4064 + counts 4 x 8 + plan 2 x 128 + ring edge 1 -> 2 72 = 4424 B over the step
    # (it receives 2 x 2004 + 32 + 72 = 4112); 5 calls may refill 5 buckets, more than the 10 ms of compute
    assert c.phase_s["compute"] == 0.01
    assert c.step_s == pytest.approx(0.01 + 4424 / 1e5 - 0.01)
    slow = replace(hw, step_fixed_s=0.1)                       # compute-bound: the link fits in the compute
    assert predict(simulate(TRACE, PLACEMENT, Strategy.TWO_A2A), model=MODEL, hardware=slow,
                   tokens_per_step=2).step_s == pytest.approx(0.1)
    plain = replace(hw, inter_node=replace(hw.inter_node, burst_bytes=0))   # no bucket: calls add up
    p = predict(simulate(TRACE, PLACEMENT, Strategy.TWO_A2A), model=MODEL, hardware=plain, tokens_per_step=2)
    assert p.step_s == pytest.approx(0.01 + (4064 + 4008 + 32 + 256 + 72) / 1e5)
    assert "inter_node_bucket" not in p.phase_s


def test_plan_frame_and_counts_widths():
    # epserve/engine/control.py encodes an 8-sequence decode plan in 118 B: a 192 B frame; 32 sequences: 448 B
    assert [plan_frame_bytes(w) for w in (1, 8, 16, 32)] == [128, 192, 256, 448]
    kw = dict(gpus_per_node=2, world_size=4, tokens_per_step=8)
    assert counts_per_peer(Transport.A2A, tokens_move=False, needs_combine=True, **kw) == 1
    assert counts_per_peer(Transport.NODE_AWARE, tokens_move=False, needs_combine=True, **kw) == 1 + 2 * 2
    assert counts_per_peer(Transport.A2A, tokens_move=True, needs_combine=True, **kw) == 1 + 2 * 4 + 1
    assert counts_per_peer(Transport.NODE_AWARE, tokens_move=True, needs_combine=True, **kw) == 1 + 4 + 4 + 8 + 1
    assert counts_per_peer(Transport.A2A, tokens_move=True, needs_combine=True, gpus_per_node=2, world_size=4,
                           tokens_per_step=125) == 1 + 8 + 3                 # ceil(125 / 62) bitmap words
    assert counts_per_peer(Transport.A2A, tokens_move=True, needs_combine=False, **kw) == 1 + 1
    # before e4301f5 every later stage sent 2G counts, the mirrored combine included
    assert counts_per_peer(Transport.A2A, tokens_move=False, needs_combine=True, wire=WIRE_CF21B95, **kw) == 9
    assert counts_per_peer(Transport.NODE_AWARE, tokens_move=False, needs_combine=True, wire=WIRE_CF21B95,
                           **kw) == 1 + 3 * 8


def test_node_aware_halves_the_bottleneck_bytes_across_nodes():
    r = simulate(TRACE, PLACEMENT, Strategy.TWO_A2A, transport=Transport.NODE_AWARE)
    c = predict(r, model=MODEL, hardware=HW, tokens_per_step=2)
    assert c.phase_s["dispatch"] == pytest.approx(10e-6 + 2032 / 1e8)             # one row 0 -> 2 crosses
    assert c.phase_s["dispatch_intra"] == pytest.approx(10e-6 + 2032 / 1e9)       # 2 -> 3 and 1 -> 0 (stage 1)
    assert c.phase_s["combine"] == pytest.approx(10e-6 + 2004 / 1e8)
    assert c.phase_s["counts"] == pytest.approx(10e-6 + 2 * 5 * 8 / 1e8)          # 1 + 2P int64 per peer
    assert c.collectives_per_step == 5 + 2
    assert c.bytes_per_step["inter_node"] == pytest.approx(2032 + 2004 + 4 * 2 * 5 * 8 + PER_STEP_INTER_B)
    # dispatch, combine and counts connect the 8 cross pairs; the in-node stages run on the nodes' own groups
    assert c.messages_per_step["inter_node"] == 3 * 8 + 2 + 12
    old = predict(r, model=MODEL, hardware=HW, tokens_per_step=2, wire=WIRE_CF21B95)
    assert old.messages_per_step["inter_node"] == 5 * 8 + 2 + 12                   # on the world group: all pairs
    assert old.phase_s["counts"] == pytest.approx(10e-6 + 2 * 25 * 8 / 1e8)


def test_fixed_moves_capacity_rows_in_steady_state():
    r = simulate(TRACE, PLACEMENT, Strategy.TWO_A2A, transport=Transport.FIXED)
    c = predict(r, model=MODEL, hardware=HW, tokens_per_step=2, capacity_factor=1.0)
    # capacity: 1 per peer (a pair never needs more here): each rank sends 1 row to its 2 other-node peers
    assert c.phase_s["dispatch"] == pytest.approx(10e-6 + 2 * 2032 / 1e8)
    assert "counts" not in c.phase_s and c.collectives_per_step == 2 + 2
    # 4 tokens of the same row: pair (0, 2) needs 2 rows: the runtime doubled its factor until they fit (0.5 ->
    # 4: capacity 2) and kept it, so a steady step moves 2 rows to every peer once
    big = simulate(_trace([[[2, 3]], [[0, 1]], [[2, 3]], [[0, 1]]], E=4), PLACEMENT, Strategy.TWO_A2A,
                   home_rank_T=np.array([0, 1, 0, 1]), transport=Transport.FIXED)
    c = predict(big, model=MODEL, hardware=HW, tokens_per_step=4, capacity_factor=0.5)
    assert c.phase_s["dispatch"] == pytest.approx(10e-6 + 2 * 2 * 2032 / 1e8)
    assert c.collectives_per_step == 2 + 2


def test_coherent_adds_kv_copies_and_sampled_ids():
    opts = SimOptions(attention_layers=1)
    a2a = predict(simulate(TRACE, PLACEMENT, Strategy.COHERENT, options=opts), model=MODEL, hardware=HW,
                  tokens_per_step=2)
    # token 0 attends on rank 0, token 1 on rank 1: each sends its row (8 B token + group, 500 B entry) to 3
    # ranks, 2 of them across
    assert a2a.phase_s["kv_copy"] == pytest.approx(10e-6 + 2 * 508 / 1e8)
    na = predict(simulate(TRACE, PLACEMENT, Strategy.COHERENT, options=opts, transport=Transport.NODE_AWARE),
                 model=MODEL, hardware=HW, tokens_per_step=2)
    # node_aware: 0 -> 2 and 1 -> 3 once across, then inside each node every rank sends the 1 row it has
    assert na.phase_s["kv_copy"] == pytest.approx(10e-6 + 508 / 1e8 + 10e-6 + 508 / 1e9)
    # the gather carries W + Y + 1 = 2 + 1 + 1 int64 per rank: 3 x 32 B an edge of the ring
    assert a2a.phase_s["sampled_ids"] == pytest.approx(10e-6 + 3 * 32 / 1e8)
    # counts when tokens move: 1 + 2G + 1 bitmap word per peer
    assert a2a.phase_s["counts"] == pytest.approx(10e-6 + 2 * 10 * 8 / 1e8)


def test_choose_ranks_and_explains():
    cands = {(Strategy.TWO_A2A, t): simulate(TRACE, PLACEMENT, Strategy.TWO_A2A, transport=t) for t in Transport}
    best, rows, why = choose(cands, model=MODEL, hardware=HW, tokens_per_step=2)
    # bytes bound: node_aware's 4 calls + counts beat fixed's 2 and a2a's 2 + counts; each adds the plan
    # broadcast and the sampled-id gather (22.0 us). a2a: 50.64 + 50.08 + 10.16 + 22.0 = 132.88 us
    assert best == (Strategy.TWO_A2A, Transport.NODE_AWARE)
    assert [r["transport"] for r in rows] == ["node_aware", "fixed", "a2a"]
    assert [round(r["step_ms"] * 1e3, 2) for r in rows] == [117.2, 122.72, 132.88]
    assert rows[1]["vs_baseline"] == pytest.approx(122.72 / 132.88, abs=1e-3)
    assert why.startswith("two_a2a+node_aware has the lowest modelled communication time: 0.117 ms per step of 2 "
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
    # measured by bench/link_overhead.py: 399 B a cross-node message, 1.0153 B a payload byte; tbf's 16 KiB burst
    assert (shaped.inter_node.message_overhead_bytes, shaped.inter_node.payload_overhead,
            shaped.inter_node.burst_bytes) == (399.0, 0.0153, 16384)
    assert any("bench/link_overhead.py" in s["url"] for s in shaped.sources)
    fixed = shaped_profile(125000, step_fixed_s=0.073)      # a measured compute part: alphas are inside it
    assert fixed.step_fixed_s == 0.073 and fixed.inter_node.alpha_s == 0 and fixed.intra_node.alpha_s == 0
    assert HardwareProfile.from_dict(fixed.to_dict()) == fixed
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
                          (lambda d: d["inter_node"].update(message_overhead_bytes=-1),
                           "inter_node.message_overhead_bytes must be a finite number >= 0"),
                          (lambda d: d.pop("intra_node"), "missing figure 'intra_node'")]:
        d = h800.to_dict()
        edit(d)
        path.write_text(json.dumps(d))
        with pytest.raises(InputError, match=message):
            load_profile(str(path))
    with pytest.raises(InputError, match="not a tc rate"):
        load_profile("shaped:fast")
