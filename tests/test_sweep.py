"""The sweep end to end: real Ray Tune, real Optuna, real MLflow (sqlite store and a real `mlflow server`).

Every sweep here is the toy task at a tiny budget (20-1500 main steps on 500-point splits, 50 pretraining steps)
so that trials take about a second; one Ray session serves the whole module.
"""
import json
import re
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import fields
from pathlib import Path

import pytest

from profit_bench.sweep import grid_points, load_spec, main
from profit_bench.trial import TrialConfig

TINY = ["--set", "budget.steps=20", "--set", "trial.eval_every=10", "--set", "trial.pretrain_steps=50",
        "--set", "trial.limit=500"]


@pytest.fixture(scope="module")
def ray_session():
    import ray
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 ** 2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain_cache")


def sweep_args(tmp_path, cache_dir, *extra):
    return ["--storage-path", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--cache-dir", str(cache_dir), *extra]


def write_spec(tmp_path, text, name="spec"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return str(p)


def runs_of(tracking_uri, experiment):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("profit_bench.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("profit_bench.role") == "trial"]
    return client, parents, children


# ---------------------------------------------------------------------------------------------- no Ray needed
def test_grid_expansion_and_overrides():
    spec = load_spec("table9_ratio")
    points = grid_points(spec)
    # 3 backbones × 4 ratios × 3 seeds, each backbone with its own lr (Table 10)
    assert len(points) == 3 * 4 * 3
    assert {p["params"]["ratio"] for p in points} == {10, 100, 1000, 10000}
    assert {(p["model"], p["arm"]) for p in points} == {("resnet18", "resnet18"), ("vit_tiny", "vit_tiny"),
                                                       ("vit_small", "vit_small")}
    small = load_spec("table9_ratio", ["budget.epochs=1", "seeds=[0]", "trial.limit=100"])
    assert small.budget == {"epochs": 1} and small.trial == {"limit": 100} and len(grid_points(small)) == 12
    assert load_spec("table8_nref", data_dir="/data").task == "cifar"
    assert load_spec("table8_nref").task == "fmnist"


@pytest.mark.parametrize("text, expect", [
    ("task: toy\nbudget: {steps: [unclosed\n", "not valid YAML"),
    ("task: toy\nbudget: {steps: 10}\nmethods: {nosuch: {lr: 1.0e-3}}\n", "unknown method 'nosuch'"),
    ("task: mnist9\nbudget: {steps: 10}\nmethods: {full: {}}\n", "unknown task 'mnist9'"),
    ("task: toy\nbudget: {steps: 10}\nmethods: {full: {lr: {loguniform: [0, 1]}}}\n", "needs low > 0"),
    ("task: toy\nbudget: {steps: 10}\nmethods: {full: {optimizer: sgdx}}\n", "unknown optimizer 'sgdx'"),
    ("task: toy\nbudget: {steps: 10}\nsearch: grid\nmethods: {full: {lr: {loguniform: [1, 2]}}}\n", "grid"),
    ("task: toy\nbudgets: {steps: 10}\nmethods: {full: {}}\n", "unknown keys ['budgets']"),
])
def test_bad_spec_is_one_clear_error(tmp_path, capsys, text, expect):
    assert main([write_spec(tmp_path, text), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------------------------------------- with Ray
def test_gpus_on_a_cpu_only_cluster_is_one_clear_error(ray_session, tmp_path, cache_dir, capsys):
    assert ray_session.cluster_resources().get("GPU", 0) == 0
    assert main(["toy", "--gpus-per-trial", "0.5", *sweep_args(tmp_path, cache_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no GPUs" in err and "\n" not in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray").exists()


def test_optuna_toy_sweep_logs_parent_children_and_study(ray_session, tmp_path, cache_dir, capsys):
    import optuna
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["toy", "--num-samples", "4", *TINY, *sweep_args(tmp_path, cache_dir)]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\[\d/4\] (full|head|profit) .*\| ok ", out, re.M)) == 4
    assert "mlflow ui --backend-store-uri" in out

    client, parents, children = runs_of(uri, "toy")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert "task: toy" in parent.data.params["sweep.yaml"] and parent.data.params["cli.num_samples"] == "4"
    assert parent.info.status == "FINISHED" and parent.data.tags["git_commit"]
    assert any(k.startswith("version.torch") for k in parent.data.params)
    trial_fields = {f.name for f in fields(TrialConfig)}
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED" and r.data.tags["status"] == "ok"
        assert trial_fields <= set(r.data.params)
        assert r.data.params["steps"] == "20" and r.data.params["task"] == "toy"
        assert r.data.params["seed"] == "0"  # reproducibility: seed, commit and versions on every run
        assert r.data.tags["git_commit"] == parent.data.tags["git_commit"]
        assert r.data.tags["version.torch"] == parent.data.params["version.torch"]
        for key in ("old_metric", "new_metric", "old_loss", "new_loss"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == [10, 20]
        for key in ("old_before", "forgetting", "peak_mem_bytes", "step_time_median_s", "wall_time_s"):
            assert key in r.data.metrics

    # The Optuna study got both final objective values of every trial: they must equal what MLflow logged,
    # for the same method and learning rate.
    exp_dir = Path(parent.data.tags["ray_experiment_path"])
    study = optuna.load_study(study_name=exp_dir.name, storage=f"sqlite:///{exp_dir / 'optuna.db'}")
    assert len(study.directions) == 2 and all(d == optuna.study.StudyDirection.MINIMIZE for d in study.directions)
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE and len(t.values) == 2 for t in study.trials)
    assert {t.params["arm"] for t in study.trials} == {"full", "head", "profit"}  # each method enqueued once
    logged = {(r.data.params["method"], float(r.data.params["lr"])):
              (r.data.metrics["old_metric"], r.data.metrics["new_metric"]) for r in children}
    for t in study.trials:
        arm = t.params["arm"]
        assert logged[(arm, t.params[f"{arm}/lr"])] == pytest.approx(tuple(t.values), rel=1e-6)


FAIL_SPEC = """
task: toy
search: grid
max_concurrent: 2
budget: {steps: 20}
trial: {eval_every: 10, pretrain_steps: 50, limit: 500}
methods:
  full: {lr: {grid: [1.0e-3, 1.0e+30]}}   # 1e30: the weights overflow float32 → diverged
  head: {lr: 1.0e-3}
  boom: {method: full, lr: 1.0e-3}
"""


def test_failed_and_diverged_trials_are_recorded_and_the_sweep_goes_on(ray_session, tmp_path, cache_dir,
                                                                       monkeypatch, capsys):
    monkeypatch.setenv("PROFIT_BENCH_FAIL_ARM", "boom")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main([write_spec(tmp_path, FAIL_SPEC, "failing"), *sweep_args(tmp_path, cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 ok, 1 diverged, 1 failed" in out and "FAILED" in out
    client, parents, children = runs_of(uri, "failing")
    assert len(parents) == 1 and len(children) == 4
    by = {(r.data.params["method"], r.data.tags["arm"], r.data.params["lr"]): r for r in children}
    ok = [by[("full", "full", "0.001")], by[("head", "head", "0.001")]]
    assert all(r.info.status == "FINISHED" and r.data.tags["status"] == "ok" for r in ok)
    diverged = by[("full", "full", "1e+30")]
    assert diverged.info.status == "FINISHED" and diverged.data.tags["status"] == "diverged"
    failed = by[("full", "boom", "0.001")]
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "failed"
    assert "PROFIT_BENCH_FAIL_ARM" in failed.data.tags["error"]


RESUME_SPEC = """
task: toy
search: grid
max_concurrent: 1
budget: {steps: 1500}
trial: {eval_every: 500, pretrain_steps: 50, limit: 500}
methods:
  full: {lr: {grid: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]}}
"""


def finished_children(db: Path) -> dict:
    if not db.exists():
        return {}
    con = sqlite3.connect(db, timeout=30)
    try:
        rows = con.execute("select r.run_uuid, r.end_time from runs r join tags t on t.run_uuid = r.run_uuid "
                           "where t.key = 'ray_trial_id' and r.status = 'FINISHED'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        rows = []
    finally:
        con.close()
    return dict(rows)


def test_interrupt_then_resume_ends_with_exactly_n_runs(ray_session, tmp_path, cache_dir, capsys):
    spec = write_spec(tmp_path, RESUME_SPEC, "resumable")
    args = [spec, *sweep_args(tmp_path, cache_dir)]
    gcs = ray_session.get_runtime_context().gcs_address  # the interrupted driver joins this test's cluster
    proc = subprocess.Popen([sys.executable, "-m", "profit_bench.sweep", *args, "--address", gcs],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    db = tmp_path / "mlflow.db"
    deadline = time.time() + 240
    while len(finished_children(db)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.3)
    time.sleep(1.5)  # let Tune record the second trial as done (MLflow says FINISHED just before Tune knows)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    before = finished_children(db)
    assert proc.returncode == 130, out
    assert 2 <= len(before) < 4, out  # interrupted mid-sweep

    assert main([*args, "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    client, parents, children = runs_of(f"sqlite:///{db}", "resumable")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and len({r.data.tags["ray_trial_id"] for r in children}) == 4
    assert sorted(r.data.params["lr"] for r in children) == ["0.0001", "0.0003", "0.001", "0.003"]
    assert all(r.info.status == "FINISHED" and r.data.tags["status"] == "ok" for r in children)
    after = finished_children(db)
    assert all(after[run_id] == end for run_id, end in before.items())  # finished trials did not run again
    for r in children:  # one history: each evaluation logged once, also for the trial that ran twice
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "old_metric")]
        assert sorted(steps) == [500, 1000, 1500]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest(base, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


GRID2_SPEC = """
task: toy
search: grid
budget: {steps: 20}
trial: {eval_every: 10, pretrain_steps: 50, limit: 500}
methods:
  full: {lr: 1.0e-3}
  profit: {lr: 1.0e-3, ratio: 100}
"""


def test_sweep_logs_through_an_mlflow_server_read_back_over_rest(ray_session, tmp_path, cache_dir):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        spec = write_spec(tmp_path, GRID2_SPEC, "served")
        assert main([spec, "--storage-path", str(tmp_path / "ray"), "--tracking-uri", base,
                     "--cache-dir", str(cache_dir)]) == 0
        exp = rest(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=served")["experiment"]
        runs = rest(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
        parent = [r for r, t in zip(runs, tags) if t["profit_bench.role"] == "sweep"]
        kids = [(r, t) for r, t in zip(runs, tags) if t["profit_bench.role"] == "trial"]
        assert len(parent) == 1 and len(kids) == 2
        assert {t["mlflow.parentRunId"] for _, t in kids} == {parent[0]["info"]["run_id"]}
        assert sorted(t["arm"] for _, t in kids) == ["full", "profit"]
        for r, t in kids:
            params = {p["key"]: p["value"] for p in r["data"]["params"]}
            assert params["lr"] == "0.001" and params["method"] == t["arm"] and r["info"]["status"] == "FINISHED"
            hist = rest(base, f"/api/2.0/mlflow/metrics/get-history?run_id={r['info']['run_id']}&metric_key="
                              "new_metric")["metrics"]
            assert sorted(m["step"] for m in hist) == [10, 20]
            final = {m["key"]: m["value"] for m in r["data"]["metrics"]}
            assert final["new_metric"] == hist[-1]["value"] and "forgetting" in final
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
