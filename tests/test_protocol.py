"""The selection protocol against brute force and hand-worked cases."""
import itertools

import numpy as np
import pandas as pd
import pytest

from profit_bench import protocol as P


def _brute_front(pts, hib):
    m = P.to_maximize(pts, (hib, hib))
    out = []
    for i, a in enumerate(m):
        dominated = any((b >= a).all() and (b > a).any() for j, b in enumerate(m) if j != i)
        out.append(np.isfinite(a).all() and not dominated)
    return np.array(out)


@pytest.mark.parametrize("hib", [True, False])
def test_pareto_mask_matches_brute_force(hib):
    rng = np.random.default_rng(0)
    for _ in range(50):
        pts = rng.integers(0, 5, size=(12, 2)).astype(float)  # many ties
        pts[rng.random(12) < 0.1, 0] = np.nan
        assert (P.pareto_mask(pts, (hib, hib)) == _brute_front(pts, hib)).all()


def test_hypervolume_by_hand_and_by_grid():
    # maximize: points (3,1), (1,3), (2,2) over ref (0,0): union of rectangles = 3+3+4-... count unit cells
    pts = np.array([[3, 1], [1, 3], [2, 2]], float)
    cells = sum(1 for x, y in itertools.product(range(3), range(3))
                if any(px >= x + 1 and py >= y + 1 for px, py in pts))
    assert P.hypervolume(pts, (0, 0), (True, True)) == cells == 6
    # minimization: same geometry mirrored
    assert P.hypervolume(-pts, (0, 0), (False, False)) == 6


def _sweep(hib=False):
    return pd.DataFrame(dict(
        arm=["full", "full", "full", "profit", "profit", "profit"],
        old_val=[0.5, 0.3, 0.9, 0.2, 2.0e6, 0.25],
        new_val=[0.3, 0.5, 0.25, 0.6, 7.0e6, 0.55],
        old_val_before=[0.027] * 6, new_val_before=[3.4] * 6, status=["ok"] * 6))


def test_relative_divergence_marks_only_the_explosion():
    df = P.mark_diverged(_sweep(), higher_is_better=False)
    assert df["diverged"].tolist() == [False, False, False, False, True, False]
    assert "old_val" in df.loc[4, "diverged_reason"]
    # A plain full fine-tune that forgets 33× the pretrained MSE, and 4.5× the sweep's best, is not "diverged":
    # the sweep's median anchors it (table1 showed full fine-tuning at 0.5 against a best head-only 0.04).
    assert not df.loc[2, "diverged"]
    assert "median" in df.loc[4, "diverged_reason"]


def test_non_finite_and_below_chance_diverge():
    df = pd.DataFrame(dict(arm=["a", "a", "a"], old_val=[0.9, float("nan"), 0.1], new_val=[0.8, 0.7, 0.6],
                           chance_old=[0.2] * 3, chance_new=[0.2] * 3, status=["ok", "diverged", "ok"]))
    out = P.mark_diverged(df, higher_is_better=True)
    assert out["diverged"].tolist() == [False, True, True]


def test_a_confirmation_run_that_forgets_to_chance_is_an_outcome_not_a_divergence():
    """Search: a configuration below chance on either task is kept out of the choice. Confirmation / ablation:
    the old task forgotten to chance is the measured result (dropping it would raise the mean of exactly the
    methods that forget most); only both tasks below chance, or a non-finite value, is a diverged run."""
    rows = dict(old_val=[0.19, 0.19, 0.9, 0.15, float("nan")], new_val=[0.85, 0.85, 0.18, 0.1, 0.8],
                chance_old=[0.2] * 5, chance_new=[0.2] * 5, status=["ok"] * 5,
                stage=["search", "confirm", "ablation", "confirm", "confirm"])
    out = P.mark_diverged(pd.DataFrame(rows), higher_is_better=True)
    assert out["diverged"].tolist() == [True, False, False, True, True]
    assert "both below chance" in out.loc[3, "diverged_reason"]
    assert P.divergence_reason(dict(old_val=0.19, new_val=0.85), higher_is_better=True, typical_old=0.5,
                               typical_new=0.5, chance_old=0.2, chance_new=0.2) is not None  # no stage: search


def test_reference_point_ignores_diverged_runs():
    df = P.mark_diverged(_sweep(), higher_is_better=False)
    ref = P.reference_point(df, higher_is_better=False)
    assert ref == (0.9, 3.4)  # worst non-diverged old; pretrained new
    same = P.reference_point(df[~df["diverged"]], higher_is_better=False)
    assert ref == same


def test_confirm_choices_best_old_best_new_knee():
    df = P.mark_diverged(_sweep(), higher_is_better=False)
    ch = P.confirm_choices(df, higher_is_better=False)
    full = ch[ch["arm"] == "full"].set_index("choice")
    # full's front: (0.3,0.5) best old, (0.9,0.25) best new, (0.5,0.3) between them. Scaled by the pretrained
    # gaps (old 0.273, new 3.15) the best-old point is nearest the ideal, so it is the knee too.
    assert full.loc["best-old,knee", "old_val"] == 0.3
    assert full.loc["best-new", "new_val"] == 0.25
    assert len(full) == 2
    profit = ch[ch["arm"] == "profit"]
    assert 2.0e6 not in profit["old_val"].tolist()  # the diverged trial is never confirmed
    assert set(",".join(profit["choice"]).split(",")) == {"best-old", "best-new", "knee"}


def test_knee_scales_axes_by_pretrained_gap():
    pts = np.array([[0.0, 10.0], [1.0, 1.0], [10.0, 0.0]])
    assert P.knee_index(pts, pretrained=(10.0, 10.0), higher_is_better=False) == 1


def test_fresh_seeds_avoid_the_search_seeds():
    assert P.fresh_seeds([1000, 1002], 3) == [1001, 1003, 1004]
    assert len(set(P.fresh_seeds(range(5), 5)) & set(range(5))) == 0


def test_confirm_choices_judge_a_configuration_once_over_its_seeds():
    df = pd.DataFrame(dict(arm=["a"] * 4, config_key=["x", "x", "y", "y"], seed=[0, 1, 0, 1],
                           old_val=[0.1, 0.5, 0.3, 0.3], new_val=[0.5, 0.1, 0.3, 0.3],
                           old_val_before=[0.0] * 4, new_val_before=[1.0] * 4))
    ch = P.confirm_choices(df, higher_is_better=False)
    # Per seed, x's two rows would be best-old (0.1) and best-new (0.1): x confirmed twice. Averaged, x ties y at
    # (0.3, 0.3) and the first row takes every role once.
    assert ch["config_key"].tolist() == ["x"]
    assert ch["choice"].iloc[0] == "best-old,best-new,knee"
    assert ch["old_val"].iloc[0] == pytest.approx(0.3)


def _tied_search():
    """Digits-like search rows at 1/135 validation resolution: three configurations tie on the whole point
    (0.9, 0.8) (the front's best-old and its knee) and two on (0.5, 0.95) (best-new); a float-noise copy of a
    tie (0.8 + 1e-16) must count as a tie too."""
    k = 1 / 135
    rows = [("a", 7, 0.9, 0.8), ("b", 2, 0.9, 0.8), ("c", 4, 0.9, 0.8 + 1e-16), ("d", 5, 0.5, 0.95),
            ("e", 1, 0.5, 0.95), ("f", 3, 0.4, 0.4), ("g", 6, 0.9 - k, 0.8 - k)]
    return pd.DataFrame([dict(arm="profit", model="mlp", config_key=c, search_index=i, seed=0, old_val=o,
                              new_val=n, old_val_before=1.0, new_val_before=0.2, diverged=False)
                         for c, i, o, n in rows])


def test_ties_are_broken_by_one_rule_whatever_the_row_order():
    df = _tied_search()
    want = {"best-old,knee": "b", "best-new": "e"}  # the earlier search trial of each tie (search_index 2, 1)
    for seed in range(20):
        shuffled = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        ch = P.confirm_choices(shuffled, higher_is_better=True)
        assert dict(zip(ch["choice"], ch["config_key"])) == want, seed
    # no search_index (grid sweeps, old stores): the smaller config_key decides
    ch = P.confirm_choices(df.drop(columns="search_index").sample(frac=1.0, random_state=1), higher_is_better=True)
    assert dict(zip(ch["choice"], ch["config_key"])) == {"best-old,knee": "a", "best-new": "d"}


def test_best_old_ties_break_on_the_other_objective_before_the_row():
    df = pd.DataFrame(dict(arm="a", config_key=["x", "y"], search_index=[1, 2], old_val=[0.9, 0.9],
                           new_val=[0.5, 0.6], old_val_before=[1.0, 1.0], new_val_before=[0.1, 0.1]))
    # (0.9, 0.5) is dominated by (0.9, 0.6): only y is on the front, whatever came first
    ch = P.confirm_choices(df, higher_is_better=True)
    assert ch["config_key"].tolist() == ["y"]
    assert P._first_best(np.array([1.0, 1.0, 0.5]), np.array([0.2, 0.3, 0.9])) == 1
    assert P._first_best(np.array([1.0, 1.0]), np.array([0.3, 0.3])) == 0


def test_choices_are_per_backbone_as_the_report_groups_them():
    df = pd.DataFrame(dict(arm="a", model=["m1", "m2"], config_key=["x", "y"], old_val=[0.9, 0.5],
                           new_val=[0.9, 0.5], old_val_before=[1.0, 1.0], new_val_before=[0.1, 0.1]))
    ch = P.confirm_choices(df, higher_is_better=True)
    assert sorted(ch["config_key"]) == ["x", "y"]  # m2's own front, not dominated away by m1's run


def test_saturation_flags_a_front_still_growing_and_passes_a_flat_one():
    ref = (0.0, 0.0)
    # Still improving: the last third (trials 5-6) adds a point far beyond the earlier front.
    growing = [(0.2, 0.2), (0.3, 0.1), (0.1, 0.3), (0.25, 0.25), (0.3, 0.3), (0.6, 0.6)]
    s = P.saturation(growing, ref, higher_is_better=True)
    # first 4: (0.25,0.25) square 0.0625 + the slivers of (0.3,0.1) and (0.1,0.3), 0.005 each
    assert s["saturated"] is False and s["gain"] == pytest.approx(0.36 - 0.0725)
    # Flat: the best point came early; the last third adds dominated points and one diverged (NaN) trial.
    flat = [(0.6, 0.6), (0.3, 0.1), (0.1, 0.3), (0.5, 0.5), (0.2, 0.2), (np.nan, np.nan)]
    s = P.saturation(flat, ref, higher_is_better=True)
    assert s["saturated"] is True and s["gain"] == 0.0 and s["final"] == pytest.approx(0.36)
    # Just under / over the 1 % rule (lower-is-better metrics: reference is the worst corner).
    base = [(0.5, 0.5), (0.6, 0.6), (0.7, 0.7)]
    small = base + [(0.5 - 0.001, 0.5)]  # n = 4: last third = the last 2 trials
    assert P.saturation(small, (1.0, 1.0), higher_is_better=False)["saturated"] is True
    assert P.saturation(base + [(0.4, 0.4)], (1.0, 1.0), higher_is_better=False)["saturated"] is False
    assert P.saturation(base[:2], ref, True)["saturated"] is None  # fewer than 3 trials: not judged
    assert "last third" in P.SATURATION_RULE and f"{P.SATURATION_GAIN:.0%}" in P.SATURATION_RULE
