"""analysis/: statistics against scipy, and the report end to end from synthetic MLflow stores in the CONTRACT §3
layout (search runs, protocol-chosen confirmation runs), built in a tmp sqlite file in seconds.

The synthetic sweep: per arm a grid of hyperparameter points; validation metrics trade old against new along the
grid, test = validation + independent noise. Confirmation runs are the protocol's choices on validation."""
import itertools
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis import load, stats
from analysis.figures import DPI, FIGSIZE, staircase
from analysis.report import main
from analysis.tables import load_paper
from profit_bench import protocol

ROOT = Path(__file__).resolve().parents[1]
CONFIRM_SEEDS = [1000, 1001, 1002]
SEARCH_TEST_SENTINEL = 7.777  # search runs' test metrics: never in a table or a test front


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
    assert stats.fmt_stat(stats.mean_ci([0.25]), "mse") == "0.25 (n=1)"
    assert stats.fmt_stat(stats.mean_ci([np.nan]), "mse") == "—"
    s = stats.mean_ci([0.5, 0.7])
    assert stats.fmt_stat(s, "accuracy") == f"60.00 ± 10.00 [{s.lo * 100:.2f}, {s.hi * 100:.2f}] (n=2)"


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


# ---------------------------------------------------------------------------------------------- synthetic stores
TOY = dict(task="toy", model="mlp", metric="mse", before=(0.005, 1.9, 0.006, 1.95), table="1", steps=20, arms={
    "full": (dict(method="full", optimizer="rmsprop"), [dict(lr=v) for v in (1e-4, 5e-4, 2e-3)]),
    "head": (dict(method="head", optimizer="rmsprop"), [dict(lr=v) for v in (1e-4, 5e-4, 2e-3)]),
    "profit": (dict(method="profit", optimizer="rmsprop", profit=True, ratio=100.0, n_ref=1),
               [dict(lr=v) for v in (1e-4, 5e-4, 2e-3)])})
GRID9 = dict(task="fmnist", model="resnet18", metric="accuracy", before=(0.95, 0.2, 0.94, 0.2), table="9", arms={
    "adam": (dict(method="full", optimizer="adam", lr=1e-4), [dict(weight_decay=v) for v in (0.0, 0.01)]),
    "profit": (dict(method="profit", optimizer="adam", profit=True, lr=1e-4, n_ref=1),
               [dict(ratio=v) for v in (10.0, 100.0, 1000.0)])})
OPTUNA = dict(task="digits", model="mlp", metric="accuracy", before=(0.97, 0.2, 0.96, 0.2), table="", arms={
    "full": (dict(method="full", optimizer="adam"), [dict(lr=v) for v in (3e-4, 1e-3, 3e-3)]),
    "profit": (dict(method="profit", optimizer="adam", profit=True, n_ref=1),
               [dict(lr=v, ratio=r) for v, r in ((3e-4, 20.0), (1e-3, 300.0), (3e-3, 4000.0))])})


def _outcome(rng, spec, arm, i, n_points):
    """Validation (old, new) along a trade-off: later grid points learn more and forget more; PROFIT forgets
    less. Errors for MSE, accuracies otherwise; test = validation + independent noise."""
    x = (i + 1) / (n_points + 1)
    shift = 0.05 if arm == "profit" else 0.0
    if spec["metric"] == "mse":
        old, new = 0.02 + 0.6 * x - shift, 0.45 + 0.3 * (1 - x)
    else:
        old, new = 0.9 - 0.5 * x + shift, 0.5 + 0.3 * x
    old, new = old + rng.normal(0, 0.01), new + rng.normal(0, 0.01)
    return old, new, old + rng.normal(0, 0.02), new + rng.normal(0, 0.02)


def _log_run(client, exp_id, parent, spec, *, arm, stage, seed, params, values, config_key, choice=None,
             status="ok"):
    from mlflow.entities import Metric, Param
    old_v, new_v, old_t, new_t = values
    hib = spec["metric"] != "mse"
    ob, nb, obt, nbt = spec["before"]
    tags = {"mlflow.parentRunId": parent, "profit_bench.role": "trial", "stage": stage, "arm": arm,
            "config_key": config_key, "status": status, "metric_name": spec["metric"],
            "higher_is_better": str(hib), "ray_trial_id": f"{arm}-{config_key}-{seed}"}
    if choice:
        tags["choice"] = choice
    rid = client.create_run(exp_id, tags=tags).info.run_id
    is_profit = bool(params.get("profit"))
    sign = 1.0 if hib else -1.0
    final = dict(old_val=old_v, new_val=new_v, old_test=old_t, new_test=new_t, old_val_before=ob,
                 new_val_before=nb, old_test_before=obt, new_test_before=nbt,
                 forgetting_val=sign * (ob - old_v), forgetting_test=sign * (obt - old_t),
                 step_time_median_s=0.002 * (1.3 if is_profit else 1.0), peak_mem_bytes=1e7, wall_time_s=1.0,
                 n_trainable=250_000, profit_state_bytes=1e6 if is_profit else 0.0, extra_state_bytes=0.0,
                 main_steps=20)
    if hib:
        final.update(chance_old=0.2, chance_new=0.2)
    history = [dict(old_val=ob, new_val=nb), dict(old_val=(ob + old_v) / 2, new_val=(nb + new_v) / 2),
               dict(old_val=old_v, new_val=new_v)]
    if is_profit:
        final["profit_projected_frac"] = 0.4
        for e, h in enumerate(history[1:], 1):
            h.update(profit_projected_frac=0.3 + 0.1 * e, profit_cos_g_delta=-0.2 * e)
    metrics = [Metric(k, v, 0, 10 * e) for e, row in enumerate(history) for k, v in row.items()]
    metrics += [Metric(k, float(v), 0, 20) for k, v in final.items() if k not in history[-1]]
    all_params = dict(task=spec["task"], model=spec["model"], seed=seed, device="cpu", steps=20, **params)
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in all_params.items()])
    client.set_terminated(rid)
    return rid


def add_sweep(client, name, spec, *, seed=0, explode=False, shuffle_test=False):
    """A search stage (2 seeds per grid point), then confirmation runs of protocol.confirm_choices."""
    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id, tags={"profit_bench.role": "sweep", "sweep": name, "table": spec["table"]})
    parent = parent.info.run_id
    rng = np.random.default_rng(seed)
    hib = spec["metric"] != "mse"
    search = []
    for arm, (base, points) in spec["arms"].items():
        for i, (point, s) in enumerate(itertools.product(points, (0, 1))):
            old_v, new_v, _, _ = _outcome(rng, spec, arm, i // 2, len(points))
            key = f"{arm}-{sorted(point.items())}"
            search.append(dict(arm=arm, seed=s, params={**base, **point}, config_key=key, old_val=old_v,
                               new_val=new_v, old_val_before=spec["before"][0], new_val_before=spec["before"][1],
                               values=(old_v, new_v, SEARCH_TEST_SENTINEL, SEARCH_TEST_SENTINEL)))
    if explode:  # a PROFIT trial that blew up to finite values, logged as ok by the sweep
        base, _ = spec["arms"]["profit"]
        search.append(dict(arm="profit", seed=0, params={**base, "lr": 0.5}, config_key="profit-boom",
                           old_val=2.2e6, new_val=7.1e6, old_val_before=spec["before"][0],
                           new_val_before=spec["before"][1], values=(2.2e6, 7.1e6, 2.3e6, 7.0e6)))
    frame = protocol.mark_diverged(pd.DataFrame(search), hib)
    chosen = stats.merge_choices(protocol.confirm_choices(frame, hib))  # as the sweep should: one per config
    confirm = []
    for _, c in chosen.iterrows():
        for s in CONFIRM_SEEDS:
            x = _outcome(rng, spec, c["arm"], 0, 1)
            shift = c["old_val"] - x[0], c["new_val"] - x[1]  # centred on the chosen point, fresh noise
            vals = (x[0] + shift[0], x[1] + shift[1], x[2] + shift[0], x[3] + shift[1])
            confirm.append(dict(arm=c["arm"], seed=s, params=c["params"], config_key=c["config_key"],
                                choice=c["choice"], values=vals))
    if shuffle_test:  # permute test metrics across confirmation runs, scramble the search runs': validation stays
        other = np.random.default_rng(99)
        perm = other.permutation(len(confirm))
        tests = [confirm[j]["values"][2:] for j in perm]
        for r, t in zip(confirm, tests):
            r["values"] = r["values"][:2] + t
        for r in search:
            r["values"] = r["values"][:2] + tuple(other.uniform(0.3, 0.9, size=2))
    for r in search:
        _log_run(client, exp_id, parent, spec, stage="search", arm=r["arm"], seed=r["seed"], params=r["params"],
                 values=r["values"], config_key=r["config_key"])
    for r in confirm:
        _log_run(client, exp_id, parent, spec, stage="confirm", arm=r["arm"], seed=r["seed"], params=r["params"],
                 values=r["values"], config_key=r["config_key"], choice=r["choice"])
    return confirm


def _store(tmp_path_factory, name):
    from mlflow.tracking import MlflowClient
    d = tmp_path_factory.mktemp(name)
    uri = f"sqlite:///{d}/mlflow.db"
    return uri, MlflowClient(uri), d


def _report(uri, out, *experiments):
    assert main(["--experiment", *experiments, "--tracking-uri", uri, "--out", str(out)]) == 0
    return (out / "report.md").read_text()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One store, one report: toy Table 1 (grid over lr), an accuracy ratio grid (Table 9), an Optuna-like
    sweep, and two copies of the toy sweep (same seed, no table): one with a PROFIT trial that exploded to finite
    values, one with its confirmation runs' test metrics shuffled."""
    uri, client, d = _store(tmp_path_factory, "base")
    confirm = {"table1": add_sweep(client, "table1", TOY), "table9": add_sweep(client, "table9", GRID9),
               "optuna": add_sweep(client, "optuna", OPTUNA)}
    add_sweep(client, "boom", {**TOY, "table": ""}, explode=True)
    add_sweep(client, "shuffled", {**TOY, "table": ""}, shuffle_test=True)
    client.create_experiment("empty")
    md = _report(uri, d / "report", "table1", "table9", "optuna", "boom", "shuffled")
    return dict(uri=uri, dir=d, md=md, out=d / "report", confirm=confirm)


def section(md: str, start: str, end: str = "\n## ") -> str:
    return md.split(start, 1)[1].split(end, 1)[0]


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
    want = stats.fmt_stat(stats.mean_ci(olds), "mse")
    row = next(line for line in t1.splitlines() if line.startswith(f"| profit | {choice} |"))
    assert want in row and "(n=3)" in row and "| 0.046 |" in row  # beside the paper's PROFIT row
    t9 = section(tables, "### Table 9 —", "\n### ")
    assert "stand-in for CIFAR-10 → CIFAR-100" in t9
    assert all("(n=3)" in line for line in t9.splitlines()[6:] if line.startswith("| ResNet-18 | 10"))


def test_search_grid_cells_are_validation_means_over_search_seeds(base):
    runs = pd.read_csv(base["out"] / "runs.csv")
    grid = section(base["md"], "## Search grid")
    g = runs[(runs["experiment"] == "table9") & (runs["stage"] == "search") & (runs["ratio"] == 100.0)]
    want = stats.fmt_stat(stats.mean_ci(g["old_val"]), "accuracy", ci=False)
    assert want.endswith("(n=2)") and f"| profit | lr=0.0001, ratio=100 | {want} |" in grid
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
    assert f"[{lo:.4g}, {hi:.4g}] (n=3)" in row


def test_histories_keep_the_evaluation_where_the_final_result_shares_its_step(base):
    runs = pd.read_csv(base["out"] / "runs.csv")
    rid = runs.loc[(runs["experiment"] == "table1") & runs["is_profit"], "run_id"].iloc[0]
    hist = load.metric_histories({"p": rid}, base["uri"], ["profit_projected_frac", "old_val"])
    frac = hist[hist["key"] == "profit_projected_frac"]
    assert list(frac["step"]) == [10, 20] and frac["value"].iloc[-1] == pytest.approx(0.5)  # not the final 0.4
    assert list(hist.loc[hist["key"] == "old_val", "step"]) == [0, 10, 20]


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


def _lines(md: str, start: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(start)]


def part(md: str, top: str, experiment: str) -> str:
    """The subsection of experiment `experiment` in section `top`, its name replaced so copies compare equal."""
    return section(section(md, top), f"### {experiment}: ", "\n### ").replace(experiment, "EXP")


def selection_of(out: Path, experiment: str) -> pd.DataFrame:
    sel = pd.read_csv(out / "selection.csv")
    return sel[sel["experiment"] == experiment].drop(columns="experiment").reset_index(drop=True)


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


def test_cli_keeps_its_flags():
    r = subprocess.run([sys.executable, "-m", "analysis.report", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--experiment", "--tracking-uri", "--out", "--runs"):
        assert flag in r.stdout


def test_unreachable_tracking_server_fails_fast_on_one_line():
    import time
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "analysis.report", "--experiment", "x", "--tracking-uri",
                        "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and time.monotonic() - t0 < 15
    assert r.stderr.strip().count("\n") == 0 and "http://127.0.0.1:9" in r.stderr
