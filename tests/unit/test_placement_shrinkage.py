"""Shrinkage strength by cross-validation inside the fit part; the CLI option; its FLAME figures skip cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from launch.cli import main
from placement import ClusterShape, InputError, Placement, RoutingTrace
from placement.simulate import Strategy, simulate
from placement.solvers import SolveOptions, solve
from placement.solvers.shrinkage import choose_shrink, fold_rows, top1_cross_gpu_rate
from placement.stats import StatsOptions, compute_stats
from placement.synthetic import SyntheticSpec, synthetic_trace


def _trace(**kw):
    spec = dict(num_tokens=600, num_layers=4, num_experts=16, top_k=2, num_clusters=4, noise=0.3, seed=3)
    return synthetic_trace(SyntheticSpec(**{**spec, **kw}))


def test_folds_keep_sequences_whole_and_partition_the_tokens():
    experts = np.zeros((7, 2, 1), dtype=np.int16)
    seq = np.array([5, 5, 9, 9, 9, 2, 7], dtype=np.int32)
    trace = RoutingTrace(experts, np.ones(experts.shape, np.float32), 4, seq_ids_T=seq)
    masks, by = fold_rows(trace, 2)
    assert by == "sequences"
    # sequences in order of first appearance 5, 9, 2, 7 -> folds 0, 1, 0, 1
    assert masks[0].tolist() == [True, True, False, False, False, True, False]
    assert (masks[0] ^ masks[1]).all()
    blocks, by = fold_rows(RoutingTrace(experts, np.ones(experts.shape, np.float32), 4), 3)
    assert by == "token blocks" and [m.nonzero()[0].tolist() for m in blocks] == [[0, 1], [2, 3, 4], [5, 6]]


def test_top1_rate_equals_the_simulator():
    trace = _trace()
    p = solve(compute_stats(trace), ClusterShape(gpus_per_node=4), SolveOptions(restarts=1, rounds=5))
    assert top1_cross_gpu_rate(trace, p.expert_to_gpu_LE) == pytest.approx(
        simulate(trace, p, Strategy.COHERENT).top1_cross_gpu_rate)


def test_cross_validation_shrinks_few_noisy_tokens_and_not_plenty_of_clean_ones():
    """Few tokens of a noisy trace: some shrinkage wins the held-in folds; with no noise at all every pair
    count is the true pattern and shrinking only blurs it, so the strength chosen is 0."""
    cluster = ClusterShape(gpus_per_node=4)
    noisy = choose_shrink(_trace(num_tokens=300, noise=0.8), cluster)      # measured: 0.722 at 0 .. 0.690 at 0.75
    assert noisy.strength == 0.75 and noisy.scores[0.75] < noisy.scores[0.0]
    clean = choose_shrink(_trace(num_tokens=1200, noise=0.0), cluster, candidates=(0.0, 0.5, 0.9), score="objective")
    assert clean.strength == 0.0 and clean.scores[0.0] > clean.scores[0.9]
    assert clean.folds == 3 and clean.fold_by == "token blocks" and len(clean.fold_scores[0.5]) == 3
    d = clean.to_dict()
    assert d["strength"] == 0.0 and set(d["scores"]) == {"0.0", "0.5", "0.9"} and "3-fold" in d["chosen_by"]
    top1 = choose_shrink(_trace(num_tokens=1200, noise=0.0), cluster, candidates=(0.0, 0.9))
    assert top1.score == "top1" and top1.scores[0.0] <= top1.scores[0.9]
    with pytest.raises(InputError, match="candidates must be numbers in"):
        choose_shrink(_trace(), cluster, candidates=(2.0,))
    with pytest.raises(InputError, match="at least 2 folds"):
        choose_shrink(_trace(num_tokens=600).select(slice(0, 3)), cluster)


def test_place_shrink_auto_records_the_choice(tmp_path, capsys):
    path = tmp_path / "syn.npz"
    _trace().save(path)
    out = tmp_path / "p.json"
    rc = main(["place", "--trace", str(path), "--gpus-per-node", "4", "--held-out", "0.25", "--shrink", "auto",
               "--restarts", "1", "--rounds", "5", "--no-anchors", "-o", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0 and "shrink: choosing the strength" in err
    p = Placement.load(out)
    assert p.solver["shrink"]["strength"] in (0.0, 0.1, 0.25, 0.5, 0.75)
    assert p.objective["surrogate"]["shrink"] == p.solver["shrink"]["strength"]
    assert "scores" in p.solver["shrink"]
    rc = main(["place", "--trace", str(path), "--gpus-per-node", "4", "--shrink", "0.3", "--restarts", "1",
               "--rounds", "5", "--no-anchors", "-o", str(out)])
    capsys.readouterr()
    assert rc == 0 and Placement.load(out).objective["surrogate"]["shrink"] == 0.3
    assert Placement.load(out).solver["shrink"] == {"strength": 0.3, "chosen_by": "--shrink"}
    with pytest.raises(SystemExit) as exc:
        main(["place", "--trace", str(path), "--gpus-per-node", "4", "--shrink", "lots", "-o", str(out)])
    assert exc.value.code == 2 and "--shrink must be auto or a number in [0, 1], got 'lots'" in capsys.readouterr().err


def test_flame_shrinkage_choice_runs_on_a_short_prefix(flame_encoder_trace_path):
    fit, _ = RoutingTrace.load(flame_encoder_trace_path).split(0.6)
    choice = choose_shrink(fit.select(slice(0, 256)), ClusterShape(gpus_per_node=8), StatsOptions())
    assert choice.strength in choice.scores and all(0.0 < s < 1.0 for s in choice.scores.values())
