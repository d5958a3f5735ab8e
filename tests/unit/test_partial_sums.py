"""The combine's fixed-order sum of partials (comm/partial_sums.py) against a sequential reference."""

from __future__ import annotations

import pytest
import torch

from comm.partial_sums import fold_partials_, max_partials


def sequential(y_HD, slot_X, y_XD):
    """Own value first, then each partial in arrival order, one Python add at a time."""
    out = y_HD.clone()
    for x in range(len(slot_X)):
        out[slot_X[x]] = out[slot_X[x]] + y_XD[x]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R", [1, 2, 7])
def test_fold_is_own_first_then_arrival_order(dtype, R):
    g = torch.Generator().manual_seed(R)
    H, D, sources = 20, 8, R
    # each source sends at most one partial per row, sources' blocks one after the other (all_to_all order)
    blocks = [torch.randperm(H, generator=g)[:torch.randint(0, H, (1,), generator=g).item()] for _ in range(sources)]
    slot_X = torch.cat(blocks + [torch.full((5,), H)])   # + 5 empty slots: the spare row
    # magnitudes far apart: a different order gives different float bits
    y_XD = (torch.randn(len(slot_X), D, generator=g) * 10.0 ** torch.randint(-4, 5, (len(slot_X), 1),
                                                                               generator=g)).to(dtype)
    y_HD = torch.randn(H + 1, D, generator=g).to(dtype)
    expected = sequential(y_HD, slot_X, y_XD)
    got = fold_partials_(y_HD.clone(), slot_X, y_XD, R)
    assert torch.equal(got[:H], expected[:H])
    # in float32 the CPU's index_add_ (the combine before) adds in the same order: the same bits (in bfloat16
    # it does not round after every term once a row gets >= 3 terms)
    if dtype is torch.float32:
        assert torch.equal(y_HD.clone().index_add_(0, slot_X, y_XD)[:H], got[:H])


def test_order_matters_and_is_by_source():
    y_HD = torch.zeros(2, 1)
    slot_X = torch.tensor([0, 0, 0])
    y_XD = torch.tensor([[1e8], [1.0], [-1e8]])
    assert fold_partials_(y_HD.clone(), slot_X, y_XD, 3)[0].item() == 0.0       # (1e8 + 1) - 1e8 in float32
    assert fold_partials_(y_HD.clone(), slot_X, y_XD[[0, 2, 1]], 3)[0].item() == 1.0


def test_bounds():
    assert [max_partials(k, g) for k, g in ((1, 8), (2, 8), (8, 8), (8, 4), (8, 1))] == [1, 2, 7, 3, 0]
    with pytest.raises(IndexError):   # more partials for a row than the bound: a caller bug, loud
        fold_partials_(torch.zeros(3, 1), torch.tensor([0, 0, 0]), torch.ones(3, 1), 2)
