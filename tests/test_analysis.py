"""analysis/: the report end to end from one synthetic MLflow store (tests/analysis_store.py): tables from
confirmation runs only, selections, paired differences, ablations, pretraining, cost, figures, CLI."""

import struct

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis import load
from analysis.figures import DPI, FIGSIZE
from analysis.report import main
from profit_bench import protocol
from analysis_store import (
    _lines, _report, _row, _store, _t_cells, add_sweep, CONFIRM_SEEDS, flat_accuracy, GRID9, OPTUNA, part,
    rising_accuracy, SEARCH_TEST_SENTINEL, section, selection_of, still_improving, SUITE, SUITE_COMMAND,
    suite_parent, TOY, VIT)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One store, one report: toy Table 1 (grid over lr), an accuracy ratio grid (Table 9), an Optuna-like
    sweep, and two copies of the toy sweep (same seed, no table): one with a PROFIT trial that exploded to finite
    values, one with its confirmation runs' test metrics shuffled."""
    uri, client, d = _store(tmp_path_factory, "base")
    logged = {"table1": add_sweep(client, "table1", TOY, ablate=dict(arm="profit", seeds=3),
                                  pretrain={"mlp": still_improving}, **suite_parent("table1", TOY)),
              "table9": add_sweep(client, "table9", GRID9, parent_tags={"suite": "other"}),
              "optuna": add_sweep(client, "optuna", OPTUNA),
              "vit_ablation": add_sweep(client, "vit_ablation", VIT, ablate=dict(arm="profit", seeds=2, failed=True),
                                        pretrain={"vit_micro": flat_accuracy, "resnet_small": rising_accuracy},
                                        **suite_parent("vit_ablation", VIT, wall=95.0))}
    # an older sweep of `optuna` belonged to the suite; its latest does not, so --suite leaves it out
    optuna_id = client.get_experiment_by_name("optuna").experiment_id
    client.create_run(optuna_id, start_time=1, tags={"profit_bench.role": "sweep", "suite": SUITE})
    add_sweep(client, "boom", {**TOY, "table": ""}, explode=True)
    add_sweep(client, "shuffled", {**TOY, "table": ""}, shuffle_test=True)
    client.create_experiment("empty")
    md = _report(uri, d / "report", "table1", "table9", "optuna", "boom", "shuffled", "vit_ablation")
    return dict(uri=uri, dir=d, md=md, out=d / "report", confirm={k: v["confirm"] for k, v in logged.items()},
                ablation={k: v["ablation"] for k, v in logged.items()})


def test_report_has_no_nan_and_states_the_protocol(base):
    md = base["md"]
    assert "nan" not in md.lower()
    assert protocol.SELECTION_RULE in md
    assert "Budget per arm** (search trials): boom: full 6, head 6, profit 7; optuna: full 6, profit 6; " in md
    assert "Confirmation seeds**: boom: 1000, 1001, 1002; optuna: 1000, 1001, 1002;" in md


def test_ablation_plot_only_where_the_knob_varies_alone(base):
    md, out = base["md"], base["out"]
    assert "ablation_ratio_table9_fmnist_resnet18.png" in md
    assert "No ablation plot over ratio for optuna (profit: ratio varies only together with lr" in md
    assert not list(out.glob("ablation_*optuna*"))
    runs = pd.read_csv(out / "runs.csv")
    grid = runs[(runs["experiment"] == "table9") & (runs["arm"] == "profit") & (runs["stage"] == "search")]
    assert grid["ratio"].nunique() == 3 and grid["lr"].nunique() == 1  # what the plot drew: ratio alone varies


def test_tables_come_from_confirmation_runs_only(base):
    md = base["md"]
    tables = md.split("## Paper tables", 1)[1]
    assert str(SEARCH_TEST_SENTINEL) not in md  # no search run's test metric anywhere
    t1 = section(tables, "### Table 1 —", "\n### ")
    for r in base["confirm"]["table1"]:
        if r["arm"] == "profit" and "knee" in r["choice"]:
            key, choice = r["config_key"], r["choice"]
    olds = [r["values"][2] for r in base["confirm"]["table1"] if r["config_key"] == key]
    row = _row(t1, f"| profit | {choice} |")
    # n, then mean ± s.e. and the 95 % t-interval in their own cells (numpy/scipy), beside the paper's PROFIT row
    assert row[3:7] == ["3", *_t_cells(olds, 1, ".4g"), "0.046"], row
    assert "| n | old test MSE ours | old 95 % CI | old MSE paper |" in t1
    t9 = section(tables, "### Table 9 —", "\n### ")
    assert "stand-in for CIFAR-10 → CIFAR-100" in t9
    rows9 = [_row(line, "|") for line in t9.splitlines() if line.startswith("| ResNet-18 | 10")]
    assert rows9 and all(r[5] == "3" and " ± " in r[6] and r[7].startswith("[") for r in rows9)


def test_search_grid_cells_are_validation_means_over_search_seeds(base):
    runs = pd.read_csv(base["out"] / "runs.csv")
    grid = section(base["md"], "## Search grid")
    g = runs[(runs["experiment"] == "table9") & (runs["stage"] == "search") & (runs["ratio"] == 100.0)]
    want = _t_cells(g["old_val"], 100, ".2f")[0]
    assert len(g) == 2 and f"| profit | lr=0.0001, ratio=100 | 2 | {want} |" in grid
    assert "Paper's PROFIT row (table 1): old 0.046, new 0.501." in grid


def test_paired_differences_in_the_report_match_scipy(base):
    md, runs = base["md"], pd.read_csv(base["out"] / "runs.csv")
    conf = runs[(runs["experiment"] == "table1") & (runs["stage"] == "confirm")]
    knee = conf[conf["choice"].str.contains("knee")]
    p = knee[knee["arm"] == "profit"].set_index("seed")["old_test"]
    f = knee[knee["arm"] == "full"].set_index("seed")["old_test"]
    d = (p - f).to_numpy()
    lo, hi = scipy.stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy.stats.sem(d))
    paired = section(md, "## PROFIT vs each baseline")
    row = next(line for line in paired.splitlines() if "| profit | full |" in line and "knee" in line
               and line.startswith("| table1 |"))
    cells = _row(row, "|")
    assert cells[5] == "3" and cells[7] == f"[{lo:.4g}, {hi:.4g}]"  # n, Δ old, its 95 % CI


def test_histories_keep_the_evaluation_where_the_final_result_shares_its_step(base):
    runs = pd.read_csv(base["out"] / "runs.csv")
    rid = runs.loc[(runs["experiment"] == "table1") & runs["is_profit"], "run_id"].iloc[0]
    hist = load.metric_histories({"p": rid}, base["uri"], ["profit_projected_frac", "old_val"])
    frac = hist[hist["key"] == "profit_projected_frac"]
    assert list(frac["step"]) == [10, 20] and frac["value"].iloc[-1] == pytest.approx(0.5)  # not the final 0.4
    assert list(hist.loc[hist["key"] == "old_val", "step"]) == [0, 10, 20]


def test_cost_table_times_whole_main_steps_and_trials_beside_the_main_optimizer(base):
    """Table 11: ms per main step = training seconds / main steps (20 here: 2 ms vs 6 ms), s per trial = wall time,
    each beside its × main ratio; the row names PROFIT's main optimizer, schedule and budget; the toy is titled as
    the toy, not as a stand-in for CIFAR."""
    titles = [line for line in base["md"].splitlines() if line.startswith("### Table 11 —")]
    assert titles and not any("stand-in" in t for t in titles)
    t11 = section(base["md"], "Table 11 — time and memory, PROFIT vs its main optimizer — ours on 2-D toy",
                  "\n### ")
    rows = [r for r in t11.splitlines() if r.startswith("| MLP")]
    main = next(r for r in rows if "main optimizer" in r)
    profit = next(r for r in rows if "PROFIT over" in r)
    assert [c.strip() for c in main.split("|")[1:-1]][5] == "1.00"  # the main optimizer over itself
    cells = [c.strip() for c in profit.split("|")[1:-1]]
    header = [c.strip() for c in t11.split("| backbone", 1)[1].splitlines()[0].split("|")[:-1]]
    header[0] = "backbone"
    col = dict(zip(header, range(len(header))))
    assert cells[col["ms / main step"]].startswith("6") and cells[col["ms / main step"] + 1] == "3.00"
    assert cells[col["s / trial"]].startswith("2.5") and cells[col["s / trial"] + 1] == "2.50"
    assert "main steps" in cells[col["schedule, budget"]]


def test_figures_are_pngs_of_the_stated_size(base):
    out, md = base["out"], base["md"]
    expected = {"pareto_table1_toy_mlp.png": "pareto", "ablation_ratio_table9_fmnist_resnet18.png": "wide",
                "curves_table1_toy_mlp.png": "wide", "diagnostics_table1_toy_mlp.png": "wide",
                "cost_toy.png": "wide"}
    for name, kind in expected.items():
        head = (out / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md, name
        w, h = FIGSIZE[kind]
        assert struct.unpack(">II", head[16:24]) == (round(w * DPI), round(h * DPI)), name


def test_exploding_run_is_diverged_and_moves_nothing(base):
    md, out = base["md"], base["out"]
    assert "| boom | search | profit | diverged | 0 | old_val 2.2e+06 > 10× pretrained" in md
    boom, ref = part(md, "## Selection", "boom"), part(md, "## Selection", "table1")
    for start in ("Validation reference point", "| full |", "| head |"):
        assert _lines(boom, start) == _lines(ref, start) and _lines(ref, start), start
    # the profit rows differ only in the trial and diverged counts: same Pareto set, choices and values
    tail = [r.split("|")[4:] for r in _lines(ref, "| profit |")]
    assert [r.split("|")[4:] for r in _lines(boom, "| profit |")] == tail
    assert [r.split("|")[2:4] for r in _lines(boom, "| profit |")] == [[" 7 ", " 1 "]] * 2
    assert part(md, "## Confirmed results", "boom") == part(md, "## Confirmed results", "table1")  # fronts, ref, HV
    pd.testing.assert_frame_equal(selection_of(out, "boom"), selection_of(out, "table1"))


def test_shuffled_test_metrics_leave_every_selection_unchanged(base):
    md, out = base["md"], base["out"]
    assert part(md, "## Confirmed results", "shuffled") != part(md, "## Confirmed results", "table1")  # test moved
    assert part(md, "## Selection", "shuffled") == part(md, "## Selection", "table1")
    pd.testing.assert_frame_equal(selection_of(out, "shuffled"), selection_of(out, "table1"))
    runs = pd.read_csv(out / "runs.csv")
    confirmed = [set(runs.loc[(runs["experiment"] == e) & (runs["stage"] == "confirm"), "config_key"])
                 for e in ("shuffled", "table1")]
    assert confirmed[0] == confirmed[1]


def test_missing_and_empty_experiment_exit_2_with_one_line(base, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    empty_store = f"sqlite:///{tmp_path}/empty.db"
    MlflowClient(empty_store).create_experiment("nothing_yet")
    capsys.readouterr()  # drop MLflow's own "creating tables" log lines
    cases = ((["--experiment", "nope", "--tracking-uri", base["uri"]], "no experiment 'nope'"),
             (["--experiment", "empty", "--tracking-uri", base["uri"]], "has no trial runs"),
             (["--tracking-uri", f"sqlite:///{tmp_path}/absent.db"], "no MLflow store at"),
             (["--tracking-uri", empty_store], "no trial runs in any experiment"))
    for args, words in cases:
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
        assert not (tmp_path / "out").exists() and not (tmp_path / "absent.db").exists()


def test_ablation_section_matches_scipy_and_marks_the_knee(base):
    md = base["md"]
    abl = section(md, "## Ablations around the confirmed PROFIT configuration (test, confirmation seeds)")
    assert "nan" not in abl.lower()
    # toy MSE, ratio: every value's row against numpy/scipy over its confirmation seeds
    t1 = section(abl, "### table1: 2-D toy regression sin(10|x|) — MLP — ratio", "\n### ")
    for v in (10.0, 1000.0, 10000.0):
        recs = [r for r in base["ablation"]["table1"] if r["knob"] == "ratio" and r["value"] == v]
        row = _row(t1, f"| profit | {v:g} |")
        assert row[2:8] == ["3", "0", *_t_cells([r["values"][2] for r in recs], 1, ".4g"),
                            *_t_cells([r["values"][3] for r in recs], 1, ".4g")], v
    knee = [r for r in base["confirm"]["table1"] if r["arm"] == "profit" and "knee" in r["choice"]]
    row = _row(t1, "| profit | 100 (confirmed knee) |")  # the knee's ratio, from its confirm runs
    assert row[4:6] == _t_cells([r["values"][2] for r in knee], 1, ".4g")
    assert "no backbone of the MLP's family" in t1 and "paper Table" not in t1.split("\n- ")[0]
    # accuracy on vit_micro, n_ref over 2 of the 3 confirmation seeds: the knee row on those seeds only,
    # beside the paper's ViT-Tiny rows (CIFAR); a failed run leaves n = 1 and is counted
    v_nref = section(abl, "### vit_ablation: Fashion-MNIST 0–4 → 5–9 — vit_micro — n_ref", "\n### ")
    assert "paper Table 8 ViT-Tiny old (CIFAR-10, %)" in v_nref and "CIFAR numbers" in v_nref
    knee = [r for r in base["confirm"]["vit_ablation"] if r["arm"] == "profit" and "knee" in r["choice"]
            and r["seed"] in CONFIRM_SEEDS[:2]]
    row = _row(v_nref, "| profit | 1 (confirmed knee) |")
    assert row[2:8] == ["2", "0", *_t_cells([r["values"][2] for r in knee], 100, ".2f"),
                        *_t_cells([r["values"][3] for r in knee], 100, ".2f")]
    assert row[-2:] == ["56.75", "62.35"]
    assert _row(v_nref, "| profit | 2 |")[-2:] == ["53.10", "61.67"]
    v_ratio = section(abl, "### vit_ablation: Fashion-MNIST 0–4 → 5–9 — vit_micro — ratio", "\n### ")
    ok = [r for r in base["ablation"]["vit_ablation"] if r["value"] == 10000.0 and r["status"] == "ok"]
    row = _row(v_ratio, "| profit | 10000 |")
    assert row[2:6] == ["1", "1", *_t_cells([ok[0]["values"][2]], 100, ".2f")] and row[5] == "—"  # n=1: no CI
    assert _row(v_ratio, "| profit | 1000 (confirmed knee) |")[-2:] == ["58.53", "62.20"]
    assert "the knee row uses its confirmation runs on the ablation's seeds (1000, 1001)" in v_ratio
    # the failed ablation run is listed with the runs left out; ablation runs never reach selection or cells
    assert "| vit_ablation | ablation | profit | failed | 1001 | — |" in md
    n_abl = sum(len(v) for v in base["ablation"].values())
    assert f"ablation: 1 failed, {n_abl - 1} ok" in md
    sel = pd.read_csv(base["out"] / "selection.csv")
    assert not sel["config_key"].str.contains("=").any()
    for name in ("knee_ablation_ratio_table1_toy_mlp.png", "knee_ablation_n_ref_vit_ablation_fmnist_vit_micro.png"):
        head = (base["out"] / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in abl
        assert struct.unpack(">II", head[16:24]) == tuple(round(x * DPI) for x in FIGSIZE["wide"])
    assert "### Ablations (search stage, validation)" in md  # the search-stage figures stay


# ---------------------------------------------------------------------------------------------- pretraining
def test_pretrain_section_flags_a_curve_still_improving(base):
    pre = section(base["md"], "## Pretrained backbones (old-task validation, before fine-tuning)")
    assert "nan" not in pre.lower()
    seeds = [0, 1] + CONFIRM_SEEDS
    for exp, model, name, curve, metric in (("table1", "mlp", "MLP", still_improving, "mse"),
                                            ("vit_ablation", "vit_micro", "vit_micro", flat_accuracy, "accuracy"),
                                            ("vit_ablation", "resnet_small", "resnet_small", rising_accuracy,
                                             "accuracy")):
        c = np.array([curve(s) for s in seeds])
        final, mean = c[:, -1], c.mean(axis=0)
        scale, spec = (100, ".2f") if metric == "accuracy" else (1, ".4g")
        f = lambda x: format(x * scale, spec)  # noqa: E731
        sign = 1 if metric == "accuracy" else -1
        gain = sign * (mean[-1] - mean[-4])
        best = np.argmax(sign * mean)
        row = _row(section(pre, f"### {exp}: ", "\n### ") if exp == "table1" else pre.split("### vit_ablation")[1],
                   f"| {name} |")
        assert row[1:5] == [str(len(seeds)), f"{f(final.mean())} ± {f(scipy.stats.sem(final))}",
                            f"{f(mean[best])} (evaluation {best + 1})", " → ".join(f(v) for v in mean[-4:])], name
        if metric == "accuracy":
            assert row[5] == f"{100 * gain:+.2f} points"
            want = "yes" if 100 * gain < 0.5 else "no (still improving)"
        else:
            assert row[5] == f"{gain:+.4g} ({100 * gain / abs(mean[-4]):+.1f} %)"
            want = "yes" if gain / abs(mean[-4]) < 0.02 else "no (still improving)"
        assert row[6] == want and want == ("yes" if curve is flat_accuracy else "no (still improving)"), name
    for exp in ("table1", "vit_ablation"):
        head = (base["out"] / f"pretrain_{exp}.png").read_bytes()[:24]
        assert struct.unpack(">II", head[16:24]) == tuple(round(x * DPI) for x in FIGSIZE["small"])
    assert "### optuna" not in pre  # no pretrain.* metrics: no subsection


# ---------------------------------------------------------------------------------------------- suites and summary
def test_wins_section_reads_the_paired_intervals_and_holm(base):
    md, runs = base["md"], pd.read_csv(base["out"] / "runs.csv")
    wins = section(md, "## Where PROFIT wins, loses or is not separated (paired, test, Holm-adjusted)")
    conf = runs[(runs["experiment"] == "table1") & (runs["stage"] == "confirm")]
    for choice in ("best-old,knee", "best-new"):
        got = _row(wins, f"| table1 | 2-D toy regression sin(10\\|x\\|) — MLP | profit | full | {choice} |")
        for col, m in ((6, "old_test"), (9, "new_test")):
            c = conf[conf["choice"] == choice]
            d = (c[c["arm"] == "profit"].set_index("seed")[m] - c[c["arm"] == "full"].set_index("seed")[m]).to_numpy()
            lo, hi = scipy.stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy.stats.sem(d))
            want = "not separated" if lo <= 0 <= hi else "PROFIT better" if hi < 0 else "PROFIT worse"
            assert got[col] == want, (choice, m)  # the raw verdict: the interval alone
            raw_p = scipy.stats.ttest_1samp(d, 0.0).pvalue
            assert got[col + 1].startswith(f"{raw_p:.3f} → " if raw_p >= 1e-3 else "<0.001 → ")
    # Holm over the report's whole family: every printed "raw → Holm" pair, adjusted by hand.
    data = [line for line in wins.splitlines() if line.startswith(("| table1 |", "| vit_ablation |", "| boom |"))]
    pairs = [[c.strip(" |") for c in line.split(" | ")][i].split(" → ") for line in data for i in (7, 10)]
    raw = [float(a) for a, b in pairs if a not in ("—", "<0.001")]
    assert raw and all(b in ("—", "<0.001") or float(b) >= float(a) - 1e-3
                       for a, b in pairs if a not in ("—", "<0.001"))
    for line in wins.splitlines():
        if not line.startswith(("| table1 |", "| vit_ablation |", "| boom |")):
            continue
        cells = [c.strip(" |") for c in line.split(" | ")]
        for holm_v, ps in ((cells[5], cells[7]), (cells[8], cells[10])):
            holm_p = ps.split(" → ")[1]
            if holm_p == "—":
                continue
            separated = holm_p == "<0.001" or float(holm_p) < 0.05
            assert (holm_v != "not separated") == separated, line
    for exp in ("table1", "vit_ablation", "boom"):
        rows = [[c.strip(" |") for c in line.split(" | ")] for line in wins.splitlines()
                if line.startswith(f"| {exp} |")]
        holm_cells = [r[i] for r in rows for i in (5, 8)]
        counts = [sum(c == v for c in holm_cells) for v in ("PROFIT better", "not separated", "PROFIT worse")]
        assert (f"- **{exp}**: Holm: wins {counts[0]}, not separated {counts[1]}, losses {counts[2]}" in wins), exp


def test_suite_reports_exactly_the_experiments_whose_latest_sweep_has_the_tag(base, tmp_path, capsys):
    out = tmp_path / "suite"
    assert main(["--suite", SUITE, "--tracking-uri", base["uri"], "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert set(pd.read_csv(out / "runs.csv")["experiment"]) == {"table1", "vit_ablation"}  # not optuna's old sweep
    assert md.startswith(f"# PROFIT report — suite {SUITE}: table1 (paper table 1), vit_ablation\n")
    assert "nan" not in md.lower()
    row = _row(md, "| table1 |")
    assert row == ["table1", "toy", "mlp", "old_train 512, old_val 64, new_train 256", "20 steps", "6", "3", "1h02m",
                   "0123456789", "Synthetic CPU", f"`{SUITE_COMMAND}`"]
    assert _row(md, "| vit_ablation |")[1:3] == ["fmnist", "vit_micro"] and "| 1m35s |" in md
    assert "## Where PROFIT wins, loses or is not separated (paired, test, Holm-adjusted)" in md
    assert "## Pretrained backbones" in md
    assert main(["--suite", "nope", "--tracking-uri", base["uri"], "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "suite=nope" in err[0] and SUITE in err[0] and "other" in err[0]
    with pytest.raises(SystemExit):
        main(["--suite", SUITE, "--experiment", "table1"])
