"""The rule that names the default tokenizer (sidserve/eval/default_rule.py), on figures
whose shortfalls are computed by hand."""

import numpy as np
import pytest

from sidserve.eval.default_rule import CELLS, choose_default, figures_from_results


def _cells(all_value, tail_value, seeds=3):
    """Every 'all' cell at all_value, every 'tail' cell at tail_value, the same at each seed."""
    return {c: [all_value if c[2] == "all" else tail_value] * seeds for c in CELLS}


def test_the_smallest_worst_shortfall_wins_not_the_best_mean():
    # a leads every 'all' cell by 10%, b leads every tail cell by 1/6 of its value
    figs = {"beauty": {"a": _cells(1.0, 0.5), "b": _cells(0.9, 0.6)}}
    r = choose_default(figs)
    assert r.scores["a"] == pytest.approx((0.6 - 0.5) / 0.6) and r.scores["b"] == pytest.approx(0.1)
    assert r.default == "b"
    assert r.cells[("beauty", "ranking", "gauc", "tail")]["best"] == "b"


def test_the_worst_cell_is_taken_over_both_regimes():
    # level on Beauty; in the weak regime b is 40% behind on the tail, a 20% behind overall
    figs = {"beauty": {"a": _cells(1.0, 1.0), "b": _cells(1.0, 1.0)},
            "weak": {"a": _cells(0.8, 1.0), "b": _cells(1.0, 0.6)}}
    r = choose_default(figs)
    assert r.scores == pytest.approx({"a": 0.2, "b": 0.4})
    assert r.default == "a"


def test_a_gap_under_one_standard_error_counts_as_zero():
    figs = {"r": {"a": _cells(1.0, 1.0), "b": _cells(1.0, 1.0)}}
    for c in CELLS:
        figs["r"]["a"][c] = [1.0, 1.2]  # mean 1.1, se = std(ddof=1) / sqrt(2) = 0.1
        figs["r"]["b"][c] = [1.05, 1.05]  # 0.05 behind: under the noise
    r = choose_default(figs, churn={"a": 0.05, "b": 0.01})
    assert r.scores == {"a": 0.0, "b": 0.0}
    assert r.default == "b"  # the tie goes to the lower churn
    figs["r"]["b"] = {c: [0.8, 0.8] for c in CELLS}  # 0.3 behind, 3 standard errors: counts
    r = choose_default(figs)
    assert r.scores["b"] == pytest.approx(0.3 / 1.1) and r.default == "a"


def test_one_seed_has_no_error_estimate_so_every_gap_counts():
    r = choose_default({"r": {"a": _cells(1.0, 1.0, seeds=1), "b": _cells(0.999, 0.999, seeds=1)}})
    assert r.scores["b"] == pytest.approx(0.001) and r.default == "a"


def test_an_ineligible_candidate_is_scored_but_never_chosen():
    figs = {"r": {"a": _cells(1.0, 1.0), "b": _cells(0.5, 0.5)}}
    r = choose_default(figs, ineligible={"a": "churn 8.8% on one seed"})
    assert r.default == "b" and r.scores["a"] == 0.0 and r.scores["b"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no eligible candidate"):
        choose_default(figs, ineligible={"a": "x", "b": "y"})


def test_ties_without_churn_go_by_name_and_bad_figures_are_refused():
    figs = {"r": {"b": _cells(1.0, 1.0), "a": _cells(1.0, 1.0)}}
    assert choose_default(figs).default == "a"
    with pytest.raises(ValueError, match="every candidate must be measured in every regime"):
        choose_default({"r": {"a": _cells(1, 1)}, "s": {"b": _cells(1, 1)}})
    broken = _cells(1.0, 1.0)
    del broken[CELLS[1]]
    with pytest.raises(ValueError, match="has no validation figures"):
        choose_default({"r": {"a": broken}})
    with pytest.raises(ValueError, match="positive best"):
        choose_default({"r": {"a": _cells(0.0, 0.0)}})


def test_figures_are_read_from_a_results_file():
    def stage(values):
        return {"valid_groups": {g: {m: {"values": values} for m in ("ndcg@10", "gauc")} for g in ("all", "tail")}}
    results = {"tokenizers": {"x": {"sid_sasrec": stage([0.1, 0.2]), "ranking": stage([0.7, 0.8])}}}
    f = figures_from_results(results)
    assert f["x"][("ranking", "gauc", "tail")] == [0.7, 0.8] and len(f["x"]) == len(CELLS)
    with pytest.raises(ValueError, match="not in the results"):
        figures_from_results(results, ["y"])
    del results["tokenizers"]["x"]["ranking"]["valid_groups"]
    with pytest.raises(ValueError, match="predate per-group validation"):
        figures_from_results(results)


# ---- sidserve select's rule (issue 48): keep the default unless clearly beaten everywhere ----

def _per_seed(*values):
    """The same per-seed values in every cell."""
    return {cell: list(values) for cell in CELLS}


def test_select_keeps_the_default_unless_a_candidate_beats_it_everywhere_by_two_se():
    from sidserve.eval.default_rule import choose_for_catalog

    default = _per_seed(0.100, 0.110, 0.105)
    clear = _per_seed(0.111, 0.122, 0.116)  # + 0.011, 0.012, 0.011: mean 0.01133, sd 0.000577
    figs = {"d": default, "clear": clear, "partial": {**clear, CELLS[3]: default[CELLS[3]]}}
    r = choose_for_catalog(figs, default="d")
    assert (r.chosen, r.runner_up) == ("clear", "d")
    cell = r.cells["clear"][CELLS[0]]
    d = np.array([0.011, 0.012, 0.011])
    assert cell["diff"] == pytest.approx(d.mean()) and cell["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert cell["beats"] and cell["in_se"] == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(3)))
    # ahead on three cells, level on the fourth: not enough
    assert not r.cells["partial"][CELLS[3]]["beats"] and r.cells["partial"][CELLS[3]]["diff"] == 0
    assert choose_for_catalog({"d": default, "partial": figs["partial"]}, default="d").chosen == "d"
    # a lead of under 2 se on one cell keeps the default: noisy = + 0.011, 0.001, 0.021 (mean 0.011, se 0.0058)
    noisy = {**clear, CELLS[2]: [0.111, 0.111, 0.126]}
    r = choose_for_catalog({"d": default, "noisy": noisy}, default="d")
    assert r.chosen == "d" and r.runner_up == "noisy" and "kept" in r.reason
    # one seed has no error estimate: nothing beats the default
    r = choose_for_catalog({"d": _per_seed(0.1), "x": _per_seed(0.2)}, default="d")
    assert r.chosen == "d" and "one seed" in r.reason and r.cells["x"][CELLS[0]]["se"] is None
    with pytest.raises(ValueError, match="must be among the candidates"):
        choose_for_catalog({"x": clear}, default="d")
    with pytest.raises(ValueError, match="same number of seeds"):
        choose_for_catalog({"d": default, "x": _per_seed(0.1, 0.2)}, default="d")
