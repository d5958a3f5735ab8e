"""The routing recorder over real ranks: the trace rank 0 writes holds, for every token the run fed, exactly
the one-process model's routing (experts equal, weights within 1e-5), its vocabulary id, sequence, position
and phase, although each (token, layer) was routed on whichever rank held the token.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.dist._runner_cases import reference, reference_routing


@pytest.mark.dist
@pytest.mark.parametrize("G", [1, 2, 4])
def test_recorded_trace_is_the_one_process_routing(dist_grid, G):
    grid, per_rank = dist_grid(G)
    cases = [(i, c) for i, c in enumerate(grid.runner) if c.record]
    assert len(cases) >= 4
    for i, case in cases:
        res = per_rank[0]["runner"][i]
        trace, is_prefill = res["trace"], res["is_prefill"]
        tokens, _ = reference(case.ckpt, case.prompts, case.max_new_tokens)
        fed = [list(p) + new[:-1] for p, new in zip(case.prompts, tokens)]   # every token the run fed
        ids_L, w_L = reference_routing(case.ckpt, fed)
        row_of = {}
        for s, seq in enumerate(fed):
            for pos in range(len(seq)):
                row_of[(s, pos)] = len(row_of)
        assert trace.num_tokens == len(row_of) and trace.num_layers == len(ids_L), case.name
        got = {(int(s), int(p)): r for r, (s, p) in enumerate(zip(trace.seq_ids_T, trace.positions_T))}
        assert set(got) == set(row_of), case.name
        order = np.array([row_of[k] for k in zip(trace.seq_ids_T.tolist(), trace.positions_T.tolist())])
        for m in range(trace.num_layers):
            np.testing.assert_array_equal(trace.experts_TLK[:, m], ids_L[m][order], err_msg=case.name)
            np.testing.assert_allclose(trace.weights_TLK[:, m], w_L[m][order], atol=1e-5, err_msg=case.name)
        flat = np.array([t for seq in fed for t in seq])
        np.testing.assert_array_equal(trace.token_ids_T, flat[order])
        want = [_fed_as_prefill(len(case.prompts[s]), p, case.prefill_chunk)
                for s, p in zip(trace.seq_ids_T.tolist(), trace.positions_T.tolist())]
        np.testing.assert_array_equal(is_prefill, want, err_msg=case.name)
        assert trace.meta["strategy"] == case.strategy.value


def _fed_as_prefill(prompt_len: int, pos: int, chunk: int | None) -> bool:
    """SeqWork.is_prefill of the step that fed position ``pos``: a prompt chunk starting at 0 or longer than
    one token (a one-token chunk after the first is a decode-shaped step)."""
    if pos >= prompt_len:
        return False
    if chunk is None:
        return True
    start = pos - pos % chunk
    return start == 0 or min(prompt_len, start + chunk) - start > 1


def test_recorder_keeps_only_the_first_max_tokens(tiny_checkpoint, tmp_path):
    from comm.strategy import Strategy
    from comm.topology import EPTopology
    from epserve.engine.builder import build_runner
    from epserve.engine.generate import generate
    from epserve.engine.recorder import load_is_prefill
    from placement.trace import RoutingTrace

    runner = build_runner(tiny_checkpoint("mixtral"), EPTopology.single(), strategy=Strategy.COHERENT,
                          record_tokens=6)
    generate(runner, [[5, 6, 7, 8], [9, 10]], 3)          # feeds 4 + 2 prompt tokens, then 2 x 2 decode tokens
    runner.recorder.save(runner.coll, tmp_path / "t.npz")
    trace = RoutingTrace.load(tmp_path / "t.npz")
    assert trace.num_tokens == 6 and runner.recorder.full
    assert trace.seq_ids_T.tolist() == [0, 0, 0, 0, 1, 1] and trace.positions_T.tolist() == [0, 1, 2, 3, 0, 1]
    assert trace.token_ids_T.tolist() == [5, 6, 7, 8, 9, 10] and load_is_prefill(tmp_path / "t.npz").all()
    assert (trace.experts_TLK >= 0).all() and trace.meta["source"] == "epserve recorder"
