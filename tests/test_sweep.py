"""The sweep end to end: real Ray Tune, real Optuna, real MLflow (sqlite), in this process.

Toy task at a tiny budget (20 main steps on 500-point splits, 50 pretraining steps): a trial takes about a
second; one Ray session serves the module.
"""
import json
import os
import re
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from profit_bench.sweep import main

TINY = ["--set", "budget.steps=20", "--set", "trial.eval_every=10", "--set", "trial.pretrain_steps=50",
        "--set", "trial.limit=500"]


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


class OpenFileWatch:
    """Samples every process's open files: which pids other than this one hold `path` open."""

    def __init__(self, path: Path):
        self.path, self.pids, self.stop = str(path), set(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                    if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(self.path) for fd in fds):
                        self.pids.add(int(pid))
                except OSError:
                    continue
            self.stop.wait(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_optuna_sweep_equal_budgets_confirmation_and_one_writer(ray_session, tmp_path, cache_dir, capsys):
    import optuna
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with OpenFileWatch(tmp_path / "mlflow.db") as watch:
        assert main(["toy", "--num-samples", "2", "--confirm-seeds", "2", *TINY,
                     *sweep_args(tmp_path, cache_dir)]) == 0
    assert watch.pids == set()  # no worker (nor any other process) ever opened the sqlite store
    out = capsys.readouterr().out
    # every search trial settled (PROFIT's Sobol corner lr 2.7e-3 explodes on this tiny budget: diverged, counted)
    assert len(re.findall(r"^\[\d/6\] search (full|head|profit) .*\| (ok|diverged) ", out, re.M)) == 6
    # The console by default: the project's lines only, no Ray Tune status table (--verbose 1 brings it back).
    assert "== Status ==" not in out and "Number of trials" not in out

    client, parents, children = runs_of(uri, "toy")
    assert len(parents) == 1
    # MLflow 3's UI opens a model-training experiment on its runs, not on the GenAI traces page.
    assert client.get_experiment_by_name("toy").tags["mlflow.experimentKind"] == "custom_model_development"
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["table"] == ""
    # The printed link opens the sweep's saved view: its trials (MLflow's own search) with metric columns.
    view = json.loads(client.get_experiment_by_name("toy").tags[f"mlflow.sharedViewState.{parent.info.run_id}"])
    state = json.loads(view["state"])
    assert view["name"] == f"{parent.info.run_name}: trials" and f"viewStateShareKey={parent.info.run_id}" in out
    assert len(client.search_runs([parent.info.experiment_id], state["searchFilter"])) == len(children)
    assert {"metrics.`old_val`", "metrics.`new_val`", "metrics.`old_test`"} <= set(state["selectedColumns"])
    assert "num_samples: 2" in parent.data.params["sweep.yaml"] and "confirm_seeds: 2" in parent.data.params["sweep.yaml"]
    exp_dir = Path(parent.data.tags["sweep_dir"])
    assert exp_dir.is_dir()
    search = [r for r in children if r.data.tags["stage"] == "search"]
    confirm = [r for r in children if r.data.tags["stage"] == "confirm"]
    # Equal budgets: two search trials per arm, each arm in its own Optuna study.
    assert sorted(r.data.tags["arm"] for r in search) == ["full", "full", "head", "head", "profit", "profit"]
    for arm in ("full", "head", "profit"):
        study = optuna.load_study(study_name=f"{exp_dir.name}/{arm}", storage=f"sqlite:///{exp_dir / 'optuna.db'}")
        assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        logged = sorted((r.data.metrics["old_val"], r.data.metrics["new_val"]) for r in search
                        if r.data.tags["arm"] == arm)
        told = sorted(tuple(t.values) for t in study.trials)
        assert len(told) == len(logged)
        for t_vals, l_vals in zip(told, logged):  # pytest >= 9.2 refuses a nested approx
            assert t_vals == pytest.approx(l_vals, rel=1e-6)
    for r in search:  # layout: params that apply, step-0 point, per-evaluation validation metrics
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
        assert r.data.params["seed"] == "0" and r.data.tags["config_key"]
        assert ("ratio" in r.data.params) == (r.data.tags["arm"] == "profit") == (r.data.params["profit"] == "True")
        assert r.info.run_name.startswith(r.data.tags["arm"] + " ")
        # Compact params (the knobs and what tells runs apart); the whole config is the artifact config.json.
        assert "eval_every" not in r.data.params and "dtype" not in r.data.params and "lr" in r.data.params
        config = json.loads(Path(client.download_artifacts(r.info.run_id, "config.json", str(tmp_path))).read_text())
        assert config["eval_every"] == 10 and float(r.data.params["lr"]) == pytest.approx(config["lr"])
        # Bookkeeping numbers are tags: no one-point charts ahead of the curves.
        assert "batches" not in r.data.metrics and int(r.data.tags["batches"]) >= 20
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "old_val"))
        assert steps == [0, 10, 20]
        updates = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "main_steps"))
        assert updates == [(10, 10.0), (20, 20.0)]  # per evaluation: the equal-main-update view's axis
        assert len(client.get_metric_history(r.info.run_id, "old_val_before")) == 1
        # one-off numbers at step 0: MLflow's chart view draws them as a bar per run, not as a one-dot curve
        assert [m.step for m in client.get_metric_history(r.info.run_id, "old_test")] == [0]
    # Confirmation: every confirmed config re-run on 2 fresh seeds, under the same parent, same config_key.
    search_keys = {(r.data.tags["arm"], r.data.tags["config_key"]) for r in search}
    assert confirm and len(confirm) % 2 == 0
    assert {r.data.params["seed"] for r in confirm} == {"1000", "1001"}
    assert all((r.data.tags["arm"], r.data.tags["config_key"]) in search_keys for r in confirm)
    assert {r.data.tags["arm"] for r in confirm} == {"full", "head", "profit"}
    assert all(r.data.tags["choice"] for r in confirm)
    # Every search trial settled (a Sobol corner of PROFIT's space may diverge on this tiny budget: still a trial).
    assert parent.data.metrics["n_search_ok"] + parent.data.metrics.get("n_search_diverged", 0) == 6
    assert parent.data.metrics["n_confirm_ok"] == len(confirm)
    assert {f"hypervolume_val.{a}" for a in ("full", "head", "profit")} <= set(parent.data.metrics)
    # Search design: each arm's two trials are its own scrambled-Sobol points (no two arms share lrs).
    from profit_bench.plan import arm_seed, space_filling_points
    from profit_bench.spec import load_spec
    spec = load_spec("toy", ["num_samples=2"])
    lrs = {}
    for arm in spec.arms:
        want = [p["lr"] for p in space_filling_points(spec, arm, 2, arm_seed(0, arm.label))]
        got = [float(r.data.params["lr"]) for r in sorted(search, key=lambda r: r.info.start_time)
               if r.data.tags["arm"] == arm.label]
        assert sorted(got) == pytest.approx(sorted(want), rel=1e-6)
        lrs[arm.label] = tuple(sorted(got))
        assert sorted(r.data.tags["search_index"] for r in search if r.data.tags["arm"] == arm.label) == ["1", "2"]
    assert len(set(lrs.values())) == 3
    assert parent.data.tags["unsaturated_arms"] == ""  # 2 trials per arm: too few to judge, nothing flagged


FAIL_SPEC = """
task: toy
search: grid
max_concurrent: 2
confirm_seeds: 0
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
    name = "fail'ing \"q\""  # quotes in the experiment name must not break MLflow's search filters
    assert main([write_spec(tmp_path, FAIL_SPEC, "failing"), "--experiment", name,
                 *sweep_args(tmp_path, cache_dir, "--verbose", "0")]) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out
    client, parents, children = runs_of(uri, name)
    assert len(parents) == 1 and len(children) == 4
    by = {(r.data.tags["arm"], r.data.params["lr"]): r for r in children}
    assert all(by[k].info.status == "FINISHED" and by[k].data.tags["status"] == "ok"
               for k in (("full", "0.001"), ("head", "0.001")))
    diverged = by[("full", "1e+30")]
    assert diverged.info.status == "FINISHED" and diverged.data.tags["status"] == "diverged"
    failed = by[("boom", "0.001")]
    assert failed.info.status == "FAILED" and failed.data.tags["status"] == "failed"
    assert "PROFIT_BENCH_FAIL_ARM" in failed.data.tags["error"]  # Ray's error, written by the driver
    assert parents[0].data.metrics["n_search_failed"] == 1


@pytest.mark.slow
def test_every_trial_failed_exits_nonzero_with_counts(ray_session, tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("PROFIT_BENCH_FAIL_ARM", "boom")
    spec = write_spec(tmp_path, FAIL_SPEC.replace("  full: {lr: {grid: [1.0e-3, 1.0e+30]}}   # 1e30: the weights "
                                                  "overflow float32 → diverged\n  head: {lr: 1.0e-3}\n", ""), "allfail")
    assert main([spec, *sweep_args(tmp_path, cache_dir, "--verbose", "0")]) == 1
    assert "every trial failed (1 of 1)" in capsys.readouterr().err
    _, parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "allfail")
    assert len(parents) == 1 and len(children) == 1 and children[0].info.status == "FAILED"


def test_help_texts_match_the_sweeps_folder_the_readme_and_the_defaults(tmp_path, monkeypatch):
    """`sweep --help` lists every YAML of sweeps/, its small-CPU-run recipe is the README's, the default cache is
    the one `trial` uses (and the README names), and `analysis.report --help` is whole sentences."""
    from analysis.report import build_parser as report_parser
    from profit_bench.pretrain import default_cache_dir
    from profit_bench.spec import SWEEPS_DIR
    from profit_bench.sweep import SMALL_CPU_RUN, Options, build_parser, resolve_cache_dir
    text = " ".join(build_parser().format_help().split())
    for name in sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")):
        assert re.search(rf"[ (]{name}[,)]", text), name
    readme = (SWEEPS_DIR.parent / "README.md").read_text()
    assert SMALL_CPU_RUN in text and SMALL_CPU_RUN in " ".join(readme.split())
    assert "trial.limit=2000" not in text
    args = build_parser().parse_args(["toy"])
    assert args.verbose == Options().verbose == 0  # Ray's status table off unless asked for
    monkeypatch.setenv("PROFIT_BENCH_CACHE", str(tmp_path / "c"))
    assert resolve_cache_dir(Options(), tmp_path / "ray") == str(default_cache_dir().resolve()) == str(tmp_path / "c")
    monkeypatch.delenv("PROFIT_BENCH_CACHE")
    assert str(default_cache_dir()).endswith(".cache/profit_bench") and "~/.cache/profit_bench" in readme
    assert "~/.cache/profit_bench" in text
    assert resolve_cache_dir(Options(address="auto"), tmp_path / "ray") == str(tmp_path / "ray" / "pretrain_cache")
    report_help = " ".join(report_parser().format_help().split())
    description = " ".join(report_parser().description.split())
    assert description.endswith(".") and description in report_help


def test_arm_search_starts_each_arm_with_its_own_sobol_points_and_pickles(tmp_path):
    """No cluster: the searcher alone. Each arm's first trials are its Sobol points (one lr per log-quartile),
    arms draw different lrs, and the searcher survives pickle and Ray's cloudpickle (Tune checkpoints it)."""
    import math
    import pickle

    import ray.cloudpickle

    from profit_bench.plan import Plan, arm_seed, space_filling_points
    from profit_bench.raytune import ArmSearch
    from profit_bench.spec import load_spec
    spec = load_spec("digits", ["num_samples=4"])
    search = ArmSearch(Plan(spec), ["old_val", "new_val"], ["max", "max"], f"sqlite:///{tmp_path / 'o.db'}", "t")
    drawn = {}
    for i in range(4 * len(spec.arms)):
        cfg = search.suggest(f"trial_{i:05d}")
        drawn.setdefault(cfg["point"]["arm"], []).append(cfg["point"]["params"])
    assert search.suggest("one_more") == search.FINISHED  # equal budgets: 4 per arm, then done
    for arm in spec.arms:
        got = drawn[arm.label]
        want = space_filling_points(spec, arm, 4, arm_seed(spec.seeds[0], arm.label))
        assert [p["lr"] for p in got] == pytest.approx([p["lr"] for p in want])
        lo, hi = arm.space["lr"]["loguniform"]
        assert sorted(min(3, int(4 * math.log(p["lr"] / lo) / math.log(hi / lo))) for p in got) == [0, 1, 2, 3]
    assert len({tuple(p["lr"] for p in v) for v in drawn.values()}) == len(spec.arms)
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        again = loads(dumps(search))
        assert again.counts == search.counts
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    ArmSearch.restore(search, str(path))


def test_a_methods_own_knobs_are_params_under_their_own_names():
    """l2sp_alpha, ewc_lambda, ... live in the config's method_args; as params they keep the spec's names, so the
    report's config column tells two L2-SP configurations apart (it showed only their lrs)."""
    from profit_bench.spec import load_spec, resolved_config, trial_dict
    from profit_bench.tracking import _asdict, compact_params
    spec = load_spec("digits")
    point = {"arm": "lwf", "model": "mlp", "seed": 0,
             "params": {"lr": 1e-3, "lwf_lambda": 0.5, "lwf_temperature": 2.0}}
    params = compact_params(_asdict(resolved_config(trial_dict(spec, point))), spec, point["params"])
    assert (params["lr"], params["lwf_lambda"], params["lwf_temperature"]) == (1e-3, 0.5, 2.0)
    assert "method_args" not in params and "ratio" not in params  # PROFIT's knobs apply to PROFIT runs only


def test_compact_params_log_the_trial_block_knobs_that_change_model_or_data_only():
    """A sweep-wide `trial:` reading (table1's toy_variant) is a run param with the knobs it fills, so runs of two
    readings stay distinguishable without config.json; other sweep-wide fields (eval_every) stay out."""
    from profit_bench.plan import Plan
    from profit_bench.spec import load_spec
    from profit_bench.tracking import compact_params

    def first(spec, arm=None):
        point = next(p for p in Plan(spec).search_points() if arm is None or p.arm == arm)
        return compact_params(asdict(point.config), spec, point.params)

    params = first(load_spec("table1", ["trial.toy_variant=tanh_ln_after", "trial.pretrain_steps=50"]))
    assert params["toy_variant"] == "tanh_ln_after" and params["pretrain_steps"] == 50
    assert (params["activation"], params["layernorm"], params["lr_schedule_unit"]) == ("tanh", "after_act", "main")
    assert "eval_every" not in params and "dtype" not in params
    params = first(load_spec("table1", ["trial.toy_variant=null", "methods.full.toy_variant=gelu"]), "full")
    assert (params["toy_variant"], params["activation"], params["layernorm"]) == ("gelu", "gelu", "before_act")
    assert not {"toy_variant", "activation", "layernorm"} & set(first(load_spec("table1", ["trial.toy_variant=null"])))
