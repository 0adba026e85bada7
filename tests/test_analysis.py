"""analysis/: Pareto set + hypervolume against brute force, mean ± s.e. against scipy, and the report end to end
from MLflow stores (runs logged in the documented layout, and a real tiny sweep when profit_bench.sweep exists)."""
import importlib.util
import itertools
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from analysis.pareto import hypervolume_2d, mean_se, pareto_mask, to_maximize
from analysis.report import DPI, FIGSIZE, load_paper, main, staircase

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = [(True, True), (False, False), (True, False), (False, True)]


# ---------------------------------------------------------------------------------------------- brute force
def brute_pareto(p, hib):
    m = to_maximize(p, hib)
    keep = []
    for i, a in enumerate(m):
        dominated = any((b >= a).all() and (b > a).any() for j, b in enumerate(m) if j != i)
        keep.append(not dominated)
    return np.array(keep)


def brute_hypervolume(p, ref, hib):
    """Area of the union of boxes [ref, p_i] on the grid of all coordinates: every grid cell is either fully
    covered by some box or not at all."""
    m, r = to_maximize(p, hib), to_maximize([ref], hib)[0]
    xs = np.unique(np.r_[m[:, 0], r[0]])
    ys = np.unique(np.r_[m[:, 1], r[1]])
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs[:-1], xs[1:]), zip(ys[:-1], ys[1:])):
        if x0 < r[0] or y0 < r[1]:
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if ((m[:, 0] >= cx) & (m[:, 1] >= cy)).any():
            area += (x1 - x0) * (y1 - y0)
    return area


def random_points(rng, n, integer):
    # Integer points on a small grid force ties in x, in y, and exact duplicates.
    return rng.integers(0, 6, size=(n, 2)).astype(float) if integer else rng.normal(size=(n, 2))


@pytest.mark.parametrize("hib", DIRECTIONS)
def test_pareto_mask_matches_brute_force(hib):
    rng = np.random.default_rng(0)
    n_ties = 0
    for trial in range(200):
        p = random_points(rng, int(rng.integers(1, 25)), integer=trial % 2 == 0)
        np.testing.assert_array_equal(pareto_mask(p, hib), brute_pareto(p, hib), err_msg=str(p))
        n_ties += len(np.unique(p, axis=0)) < len(p)
    assert n_ties > 50  # the battery really exercised duplicates


def test_pareto_mask_keeps_duplicates_drops_nan_and_handles_mixed_directions():
    # (old MSE lower-better, new accuracy higher-better)
    p = np.array([[0.1, 0.5], [0.1, 0.5], [0.2, 0.9], [0.3, 0.9], [0.05, 0.2], [np.nan, 1.0], [0.1, 0.4]])
    np.testing.assert_array_equal(pareto_mask(p, (False, True)), [1, 1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(pareto_mask(p, (True, True)), [0, 0, 0, 1, 0, 0, 0])


@pytest.mark.parametrize("hib", DIRECTIONS)
def test_hypervolume_matches_brute_force(hib):
    rng = np.random.default_rng(1)
    for trial in range(150):
        p = random_points(rng, int(rng.integers(1, 15)), integer=trial % 2 == 0)
        # a reference inside the cloud, so some points do not beat it and must add nothing
        ref = np.quantile(p, 0.3, axis=0) if trial % 3 else p.min(axis=0) * np.where(hib, 1, -1) - 1
        ref = np.where(hib, ref, -np.abs(ref)) if trial % 3 == 0 else ref
        got, want = hypervolume_2d(p, ref, hib), brute_hypervolume(p, ref, hib)
        assert got == pytest.approx(want, abs=1e-9), (p, ref)


def test_hypervolume_known_values():
    assert hypervolume_2d([[1, 1]], [0, 0]) == 1.0
    assert hypervolume_2d([[2, 1], [1, 2]], [0, 0]) == 3.0  # two 2×1 boxes overlapping in 1×1
    assert hypervolume_2d([[2, 1], [2, 1], [1, 1]], [0, 0]) == 2.0  # duplicates and dominated points add nothing
    # lower-is-better x (MSE 0.1 vs reference 0.5), higher-is-better y (acc 0.8 vs 0.2)
    assert hypervolume_2d([[0.1, 0.8]], [0.5, 0.2], (False, True)) == pytest.approx(0.4 * 0.6)
    assert hypervolume_2d([[1, 1]], [1, 0]) == 0.0  # on the reference: no area


@pytest.mark.parametrize("hib", DIRECTIONS)
def test_staircase_encloses_the_hypervolume(hib):
    rng = np.random.default_rng(2)
    p = rng.normal(size=(12, 2))
    front = p[pareto_mask(p, hib)]
    ref = to_maximize([to_maximize(p, hib).min(axis=0) - 0.5], hib)[0]
    v = to_maximize(staircase(front, hib), hib)
    r = to_maximize([ref], hib)[0]
    poly = np.vstack([[r[0], v[0, 1]], v, [v[-1, 0], r[1]], r])  # close the staircase at the reference corner
    shoelace = 0.5 * abs(np.dot(poly[:, 0], np.roll(poly[:, 1], 1)) - np.dot(poly[:, 1], np.roll(poly[:, 0], 1)))
    assert shoelace == pytest.approx(hypervolume_2d(p, ref, hib))


def test_mean_se_matches_numpy_and_scipy():
    v = [0.61, 0.64, 0.58, 0.66, np.nan]
    m, se, n = mean_se(v)
    assert n == 4
    assert m == pytest.approx(np.mean(v[:4]))
    assert se == pytest.approx(scipy.stats.sem(v[:4]))
    assert mean_se([1.0, 2.0, 3.0, 4.0])[:2] == pytest.approx((2.5, np.sqrt(5 / 3) / 2))
    m1, se1, n1 = mean_se([0.5])
    assert (m1, n1) == (0.5, 1) and np.isnan(se1)


def test_paper_tables_yaml_has_every_table():
    paper = load_paper()
    assert {f"table{n}" for n in (1, 2, 6, 7, 8, 9, 11, 12, 14)} <= set(paper)
    assert len(paper["table2"]["rows"]) == 15 and len(paper["table9"]["rows"]) == 12
    assert paper["table9"]["rows"][6] == {"model": "vit_tiny", "ratio": 1000, "old": 58.53, "new": 62.20}
    assert paper["table1"]["rows"][3]["old"] == 0.046


# ---------------------------------------------------------------------------------------------- end to end
def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _log_trial(client, exp_id, parent_id, params, final, history, status="ok", metric="accuracy", hib=True):
    from mlflow.entities import Metric, Param
    run = client.create_run(exp_id, tags={"mlflow.parentRunId": parent_id, "profit_bench.role": "trial",
                                          "ray_trial_id": f"t{params['seed']}", "status": status,
                                          "metric_name": metric, "higher_is_better": str(hib)})
    rid = run.info.run_id
    metrics = [Metric(k, v, 0, e) for e, row in enumerate(history) for k, v in row.items()]
    metrics += [Metric(k, v, 0, len(history)) for k, v in final.items()]
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(rid)
    return rid


def _fake_experiment(client, name, trials):
    exp_id = client.create_experiment(name)
    parent = client.create_run(exp_id, tags={"profit_bench.role": "sweep"})
    client.log_param(parent.info.run_id, "sweep.yaml", "fake")
    return [_log_trial(client, exp_id, parent.info.run_id, *t) for t in trials]


def _accuracy_trial(rng, seed, model="resnet18", task="fmnist", method="full", optimizer="adam", profit=False,
                    ratio=100.0, n_ref=1, lr=1e-3, status="ok", mem=1e8, step=0.01):
    params = dict(task=task, model=model, seed=seed, method=method, optimizer=optimizer, lr=lr, profit=profit,
                  ratio=ratio, n_ref=n_ref, device="cpu", limit=None, data_dir=None)
    old, new = float(rng.uniform(0.3, 0.9)), float(rng.uniform(0.5, 0.95))
    final = dict(old_metric=old, new_metric=new, old_before=0.97, new_before=0.2, forgetting=0.97 - old,
                 peak_mem_bytes=mem * (1.3 if profit else 1), step_time_median_s=step * (1.4 if profit else 1),
                 wall_time_s=1.0, n_trainable=1000)
    history = [dict(old_metric=0.97 - (0.97 - old) * e / 2, new_metric=0.2 + (new - 0.2) * e / 2) for e in (1, 2)]
    return params, final, history, status


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """Three experiments in the documented layout: toy (MSE), a mixed CIFAR-style one, and table12."""
    from mlflow.tracking import MlflowClient
    d = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{d}/mlflow.db"
    client = MlflowClient(uri)
    rng = np.random.default_rng(0)
    toy = []
    for seed, (method, profit) in itertools.product(range(3), [("full", False), ("head", False), ("profit", True)]):
        params = dict(task="toy", model="mlp", seed=seed, method=method, optimizer="rmsprop", lr=5e-4,
                      profit=profit, ratio=100.0, n_ref=1, limit=2000)
        old, new = float(rng.uniform(0.01, 0.8)), float(rng.uniform(0.4, 0.6))
        final = dict(old_metric=old, new_metric=new, old_before=0.005, new_before=1.9, forgetting=old - 0.005,
                     peak_mem_bytes=1e7, step_time_median_s=0.002, wall_time_s=1.0, n_trainable=250_000)
        toy.append((params, final, [dict(old_metric=old, new_metric=new)], "ok", "mse", False))
    main_trials = []
    for seed in range(2):
        for opt in ("sgd", "adam"):
            main_trials.append(_accuracy_trial(rng, seed, optimizer=opt))
        for ratio in (10.0, 100.0, 1000.0, 10000.0):
            main_trials.append(_accuracy_trial(rng, seed, method="profit", profit=True, ratio=ratio))
        for n_ref in (2, 5):
            main_trials.append(_accuracy_trial(rng, seed, method="profit", profit=True, n_ref=n_ref))
        main_trials.append(_accuracy_trial(rng, seed, model="vit_tiny", method="lora", optimizer="adam"))
        main_trials.append(_accuracy_trial(rng, seed, model="vit_tiny", method="lora", optimizer="adam",
                                           profit=True))
    main_trials.append(_accuracy_trial(rng, 9, optimizer="adam", status="diverged"))
    t12 = [_accuracy_trial(rng, seed, model="vit_small", task="digits", method="profit", optimizer="adamw",
                           profit=True, ratio=r, lr=1e-2) for seed in range(2) for r in (10.0, 100.0, 1000.0, 1e4)]
    t12 += [_accuracy_trial(rng, seed, model="vit_small", task="digits", optimizer="adamw") for seed in range(2)]
    ids = dict(toy=_fake_experiment(client, "table1_toy", toy), main=_fake_experiment(client, "mixed", main_trials),
               t12=_fake_experiment(client, "table12_ratio", t12))
    client.create_experiment("empty")
    return dict(uri=uri, client=client, ids=ids, main_trials=main_trials)


@pytest.fixture(scope="module")
def fake_report(fake_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rc = main(["--experiment", "table1_toy", "mixed", "table12_ratio", "--tracking-uri", fake_store["uri"],
               "--out", str(out)])
    assert rc == 0
    return out, (out / "report.md").read_text()


def test_report_has_every_paper_table_and_labels_stand_ins(fake_report):
    out, md = fake_report
    for n in (1, 2, 7, 8, 9, 11, 12):
        assert f"### Table {n} —" in md, f"Table {n} missing"
    headers = [line for line in md.splitlines() if line.startswith("### Table")]
    for h in headers:
        if "Table 1 " in h:
            assert "toy" in h
        elif "Table 12" in h:
            assert "STAND-IN" in h and "not DriveLM" in h
        else:  # every accuracy table here runs on fmnist/digits, never on CIFAR
            assert "stand-in for CIFAR-10 → CIFAR-100" in h, h
    assert "ours on CIFAR" not in md
    t12 = md.split("### Table 12")[1]
    assert "| full+adamw | — |" in t12 and "| 62.21 | 56.98 |" in t12  # AdamW beside the paper's Table 4 row
    assert "| PROFIT(adamw) | 10000 |" in t12 and "| 67.88 | 59.16 |" in t12


def test_report_numbers_match_the_logged_runs(fake_report, fake_store):
    _, md = fake_report
    # Table 9, ratio 1000 row: mean ± s.e. of the two seeds' logged final metrics, in percent.
    finals = [f for p, f, _, s in fake_store["main_trials"] if p["method"] == "profit" and p["ratio"] == 1000.0]
    old = [f["old_metric"] * 100 for f in finals]
    want = f"{np.mean(old):.2f} ± {scipy.stats.sem(old):.2f}"
    t9 = md.split("### Table 9")[1].split("###")[0]
    row = next(line for line in t9.splitlines() if line.startswith("| ResNet-18 | 1000 |"))
    assert want in row and "| 34.35 |" in row  # ours beside the paper's 34.35 %
    # Global hypervolume of the mixed experiment's resnet18 cells, from the cell means, by brute force.
    cells = {}
    for p, f, _, s in fake_store["main_trials"]:
        if p["model"] == "resnet18" and s == "ok":
            cells.setdefault((p["method"], p["optimizer"], p["ratio"], p["n_ref"]), []).append(
                (f["old_metric"], f["new_metric"]))
    pts = np.array([np.mean(v, axis=0) for v in cells.values()])
    ref = (pts[:, 0].min(), min(pts[:, 1].min(), 0.2))
    section = md.split("### Fashion-MNIST 0–4 → 5–9 — ResNet-18")[1]
    assert f"together = {brute_hypervolume(pts, ref, (True, True)):.4g} (" in section
    # The diverged run is counted, not averaged.
    assert "1 diverged" in md


def test_report_figures_are_pngs_of_the_stated_size(fake_report):
    out, md = fake_report
    expected = {"pareto_toy_mlp.png": "pareto", "pareto_fmnist_resnet18.png": "pareto",
                "ablation_ratio_fmnist.png": "wide", "ablation_n_ref_fmnist.png": "wide",
                "curves_fmnist_resnet18.png": "wide", "cost_fmnist.png": "wide", "cost_toy.png": "wide"}
    for name, kind in expected.items():
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, name
        w, h = FIGSIZE[kind]
        assert png_size(path) == (round(w * DPI), round(h * DPI)), name
        assert f"]({name})" in md


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "analysis.report", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_missing_and_empty_experiment_exit_2_with_one_line(fake_store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    empty_store = f"sqlite:///{tmp_path}/empty.db"
    MlflowClient(empty_store).create_experiment("nothing_yet")
    capsys.readouterr()  # drop MLflow's own "creating tables" log lines
    cases = (([ "--experiment", "nope", "--tracking-uri", fake_store["uri"]], "no experiment 'nope'"),
             (["--experiment", "empty", "--tracking-uri", fake_store["uri"]], "has no trial runs"),
             (["--tracking-uri", f"sqlite:///{tmp_path}/absent.db"], "no MLflow store at"),
             (["--tracking-uri", empty_store], "no trial runs in any experiment"))
    for args, words in cases:
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
        assert not (tmp_path / "out").exists() and not (tmp_path / "absent.db").exists()


# ---------------------------------------------------------------------------------------------- a real sweep
TINY_SWEEP = """\
name: tiny_analysis
task: toy
models: [mlp]
seeds: [0, 1]
search: grid
max_concurrent: 2
budget: {steps: 20}
trial: {eval_every: 10, limit: 400, pretrain_steps: 30, batch_size: 32}
methods:
  full: {}
  head: {}
  profit: {ratio: {grid: [10, 1000]}}
"""


@pytest.mark.slow  # ~2.5 min on 2 shared CPU cores, mostly Ray start-up; the fake-store tests above stay in CI
@pytest.mark.skipif(importlib.util.find_spec("profit_bench.sweep") is None, reason="profit_bench.sweep not written")
def test_real_tiny_sweep_to_report(tmp_path):
    """profit_bench.sweep → sqlite MLflow store → analysis.report, both as the user runs them."""
    spec = tmp_path / "tiny_analysis.yaml"
    spec.write_text(TINY_SWEEP)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env_cmd = [sys.executable, "-m", "profit_bench.sweep", str(spec), "--tracking-uri", uri, "--cpus-per-trial", "1",
               "--storage-path", str(tmp_path / "ray"), "--cache-dir", str(tmp_path / "cache"), "--verbose", "0"]
    r = subprocess.run(env_cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "report"
    r = _cli("--experiment", "tiny_analysis", "--tracking-uri", uri, "--out", str(out))
    assert r.returncode == 0, r.stderr
    md = (out / "report.md").read_text()
    assert "8 trial runs (8 ok)" in md
    assert "### Table 1 — ours on the paper's own 2-D toy task" in md
    t1 = md.split("### Table 1")[1].split("###")[0]
    for label in ("full+rmsprop", "head+rmsprop", "PROFIT(rmsprop)"):
        assert f"| {label} |" in t1
    assert "| 0.705 |" in t1 and "| 0.046 |" in t1  # the paper's numbers beside ours
    for name in ("pareto_toy_mlp.png", "curves_toy_mlp.png", "ablation_ratio_toy.png", "cost_toy.png"):
        w, h = FIGSIZE["pareto" if name.startswith("pareto") else "wide"]
        assert png_size(out / name) == (round(w * DPI), round(h * DPI)), name
    # forgetting in the table = mean over seeds of what the runs logged (MSE: after − before)
    import pandas as pd
    runs = pd.read_csv(out / "runs.csv")
    full = runs[runs["label"] == "full+rmsprop"]
    assert len(full) == 2 and np.allclose(full["forgetting"], full["old_metric"] - full["old_before"], atol=1e-6)
