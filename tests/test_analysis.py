"""analysis/: statistics against scipy, and the report end to end from synthetic MLflow stores in the MLflow
layout of docs/architecture.md (search runs, protocol-chosen confirmation runs), built in a tmp sqlite file in
seconds.

The synthetic sweep: per arm a grid of hyperparameter points; validation metrics trade old against new along the
grid, test = validation + independent noise. Confirmation runs are the protocol's choices on validation. Optional:
an ablation stage around a PROFIT arm's knee (n_ref, then ratio, on confirmation seeds), pretraining curves and
suite tags on the sweep's parent run."""
import itertools
import json
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
SUITE = "suite_cpu"
SUITE_COMMAND = "python -m profit_bench.sweep suite_cpu --set budget.steps=20"


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

VIT = dict(task="fmnist", model="vit_micro", metric="accuracy", before=(0.93, 0.2, 0.92, 0.2), table="", arms={
    "adam": (dict(method="full", optimizer="adam"), [dict(lr=1e-4)]),
    "profit": (dict(method="profit", optimizer="adam", profit=True, n_ref=1, ratio=1000.0),
               [dict(lr=v) for v in (1e-4, 1e-3)])})


def still_improving(seed):  # MSE falling by ~half over the last 3 of 10 evaluations
    return [0.05 * 0.8 ** i + 0.001 * np.sin(seed + i) for i in range(10)]


def flat_accuracy(seed):  # risen fast, then flat: far below 0.5 points over the last 3 evaluations
    return [0.9 - 0.3 * 0.3 ** i + 0.0005 * np.cos(seed * 3 + i) for i in range(8)]


def rising_accuracy(seed):  # +2 points per evaluation to the end
    return [0.5 + 0.02 * i + 0.001 * np.sin(seed + 2 * i) for i in range(6)]


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
             status="ok", knob=None, updates=False):
    from mlflow.entities import Metric, Param
    old_v, new_v, old_t, new_t = values
    hib = spec["metric"] != "mse"
    ob, nb, obt, nbt = spec["before"]
    tags = {"mlflow.parentRunId": parent, "profit_bench.role": "trial", "stage": stage, "arm": arm,
            "config_key": config_key, "status": status, "metric_name": spec["metric"],
            "higher_is_better": str(hib), "ray_trial_id": f"{arm}-{config_key}-{seed}"}
    if choice:
        tags["choice"] = choice
    if updates:  # batches: a tag of a finished run (tracking.TAG_NUMBERS); PROFIT (n_ref 1) 2 batches per update
        tags["batches"] = "20"
    if knob:
        tags["ablation_knob"] = knob
    rid = client.create_run(exp_id, tags=tags).info.run_id
    is_profit = bool(params.get("profit"))
    sign = 1.0 if hib else -1.0
    final = dict(old_val=old_v, new_val=new_v, old_test=old_t, new_test=new_t, old_val_before=ob,
                 new_val_before=nb, old_test_before=obt, new_test_before=nbt,
                 forgetting_val=sign * (ob - old_v), forgetting_test=sign * (obt - old_t),
                 # PROFIT: cheap reference batches pull its per-batch median below the main optimizer's, while a
                 # main step (a whole n_ref + 1 cycle) costs 3× and a trial 2.5×
                 step_time_median_s=0.002 * (0.8 if is_profit else 1.0), train_time_s=0.04 * (3 if is_profit else 1),
                 peak_mem_bytes=1e7, wall_time_s=2.5 if is_profit else 1.0,
                 n_trainable=250_000, profit_state_bytes=1e6 if is_profit else 0.0, extra_state_bytes=0.0,
                 main_steps=20)
    if hib:
        final.update(chance_old=0.2, chance_new=0.2)
    history = [dict(old_val=ob, new_val=nb), dict(old_val=(ob + old_v) / 2, new_val=(nb + new_v) / 2),
               dict(old_val=old_v, new_val=new_v)]
    if updates:  # per-evaluation main_steps, as the sweep logs them: PROFIT (n_ref 1) half a plain optimizer's
        for e, h in enumerate(history[1:], 1):
            h["main_steps"] = float(e * (5 if is_profit else 10))
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


def add_sweep(client, name, spec, *, seed=0, explode=False, shuffle_test=False, ablate=None, pretrain=None,
              parent_tags=None, parent_params=None, parent_metrics=None, updates=False):
    """A search stage (2 seeds per grid point), then confirmation runs of protocol.confirm_choices; with `ablate`
    ({arm, seeds, failed}) the ablation stage around that arm's knee: n_ref over {1, 2, 5}, ratio over {10, …,
    10000}, on the first `seeds` confirmation seeds, the knee's own value not re-run (and one failed run when
    `failed`). `pretrain`: model → f(seed) → curve, logged on the parent as pretrain.<model>.seed<S>.old_val.
    Returns {"confirm": [...], "ablation": [...]}, the logged records."""
    from mlflow.entities import Metric, Param
    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id, tags={"profit_bench.role": "sweep", "sweep": name, "table": spec["table"],
                                             **(parent_tags or {})})
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
    ablation = []
    if ablate:
        knee = chosen[(chosen["arm"] == ablate["arm"]) & chosen["choice"].str.contains("knee")].iloc[0]
        for knob, grid in (("n_ref", (1, 2, 5)), ("ratio", (10.0, 100.0, 1000.0, 10000.0))):
            for v in grid:
                if float(v) == float(knee["params"][knob]):
                    continue  # the knee itself: its confirmation runs
                step = np.log10(v) if knob == "ratio" else v
                params = {**knee["params"], knob: v}
                for s in CONFIRM_SEEDS[:ablate["seeds"]]:
                    noise = rng.normal(0, 0.01, size=2)
                    vals = (knee["old_val"], knee["new_val"], knee["old_val"] - 0.01 * step + noise[0],
                            knee["new_val"] + 0.005 * step + noise[1])
                    ablation.append(dict(arm=ablate["arm"], seed=s, params=params, knob=knob, value=v,
                                         config_key=f"{knee['config_key']}-{knob}={v}", values=vals, status="ok"))
        if ablate.get("failed"):  # the last value's last seed failed: that row has n = 1
            ablation[-1]["status"] = "failed"
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
                 values=r["values"], config_key=r["config_key"], choice=r["choice"], updates=updates)
    for r in ablation:
        _log_run(client, exp_id, parent, spec, stage="ablation", arm=r["arm"], seed=r["seed"], params=r["params"],
                 values=r["values"], config_key=r["config_key"], choice="ablation", knob=r["knob"],
                 status=r["status"])
    metrics = [Metric(k, float(v), 0, 0) for k, v in (parent_metrics or {}).items()]
    for model, curve in (pretrain or {}).items():
        for s in [0, 1] + CONFIRM_SEEDS:
            metrics += [Metric(f"pretrain.{model}.seed{s}.old_val", float(v), 0, i + 1)
                        for i, v in enumerate(curve(s))]
    client.log_batch(parent, metrics=metrics,
                     params=[Param(k, str(v)) for k, v in (parent_params or {}).items()])
    client.set_terminated(parent)
    return dict(confirm=confirm, ablation=ablation)


def suite_parent(name, spec, suite=SUITE, wall=3725.0):
    """The tags, params and metrics a suite's sweep parent carries."""
    import yaml
    resolved = dict(name=name, task=spec["task"], search="grid", num_samples=1, confirm_seeds=len(CONFIRM_SEEDS),
                    budget={"steps": spec.get("steps", 20)}, seeds=[0, 1])
    return dict(parent_tags={"suite": suite, "suite_command": SUITE_COMMAND, "git_commit": "0123456789abcdef",
                             "device_name": "Synthetic CPU"},
                parent_params={"sweep.yaml": yaml.safe_dump(resolved, sort_keys=False), "trials_per_arm": 6,
                               "data_sizes": json.dumps({"old_train": 512, "old_val": 64, "new_train": 256})},
                parent_metrics={"wall_time_s": wall})


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
    for flag in ("--experiment", "--suite", "--tracking-uri", "--out", "--runs"):
        assert flag in r.stdout


def test_unreachable_tracking_server_fails_fast_on_one_line():
    import time
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "analysis.report", "--experiment", "x", "--tracking-uri",
                        "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and time.monotonic() - t0 < 15
    assert r.stderr.strip().count("\n") == 0 and "http://127.0.0.1:9" in r.stderr


# ---------------------------------------------------------------------------------------------- ablation stage
def _t_cells(values, scale: float, spec: str) -> list[str]:
    """The report's two cells of `values`, computed with numpy/scipy: "mean ± s.e." and the 95 % t-interval
    "[lo, hi]" ("—" for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return [format(v[0] * scale, spec), "—"]
    m, se = v.mean(), scipy.stats.sem(v)
    lo, hi = scipy.stats.t.interval(0.95, len(v) - 1, loc=m, scale=se)
    f = lambda x: format(x * scale, spec)  # noqa: E731
    return [f"{f(m)} ± {f(se)}", f"[{f(lo)}, {f(hi)}]"]


def _row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip("|").split(" | ")]


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
