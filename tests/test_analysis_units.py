"""analysis/: statistics against scipy and hand computations (Holm, detectable differences, staircase), and the
report's pieces on small stores of their own (ties in any row order, the equal-update view, suites, Δ and
Table 1 regime tables, CLI flags)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis import load, stats
from analysis.figures import staircase
from analysis.report import main
from analysis.tables import load_paper
from profit_bench import protocol
from analysis_store import (
    _log_run, _report, _row, _store, add_sweep, flat_accuracy, OPTUNA, ROOT, section, still_improving, SUITE,
    suite_parent, TOY)


# ---------------------------------------------------------------------------------------------- statistics
def test_paired_ci_matches_scipy():
    a = np.array([0.61, 0.64, 0.58, 0.66, 0.70])
    b = np.array([0.55, 0.63, 0.50, 0.60, 0.69])
    d = a - b
    s = stats.paired_difference(a, b)
    lo, hi = scipy.stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy.stats.sem(d))
    assert (s.mean, s.se, s.n) == (pytest.approx(d.mean()), pytest.approx(scipy.stats.sem(d)), 5)
    assert (s.lo, s.hi) == (pytest.approx(lo), pytest.approx(hi))
    # the interval excludes zero exactly when the paired t-test rejects at 5 %
    assert stats.excludes_zero(s) == (scipy.stats.ttest_rel(a, b).pvalue < 0.05) == True  # noqa: E712
    noisy = stats.paired_difference(a, a[::-1])
    assert stats.excludes_zero(noisy) == (scipy.stats.ttest_rel(a, a[::-1]).pvalue < 0.05) == False  # noqa: E712


def test_one_seed_prints_n1_never_nan():
    one = stats.mean_ci([0.25])
    assert (stats.fmt_stat(one, "mse"), stats.fmt_ci(one, "mse"), stats.fmt_n(one)) == ("0.25", "—", "1")
    assert stats.fmt_stat(stats.mean_ci([np.nan]), "mse") == "—"
    s = stats.mean_ci([0.5, 0.7])  # compact cell: mean ± s.e.; the 95 % t-interval is a cell of its own
    lo, hi = scipy.stats.t.interval(0.95, 1, loc=0.6, scale=scipy.stats.sem([0.5, 0.7]))
    assert stats.stat_ci(s, "accuracy") == ["60.00 ± 10.00", f"[{lo * 100:.2f}, {hi * 100:.2f}]"]
    assert stats.fmt_n(s, s, stats.mean_ci([1.0, 2.0, 3.0])) == "2/3"  # a row whose cells have different n


@pytest.mark.parametrize("hib", [(True, True), (False, False)])
def test_staircase_encloses_the_hypervolume(hib):
    rng = np.random.default_rng(2)
    p = rng.normal(size=(12, 2))
    front = p[protocol.pareto_mask(p, hib)]
    ref = protocol.to_maximize([protocol.to_maximize(p, hib).min(axis=0) - 0.5], hib)[0]
    v = protocol.to_maximize(staircase(front, hib), hib)
    r = protocol.to_maximize([ref], hib)[0]
    poly = np.vstack([[r[0], v[0, 1]], v, [v[-1, 0], r[1]], r])  # close the staircase at the reference corner
    shoelace = 0.5 * abs(np.dot(poly[:, 0], np.roll(poly[:, 1], 1)) - np.dot(poly[:, 1], np.roll(poly[:, 0], 1)))
    assert shoelace == pytest.approx(protocol.hypervolume(p, ref, hib))


def test_paper_tables_yaml_has_every_table():
    paper = load_paper()
    assert {f"table{n}" for n in (1, 2, 6, 7, 8, 9, 11, 12, 14)} <= set(paper)
    assert len(paper["table2"]["rows"]) == 15 and len(paper["table9"]["rows"]) == 12
    assert paper["table9"]["rows"][6] == {"model": "vit_tiny", "ratio": 1000, "old": 58.53, "new": 62.20}
    assert paper["table1"]["rows"][3]["old"] == 0.046


def test_cost_table_gives_seconds_per_epoch_where_the_budget_is_in_epochs():
    """Table 11's s / epoch = training-batch seconds / epochs run (the paper's unit), mean ± s.e. over the arm's
    runs, beside × main; a task whose budget is in main steps (the toy) has no such column."""
    from analysis.tables import cost_rows, table11

    def run(arm, is_profit, train, task, epochs):
        return dict(status="ok", step_time_median_s=0.01, method="full", stage="confirm", task=task, model="mlp",
                    optimizer="adam", is_profit=is_profit, arm=arm, train_time_s=train, main_steps=100,
                    wall_time_s=train + 1, n_trainable=1000, extra_state_bytes=0.0, profit_state_bytes=0.0,
                    device="cpu", peak_mem_bytes=np.nan, scheduler="step", steps=100.0 if np.isnan(epochs) else np.nan,
                    epochs=epochs, epochs_done=4.0)
    times = {"full": [2.0, 2.2, 2.6], "profit": [6.0, 6.6, 7.8]}
    runs = pd.DataFrame([run(arm, arm == "profit", t, task, 4.0 if task == "digits" else np.nan)
                         for task in ("digits", "toy") for arm, ts in times.items() for t in ts])
    text = table11(cost_rows(runs), load_paper())
    digits = section(text, "ours on sklearn digits", "\n### ")
    header = [c.strip() for c in digits.split("| backbone", 1)[1].splitlines()[0].split("|")[:-1]]
    header[0] = "backbone"
    col = header.index("s / epoch")
    cells = {arm: _row(digits, "| MLP | " + arm)[col:col + 2] for arm in times}
    per_epoch = {arm: np.array(ts) / 4.0 for arm, ts in times.items()}
    for arm, v in per_epoch.items():  # 4 epochs run: 0.5667 ± 0.0441 s for the main optimizer, 1.7 ± 0.1323 PROFIT
        assert cells[arm][0] == f"{v.mean():.4g} ± {scipy.stats.sem(v):.4g}", arm
    assert cells["profit"][1] == f"{per_epoch['profit'].mean() / per_epoch['full'].mean():.2f}" == "3.00"
    assert "step, 4 epochs" in digits
    # epochs_done (a tag of new runs) is a count of the run, never a knob in a configuration's text
    assert "epochs_done" not in load.param_columns(runs) and "lr" in load.param_columns(runs.assign(lr=1e-3))
    toy = section(text, "ours on 2-D toy", "\n### ")
    assert "| s / trial | × main | PROFIT/method state MiB |" in toy and "100 main steps" in toy


def test_report_selection_and_sweep_choices_agree_on_ties_in_any_row_order():
    """Issue 29: ties at 1/135 validation resolution were broken by row order, which differs between the sweep
    (suggestion order) and the report (MLflow's order): the report marked confirmed knees "confirmed: no"."""
    from profit_bench.plan import confirm_rows
    from profit_bench.spec import load_spec
    k = 1 / 135
    vals = [(0.9, 0.8), (0.9, 0.8), (0.9, 0.8), (0.5, 0.95), (0.5, 0.95), (0.4, 0.4), (0.9 - k, 0.8 - k)]
    rows = [dict(arm=arm, model="mlp", config_key=f"{arm}{j}", search_index=i, seed=0, old_val=o, new_val=n,
                 old_val_before=1.0, new_val_before=0.2, diverged=False, params={})
            for arm in ("full", "profit") for j, (i, (o, n)) in enumerate(zip([7, 2, 4, 5, 1, 3, 6], vals))]
    sweep_df = pd.DataFrame(rows)  # as the sweep holds it: suggestion order, search_index an int
    spec = load_spec("digits")
    want = confirm_rows(sweep_df, spec, higher_is_better=True)[["arm", "config_key", "choice"]]
    assert dict(zip(want["config_key"], want["choice"])) == {"full1": "best-old,knee", "full4": "best-new",
                                                             "profit1": "best-old,knee", "profit4": "best-new"}
    # as the report reads it from MLflow: another row order, search_index a string tag, status instead of diverged
    runs = sweep_df.drop(columns=["diverged", "params"]).assign(
        experiment="digits", task="digits", stage="search", status="ok", higher_is_better=True,
        search_index=lambda d: d["search_index"].astype(str))
    for seed in range(5):
        got = stats.selection(runs.sample(frac=1.0, random_state=seed))
        assert dict(zip(got["config_key"], got["choice"])) == dict(zip(want["config_key"], want["choice"]))


def test_equal_update_view_reads_each_run_where_both_made_the_same_main_updates():
    """Hand-made curves: PROFIT makes 5 main updates per epoch, Adam 10; at equal updates (Adam's epoch 2 = 20
    updates, PROFIT's end) PROFIT is compared with Adam's mid-run validation values, paired by seed."""
    def curve(run, per_epoch, old, new):
        return [dict(run=run, key=k, step=e, value=v) for e in range(1, 5)
                for k, v in (("main_steps", per_epoch * e), ("old_val", old[e - 1]), ("new_val", new[e - 1]))]
    seeds = [1000, 1001, 1002]
    hist, runs = [], []
    for i, s in enumerate(seeds):
        hist += curve(f"p{s}", 5, [0.9, 0.89, 0.88, 0.87 + 0.01 * i], [0.5, 0.6, 0.7, 0.8 - 0.02 * i])
        hist += curve(f"a{s}", 10, [0.8, 0.7 + 0.01 * i * i, 0.6, 0.5], [0.7, 0.75 + 0.01 * i, 0.9, 0.95])
        runs += [dict(run_id=f"{arm[0]}{s}", arm=arm, config_key=arm, seed=s) for arm in ("profit", "adam")]
    group = dict(experiment="e", task="digits", model="mlp")
    runs = pd.DataFrame(runs).assign(stage="confirm", status="ok", **group)
    cells = pd.DataFrame([dict(**group, arm=a, config_key=a, is_profit=a == "profit", method=m, choice="knee",
                               metric_name="accuracy", higher_is_better=True)
                          for a, m in (("profit", "full"), ("adam", "full"))])  # canonical: PROFIT = full + profit
    rows = stats.equal_update_rows(runs, cells, pd.DataFrame(hist))
    assert len(rows) == 1
    r = rows[0]
    assert (r["profit"], r["baseline"], r["seeds"]) == ("profit", "adam", seeds)
    assert r["updates"].mean == 20 and r["read_profit"] == 20 and r["read_baseline"] == 20
    assert not r["equal_ends"]
    d_old = [0.87 + 0.01 * i - (0.7 + 0.01 * i * i) for i in range(3)]  # PROFIT's epoch 4 − Adam's epoch 2
    d_new = [0.8 - 0.02 * i - (0.75 + 0.01 * i) for i in range(3)]
    for m, d in (("old_val", d_old), ("new_val", d_new)):
        ref = scipy.stats.ttest_1samp(d, 0.0)
        assert r[m].mean == pytest.approx(np.mean(d)) and r[m].n == 3
        assert r[f"{m}_p"] == pytest.approx(ref.pvalue)
    # Holm over this view's family of 2 (old, new)
    assert max(r["old_val_p_holm"], r["new_val_p_holm"]) == pytest.approx(
        max(stats.holm([r["old_val_p"], r["new_val_p"]])))
    # runs without per-evaluation main_steps: nothing to read
    assert stats.equal_update_rows(runs, cells, pd.DataFrame(hist).query("key != 'main_steps'")) == []


def test_report_shows_the_equal_update_view_as_the_secondary_one(tmp_path_factory):
    uri, client, d = _store(tmp_path_factory, "updates")
    logged = add_sweep(client, "updates", OPTUNA, updates=True)
    md = _report(uri, d / "report", "updates")
    view = section(md, "## Secondary view: PROFIT vs each baseline at equal main-optimizer updates (validation)")
    assert "The equal-data comparison above is the headline." in view
    rows = [r for r in view.splitlines() if r.startswith("| updates |")]
    assert rows, view
    cells = [r for r in section(md, "## Confirmed results").splitlines() if r.startswith(("| profit |", "| full |"))
             and r.count("|") > 12 and [c.strip() for c in r.split("|")[1:-1]][3] == "3"]  # n = 3 seeds
    assert cells  # batches (a tag of the run) / main updates per confirmed configuration
    for r in cells:
        assert ("| 20 / 10 |" if r.startswith("| profit |") else "| 20 / 20 |") in r, r
    # PROFIT made 10 updates (5 per evaluation), full 20: both read where they made 10, full at its mid-run point
    conf = pd.DataFrame(logged["confirm"])
    for r in rows:
        cols = [c.strip() for c in r.split("|")[1:-1]]
        assert cols[5] == "10" and cols[6] == "10 / 10"
        p = conf[(conf["arm"] == cols[2]) & conf["choice"].str.contains(cols[4].split(",")[0])]
        b = conf[(conf["arm"] == cols[3]) & conf["choice"].str.contains(cols[4].split(",")[0])]
        mid = lambda v, before: (before + v) / 2  # noqa: E731 - the fixture's mid-run evaluation
        diff = [pv[0] - mid(bv[0], OPTUNA["before"][0]) for pv, bv in zip(p["values"], b["values"])]
        assert cols[7].startswith(f"{100 * np.mean(diff):.2f} ± "), (cols[7], diff)


def test_cli_keeps_its_flags():
    r = subprocess.run([sys.executable, "-m", "analysis.report", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--experiment", "--suite", "--tracking-uri", "--out", "--runs"):
        assert flag in r.stdout


def test_unreachable_tracking_server_fails_fast_on_one_line():
    import time
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "analysis.report", "--experiment", "x", "--tracking-uri",
                        "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    # MLflow's own client would retry for minutes (7 retries, exponential back-off); what is checked is that the
    # report asks once (REACH_TIMEOUT_S) and stops. The bound leaves room for interpreter start-up on a loaded
    # 2-core machine (15 s was hit at load 20 with the code unchanged).
    assert r.returncode == 2 and time.monotonic() - t0 < 45
    assert r.stderr.strip().count("\n") == 0 and "http://127.0.0.1:9" in r.stderr


def test_holm_matches_a_hand_computation():
    from analysis.stats import holm
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 → ×4, ×3, ×2, ×1 = 0.04, 0.06, 0.06, 0.5 (running max), NaN untouched
    got = holm([0.03, 0.5, float("nan"), 0.01, 0.02])
    assert got[[3, 4, 0, 1]] == pytest.approx([0.04, 0.06, 0.06, 0.5]) and np.isnan(got[2])
    # step-down monotonicity: 0.2 × 2 = 0.4, then 0.3 × 1 = 0.3 is raised to the running maximum 0.4
    assert holm([0.3, 0.2]) == pytest.approx([0.4, 0.4])
    assert holm([0.6, 0.7]).tolist() == [1.0, 1.0]  # 0.6 × 2 capped at 1
    assert holm([]).size == 0


def test_minimum_detectable_difference_has_80_percent_power_by_simulation():
    from analysis.stats import min_detectable, paired_difference, paired_p
    rng = np.random.default_rng(0)
    for n in (5, 10):
        mdd = min_detectable(1.0, n)
        d = rng.normal(mdd, 1.0, size=(20000, n))
        t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n))
        power = (np.abs(t) > scipy.stats.t.ppf(0.975, n - 1)).mean()
        assert power == pytest.approx(0.80, abs=0.015), n
        normal = (scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)) / np.sqrt(n)
        assert mdd > normal  # the t-test needs more than the normal approximation at small n
    assert min_detectable(2.0, 5) == pytest.approx(2 * min_detectable(1.0, 5))
    a, b = np.array([1.0, 2.0, 3.5, 4.0]), np.array([0.5, 2.5, 2.0, 3.0])
    assert paired_p(paired_difference(a, b)) == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue)


def test_suite_report_keeps_only_each_experiments_latest_sweep(tmp_path_factory, tmp_path):
    """A workload re-run (`sweep suite --workloads W`) adds a newer sweep to experiment W: the suite report reads
    that sweep's runs and pretraining curves only, never pooled with the earlier sweep's."""
    import time as _time

    from mlflow.entities import Metric
    uri, client, _ = _store(tmp_path_factory, "rerun")
    add_sweep(client, "w", TOY, pretrain={"mlp": still_improving}, **suite_parent("w", TOY))
    exp_id = client.get_experiment_by_name("w").experiment_id
    tags = suite_parent("w", TOY)["parent_tags"]
    newer = client.create_run(exp_id, start_time=int(_time.time() * 1000) + 60_000,
                              tags={"profit_bench.role": "sweep", "sweep": "w", "table": "", **tags}).info.run_id
    client.log_batch(newer, metrics=[Metric(f"pretrain.mlp.seed{s}.old_val", v, 0, i + 1)
                                     for s in (0, 1000) for i, v in enumerate(flat_accuracy(s))])
    ids = [_log_run(client, exp_id, newer, TOY, arm=arm, stage="search", seed=0, params={"lr": lr},
                    values=(0.1, 0.5, 0.1, 0.5), config_key=f"{arm}{lr}")
           for arm, lr in (("full", 1e-3), ("head", 1e-2))]
    client.set_terminated(newer)
    out = tmp_path / "rep"
    assert main(["--suite", SUITE, "--tracking-uri", uri, "--out", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["run_id"]) == sorted(ids)
    pre = section((out / "report.md").read_text(), "## Pretrained backbones")
    assert "| 2 |" in pre and "yes" in pre and "still improving" not in pre  # the newer sweep's 2 flat curves


def test_delta_table_pairs_exact_and_weights_by_seed_and_counts_below_chance_runs():
    """analysis.delta (issue 27): exact − weights paired by seed; a run the search rule calls diverged (below
    chance) is still an outcome there, since that ablation selects nothing."""
    from analysis.delta import delta_table
    rows = [dict(experiment="e", task="digits", metric_name="accuracy", lr=1e-3, n_ref=2, ratio=100.0, seed=seed,
                 profit_delta=delta, status="diverged" if seed == 3 else "ok", old_test=0.9, new_test=new,
                 profit_delta_lost=0.1)
            for seed in (1, 2, 3) for delta, new in (("exact", 0.3 + seed / 100), ("weights", 0.5 + seed / 50))]
    text = delta_table(pd.DataFrame(rows))
    # new: (0.3 + s/100) − (0.5 + s/50) = −0.2 − s/100 → −0.21, −0.22, −0.23: mean −22 %, s.e. 0.01/√3 = 0.58 %
    assert "| 100 | 1e-05 | 3 |" in text and "| -22.00 ± 0.58 |" in text and "| 0.00 ± 0.00 |" in text


def test_table1_regime_distance_is_the_mean_abs_log_ratio_to_the_papers_baselines():
    import math

    import pandas as pd

    from analysis.table1_regime import READING, distances, paper_rows
    paper = paper_rows()
    reading = dict(activation="tanh", layernorm="after_act", batch_size=32, pretrain_batch_size=32)
    rows = [{**reading, "row": r, "old_val": paper[r]["old"] * f, "new_val": paper[r]["new"]}
            for r, f in (("pretrained", 1.0), ("full", 2.0), ("head", 0.5))]
    d = distances(pd.DataFrame(rows), "val")
    assert list(d.columns) == READING + ["distance_val"]
    assert d["distance_val"].iloc[0] == pytest.approx(2 * math.log(2) / 6)  # two of six off by a factor 2


def test_table1_regime_reading_of_a_run_is_logged_else_its_toy_variants_else_todays():
    import pandas as pd

    from analysis.table1_regime import fill_reading
    runs = pd.DataFrame([
        dict(toy_variant="gelu_ln_after", activation=None, layernorm=None),  # a `trial:` reading, knobs not logged
        dict(toy_variant="gelu_ln_after", activation="tanh", layernorm="none"),  # logged knobs win
        dict(toy_variant=None, activation=None, layernorm=None)])  # logged before toy_variant was a param: today
    out = fill_reading(runs)
    assert list(out["activation"]) == ["gelu", "tanh", "relu"]
    assert list(out["layernorm"]) == ["after_act", "none", "before_act"]
    assert list(out["batch_size"]) == [32, 32, 32]


def test_plateau_flags_read_each_cells_own_runs_when_a_config_key_recurs_across_workloads(monkeypatch):
    """A suite draws the same lr for an arm on every workload, so (arm, model, params) — the config_key — recurs
    across experiments; each cell's plateau flag must come from its own experiment's runs (issue 29: the toy's
    flags were read from the Fashion-MNIST MLP's curves)."""
    import pandas as pd
    from analysis import load, sections
    flat, rising = [0.5, 0.5, 0.5, 0.5], [0.2, 0.4, 0.6, 0.8]
    curve = {"rA": flat, "rB": rising}
    monkeypatch.setattr(load, "metric_histories", lambda ids, uri, keys: pd.DataFrame(
        [dict(run=s, key="new_val", step=i + 1, value=v) for s, rid in ids.items() for i, v in enumerate(curve[rid])]))
    base = dict(task="t", model="mlp", arm="adam", config_key="k", stage="confirm", status="ok", seed=1000)
    runs = pd.DataFrame([dict(base, experiment="A", run_id="rA"), dict(base, experiment="B", run_id="rB")])
    cells = pd.DataFrame([dict(base, experiment=e, metric_name="accuracy", higher_is_better=True) for e in "AB"])
    got = sections.plateaus(runs, cells, "sqlite:///unused.db")
    assert got[("A", "t", "mlp", "adam", "k")] == "yes"
    assert got[("B", "t", "mlp", "adam", "k")].startswith("**no**")
