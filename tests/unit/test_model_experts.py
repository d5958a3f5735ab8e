"""The grouped experts (one sort, grouped matmuls, no per-expert loop) against a plain per-expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import epserve.model.experts as experts_mod
from epserve.model.experts import GroupedExperts

E, N = 16, 37
HELD = (0, 2, 3, 5, 8, 9, 11, 15)


def make(D: int, I: int, held=HELD, seed: int = 0, dtype=torch.float32) -> GroupedExperts:
    g = torch.Generator().manual_seed(seed)
    m = GroupedExperts(D, I, held, E)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.randn(len(held), 2 * I, D, generator=g) * D ** -0.5)
        m.down_proj.copy_(torch.randn(len(held), D, I, generator=g) * I ** -0.5)
    return m.to(dtype)


def routing(K: int, D: int, seed: int = 1, dtype=torch.float32):
    """x_ND, distinct ids per row (some not held), float32 weights, use_NK with ~20% False."""
    g = torch.Generator().manual_seed(seed)
    x_ND = torch.randn(N, D, generator=g).to(dtype)
    ids_NK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    return x_ND, ids_NK, torch.rand(N, K, generator=g), torch.rand(N, K, generator=g) < 0.8


def per_expert_loop(m: GroupedExperts, x_ND, ids_NK, w_NK, use_NK, weights_in_model_dtype: bool):
    """The straightforward reference: for each held expert, its rows (in (n, k) order), F.linear, weighted."""
    N, K = ids_NK.shape
    y_NKD = x_ND.new_zeros(N, K, x_ND.shape[1])
    for e in m.expert_ids:
        n_M, k_M = torch.nonzero((ids_NK == e) & use_NK, as_tuple=True)
        w = m.expert_weights(e)
        x_MD = x_ND[n_M]
        h_MI = F.silu(F.linear(x_MD, w["gate_proj.weight"])) * F.linear(x_MD, w["up_proj.weight"])
        out_MD = F.linear(h_MI, w["down_proj.weight"])
        w_M = w_NK[n_M, k_M]
        if weights_in_model_dtype:
            w_M = w_M.to(out_MD.dtype)
        y_NKD[n_M, k_M] = (out_MD * w_M[:, None]).to(x_ND.dtype)
    return y_NKD


@pytest.fixture(params=["grouped_mm", "padded"])
def path(request, monkeypatch):
    if request.param == "padded":
        monkeypatch.setattr(experts_mod, "grouped_mm_supported", lambda *a: False)
    return request.param


@pytest.mark.parametrize("K", [1, 2, 8])
@pytest.mark.parametrize("in_model_dtype", [True, False])
def test_grouped_equals_the_per_expert_loop_fp32(K, in_model_dtype, path):
    m = make(32, 24)
    x, ids, w, use = routing(K, 32)
    assert path == "padded" or experts_mod.grouped_mm_supported(x, m.gate_up_proj, m.down_proj)
    y = m.weighted_outputs(x, ids, w, use, weights_in_model_dtype=in_model_dtype)
    ref = per_expert_loop(m, x, ids, w, use, in_model_dtype)
    assert y.shape == (N, K, 32) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    # exact: a choice not used, or whose expert is not held, is 0 (masked with where, never computed)
    dead = ~use | ~torch.isin(ids, torch.tensor(HELD))
    assert dead.any() and (y[dead] == 0).all()
    assert (y[~dead].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("K", [1, 2, 8])
def test_bfloat16_runs_and_follows_the_dtype_rule(K, path):
    m32 = make(32, 24)
    m16 = make(32, 24, dtype=torch.bfloat16)
    x, ids, w, use = routing(K, 32)
    for in_model_dtype in (True, False):
        y = m16.weighted_outputs(x.bfloat16(), ids, w, use, weights_in_model_dtype=in_model_dtype)
        assert y.dtype == torch.bfloat16
        ref = per_expert_loop(m16, x.bfloat16(), ids, w, use, in_model_dtype)
        torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)
        ref32 = per_expert_loop(m32, x, ids, w, use, in_model_dtype)
        torch.testing.assert_close(y.float(), ref32, atol=6e-2, rtol=6e-2)


def test_results_do_not_depend_on_the_other_experts_held():
    """Exact: a rank holding a subset computes its experts' (row, k) outputs with the same bits as a rank
    holding every expert, given the same rows (each group is its own matmul over the same rows)."""
    full = make(32, 24, held=range(E))
    part = GroupedExperts(32, 24, HELD, E)
    with torch.no_grad():
        idx = torch.tensor(HELD)
        part.gate_up_proj.copy_(full.gate_up_proj[idx])
        part.down_proj.copy_(full.down_proj[idx])
    x, ids, w, _ = routing(8, 32)
    use = torch.isin(ids, idx)
    y_full = full.weighted_outputs(x, ids, w, use, weights_in_model_dtype=True)
    y_part = part.weighted_outputs(x, ids, w, torch.ones_like(use), weights_in_model_dtype=True)
    assert torch.equal(y_full, y_part)


def test_unaligned_widths_fall_back_to_the_padded_batch():
    m = make(6, 5)   # 24- and 20-byte rows: torch._grouped_mm needs multiples of 16 bytes
    x, ids, w, use = routing(2, 6)
    assert not experts_mod.grouped_mm_supported(x, m.gate_up_proj, m.down_proj)
    torch.testing.assert_close(m.weighted_outputs(x, ids, w, use, weights_in_model_dtype=True),
                               per_expert_loop(m, x, ids, w, use, True), atol=1e-6, rtol=0)


def test_no_expert_held_and_no_rows():
    m = make(32, 24, held=())
    x, ids, w, use = routing(2, 32)
    assert torch.equal(m.weighted_outputs(x, ids, w, use, weights_in_model_dtype=True), torch.zeros(N, 2, 32))
    m = make(32, 24)
    y = m.weighted_outputs(x[:0], ids[:0], w[:0], use[:0], weights_in_model_dtype=True)
    assert y.shape == (0, 2, 32)


def test_missing_expert_names_the_smallest_used_id_not_held():
    m = make(32, 24)
    ids = torch.tensor([[0, 4], [7, 2]])
    assert m.missing_expert(ids, torch.tensor([[True, False], [False, True]])) is None
    assert m.missing_expert(ids, torch.ones(2, 2, dtype=torch.bool)) == 4
    assert m.expert_ids == HELD and m.local_of_global_E[[0, 4, 15]].tolist() == [0, -1, 7]
