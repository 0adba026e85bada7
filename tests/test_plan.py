"""The plan of a sweep (profit_bench/plan.py) without Ray: points and their resolved configs, trial counts per
stage, pretraining keys, resume arithmetic. Counts are checked against the YAML read directly (yaml.safe_load),
not through the spec or the plan."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from profit_bench.plan import (Plan, all_done, planned_trials, search_total, sweep_seeds, trial_prior_s,
                               trials_per_arm_text)
from profit_bench.protocol import fresh_seeds
from profit_bench.spec import SWEEPS_DIR, load_spec, load_suite
from profit_bench.tasks import TASKS
from profit_bench.trial import TrialConfig, resolve

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ABLATE = {"n_ref": [1, 2, 5], "ratio": [10, 100, 1000, 10000], "seeds": None}


def raw(name: str) -> dict:
    return yaml.safe_load((SWEEPS_DIR / f"{name}.yaml").read_text())


def raw_arm_models(r: dict, entry: dict) -> list:
    return (entry or {}).get("models", r.get("models", [None]))


def raw_search_count(r: dict) -> int:
    """Search trials from the YAML alone: a grid is models × grid values × seeds per arm (× num_samples); Optuna
    gives every arm num_samples (default 8) trials."""
    if r.get("search", "optuna") == "grid":
        n = 0
        for entry in r["methods"].values():
            sizes = [len(v["grid"]) for v in (entry or {}).values() if isinstance(v, dict) and "grid" in v]
            n += len(raw_arm_models(r, entry)) * math.prod(sizes) * len(r.get("seeds", [0]))
        return n * r.get("num_samples", 1)
    return len(r["methods"]) * r.get("num_samples", 8)


def raw_planned(r: dict) -> int:
    """search + confirmation (every arm's models × choices × confirm seeds) + ablation (the ablated arm's models
    × (n_ref values + ratio values) × ablation seeds)."""
    seeds = r.get("confirm_seeds", 5)
    models = sum(len(raw_arm_models(r, e)) for e in r["methods"].values())
    confirm = models * len(r.get("confirm_choices", ["best-old", "best-new", "knee"])) * seeds
    ablation = 0
    if r.get("ablate") is not None and seeds:
        ab = {**DEFAULT_ABLATE, "arm": "profit", **r["ablate"]}
        ablation = (len(raw_arm_models(r, r["methods"][ab["arm"]])) * (len(ab["n_ref"]) + len(ab["ratio"]))
                    * (ab["seeds"] or seeds))
    return raw_search_count(r) + confirm + ablation


# ---------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("name", ["toy", "digits", "cifar", "table1", "table1_readings", "table2", "table8_nref",
                                  "table9_ratio", "table12_ratio"])
def test_trial_counts_per_stage_match_the_yaml(name):
    r, spec = raw(name), load_spec(name)
    plan = Plan(spec)
    points = plan.search_points()
    assert (points is None) == (r.get("search", "optuna") != "grid")
    total = search_total(spec, points)
    assert total == raw_search_count(r)
    assert planned_trials(spec, total) == raw_planned(r)
    assert trials_per_arm_text(spec, total) == str(total // len(r["methods"]))
    if points is not None:  # every grid point once per repeat, each arm's grid in full
        per_arm = {label: sum(p.arm == label for p in points) for label in r["methods"]}
        assert sum(per_arm.values()) == total and all(per_arm.values())


def test_suite_workload_counts_include_confirmation_and_ablation():
    r = yaml.safe_load((SWEEPS_DIR / "suite_cpu.yaml").read_text())
    for w, spec in load_suite("suite_cpu").workloads.items():
        wr = r["workloads"][w]
        total = search_total(spec, None)
        assert total == len(wr["methods"]) * wr["num_samples"]
        assert planned_trials(spec, total) == raw_planned(wr), w


def test_trials_per_arm_text_shows_a_range_when_budgets_per_dimension_differ():
    spec = load_spec("digits", ["trials_per_dim=2", "num_samples=null"])
    total = search_total(spec, None)
    # full: lr (1 dim); head: 1; profit: 3; profit_warmup: 4; l2sp/ewc: 2; lwf: 3 → 2 × dims each
    assert total == 2 * (1 + 1 + 3 + 4 + 2 + 2 + 3)
    assert trials_per_arm_text(spec, total) == "2-8"


# ---------------------------------------------------------------------------------------------- points and configs
def hand_config(r: dict, arm: str, model, seed: int, params: dict) -> TrialConfig:
    """The TrialConfig of a point, built from the YAML by hand (no spec.trial_dict)."""
    entry = {k: v for k, v in (r["methods"][arm] or {}).items() if k != "models" and k not in params}
    d = {**(r.get("trial") or {}), "method": arm, **entry, **params, **r["budget"], "task": r["task"],
         "model": model, "seed": seed, "device": "cpu", "pretrain_if_missing": False}
    return resolve(TrialConfig(**d))


@pytest.mark.parametrize("name", ["table9_ratio", "table8_nref"])
def test_point_config_is_the_trial_config_of_the_same_values(name):
    r = raw(name)
    points = Plan(load_spec(name)).search_points()
    for p in points:
        assert p.config == hand_config(r, p.arm, p.model, p.seed, p.params)
        assert p.config.pretrain_if_missing is False  # the sweep pretrains up front; a trial never does
    by_arm = {}
    for p in points:
        by_arm.setdefault(p.arm, set()).add(p.config.ratio if name == "table9_ratio" else p.config.n_ref)
    values = {"table9_ratio": {10.0, 100.0, 1000.0, 10000.0}}.get(name)
    if values:
        assert all(v == values for v in by_arm.values())


def test_tune_dict_round_trip_and_one_resolution_per_point(monkeypatch):
    import profit_bench.plan as plan_mod
    spec = load_spec("toy")
    plan = Plan(spec, device="cpu", data_dir="/data", cache_dir="/cache")
    p = plan.point("profit", "mlp", 1000, {"lr": 1e-3, "ratio": 300.0}, stage="confirm", choice="knee,best-new")
    d = p.to_tune()
    assert json.loads(json.dumps(d)) == d  # plain data for Tune and Optuna
    assert list(d) == ["arm", "model", "seed", "params", "stage", "choice", "config_key"]
    assert (p.config.data_dir, p.config.cache_dir, p.config.device) == ("/data", "/cache", "cpu")
    calls = []
    real = plan_mod.resolved_config
    monkeypatch.setattr(plan_mod, "resolved_config", lambda x: calls.append(1) or real(x))
    back = plan.from_tune(json.loads(json.dumps(d)))
    again = plan.from_tune(dict(d))
    assert back == p and again is back and len(calls) == 1  # resolved once; Tune's copies hit the cache
    opt = plan.optuna_point(spec.arms[2], {"lr": 1e-3, "ratio": 50.0, "n_ref": 2}, 3)
    assert opt.to_tune()["search_index"] == 3 and plan.from_tune(opt.to_tune()).search_index == 3
    assert (opt.model, opt.seed, opt.config.n_ref) == ("mlp", 0, 2)


def test_a_point_is_frozen():
    p = Plan(load_spec("toy")).point("full", "mlp", 0, {"lr": 1e-3})
    with pytest.raises(AttributeError):
        p.seed = 1
    assert hash(p) == hash(Plan(load_spec("toy")).point("full", "mlp", 0, {"lr": 1e-3}))


# ---------------------------------------------------------------------------------------------- pretraining keys
@pytest.mark.parametrize("name", ["toy", "table9_ratio", "table2"])
def test_pretrain_keys_one_per_needed_checkpoint(name):
    r, spec = raw(name), load_spec(name)
    plan = Plan(spec)
    keys = plan.pretrain_keys(plan.stage_points(plan.search_points(), sweep_seeds(spec)))
    checkpoints = [k[:3] for k in keys]
    assert len(checkpoints) == len(set(checkpoints))  # two tasks on one checkpoint would both pretrain it
    seeds = list(r.get("seeds", [0])) + fresh_seeds(r.get("seeds", [0]), r.get("confirm_seeds", 5))
    default = TASKS[r["task"]].default_model
    models = {m or default for e in r["methods"].values() for m in raw_arm_models(r, e)}
    assert set(checkpoints) == {(r["task"], m, s) for m, s in itertools.product(models, seeds)}
    for k, p in keys.items():  # the key is the point's own checkpoint
        assert k[:3] == (p.config.task, p.config.model, p.config.seed)


def test_one_pretraining_task_per_checkpoint_even_when_methods_need_old_task_statistics():
    spec = load_suite("suite_cpu", only=["digits"]).workloads["digits"]
    plan = Plan(spec)
    assert sweep_seeds(spec) == [0, 1000, 1001, 1002, 1003, 1004]
    keys = plan.pretrain_keys(plan.stage_points(None, sweep_seeds(spec)))
    checkpoints = [k[:4] for k in keys]
    assert len(checkpoints) == len(set(checkpoints)) == 6
    assert all(("fisher", 1024) in k[4] for k in keys)  # the EWC arm's Fisher is built by that one task
    with_mas = load_suite("suite_cpu", ["workloads.digits.methods={ewc: {method: ewc, lr: 1.0e-3}, "
                                        "mas: {method: mas, lr: 1.0e-3}}", "workloads.digits.ablate=null"],
                          only=["digits"]).workloads["digits"]
    plan = Plan(with_mas)
    keys = plan.pretrain_keys(plan.stage_points(None, sweep_seeds(with_mas)))
    assert len(keys) == 6 and all(k[4] == (("fisher", 1024), ("mas", 1024)) for k in keys)  # both, one task
    no_ewc = load_suite("suite_cpu", ["workloads.digits.methods={adam: {method: full, lr: 1.0e-3}}",
                                      "workloads.digits.ablate=null"],
                        only=["digits"]).workloads["digits"]
    plan = Plan(no_ewc)
    assert all(k[4] == () for k in plan.pretrain_keys(plan.stage_points(None, sweep_seeds(no_ewc))))


def test_trial_prior_scales_the_pretraining_time_to_the_fine_tuning_budget():
    spec = load_suite("suite_cpu", only=["fmnist_vit"]).workloads["fmnist_vit"]  # 5 epochs
    metas = [{"wall_time_s": 200.0, "config": {"epochs": 40}}, {"wall_time_s": 220.0, "config": {"epochs": 40}},
             {"wall_time_s": 210.0, "config": {"epochs": 40}}, None]
    assert trial_prior_s(spec, metas) == pytest.approx(26.25)  # the median checkpoint: 210 s / 40 × 5
    toy = load_suite("suite_cpu", only=["toy"]).workloads["toy"]  # 1500 steps
    assert trial_prior_s(toy, [{"wall_time_s": 20.0, "config": {"steps": 10000, "epochs": None}}]) == 3.0
    assert trial_prior_s(toy, [{"wall_time_s": 20.0, "config": {"epochs": 3}}]) is None


# ---------------------------------------------------------------------------------------------- resume arithmetic
def _trial(status, final=None):
    return SimpleNamespace(status=status, last_result={} if final is None else {"final": final})


def test_a_stage_is_done_only_when_every_trial_ended():
    ended = [_trial("TERMINATED", True), _trial("ERROR")]
    assert all_done(ended, 2)
    # Ctrl-C: a stopped trial is TERMINATED without its final report; Optuna trials never suggested are absent
    assert not all_done([_trial("TERMINATED", True), _trial("TERMINATED")], 2)
    assert not all_done([_trial("TERMINATED", True), _trial("PENDING"), _trial("RUNNING")], 3)
    assert not all_done(ended, 3)
    assert all_done([], 0)


# ---------------------------------------------------------------------------------------------- confirmation, ablation
def _search_frame(plan, rows):
    out = []
    for arm, params, old, new in rows:
        p = plan.point(arm, "mlp", 0, params)
        out.append({"arm": arm, "model": "mlp", "seed": 0, "config_key": p.config_key, "params": params,
                    "old_val": old, "new_val": new, "old_val_before": 1.0, "new_val_before": 0.2, "diverged": False})
    return pd.DataFrame(out)


def test_ablation_varies_one_knob_around_the_knee_on_the_first_confirmation_seeds():
    spec = load_suite("suite_cpu", only=["digits"]).workloads["digits"]
    plan = Plan(spec)
    knee = {"lr": 1e-3, "ratio": 100.0, "n_ref": 2}
    df = _search_frame(plan, [("profit", knee, 0.9, 0.9),
                              ("profit", {**knee, "lr": 1e-2}, 0.5, 0.95),  # best-new, not the knee
                              ("adam", {"lr": 1e-3}, 0.8, 0.9)])
    pts = plan.ablation_points(df, higher_is_better=True)
    seeds = fresh_seeds(spec.seeds, spec.confirm_seeds)[:3]
    by_knob = {}
    for p in pts:
        assert p.stage == "ablation" and p.arm == "profit" and p.seed in seeds
        changed = {k for k in set(knee) | set(p.params) if p.params.get(k) != knee.get(k)}
        assert changed == {p.ablation_knob}  # exactly one knob moved, everything else is the knee's
        by_knob.setdefault(p.ablation_knob, set()).add(p.params[p.ablation_knob])
        assert getattr(p.config, p.ablation_knob) == p.params[p.ablation_knob]
    # the knee's own n_ref (2) and ratio (100) are its confirmation runs, not re-run
    assert by_knob == {"n_ref": {1, 5}, "ratio": {10.0, 1000.0, 10000.0}}
    assert len(pts) == 5 * 3
    n_search = search_total(spec, None)
    assert planned_trials(spec, n_search) >= n_search + len(spec.arms) * 5 + len(pts)


def test_ablation_reads_the_knobs_the_arm_fixes():
    spec = load_suite("suite_cpu", ["workloads.toy.methods.profit={method: profit, optimizer: adam, n_ref: 5, "
                                    "ratio: 1000, lr: {loguniform: [1.0e-4, 1.0e-2]}}"], only=["toy"]).workloads["toy"]
    plan = Plan(spec)
    pts = plan.ablation_points(_search_frame(plan, [("profit", {"lr": 1e-3}, 0.1, 0.1)]), higher_is_better=False)
    assert {p.params["n_ref"] for p in pts if p.ablation_knob == "n_ref"} == {1, 2}
    assert {p.params["ratio"] for p in pts if p.ablation_knob == "ratio"} == {10.0, 100.0, 10000.0}
    for p in pts:  # the knee's fixed value of the other knob stays
        assert (p.config.n_ref, p.config.ratio) == ((p.params["n_ref"], 1000.0) if p.ablation_knob == "n_ref"
                                                    else (5, p.params["ratio"]))


def test_no_ablation_when_every_trial_diverged():
    plan = Plan(load_suite("suite_cpu", only=["toy"]).workloads["toy"])
    df = _search_frame(plan, [("profit", {"lr": 1e-3}, 0.1, 0.1)]).assign(diverged=True)
    assert plan.ablation_points(df, higher_is_better=False) == []


@pytest.mark.parametrize("workload", ["digits", "fmnist_vit"])
def test_confirmation_runs_best_old_knee_and_best_new_of_every_arm(workload):
    spec = load_suite("suite_cpu", ["confirm_seeds=10"], only=[workload]).workloads[workload]
    plan = Plan(spec)
    rows = []
    for arm in ("adam", "profit"):  # a three-point front per arm: old-heavy, balanced, new-heavy
        # (pretrained old 1.0, new 0.2: the knee's old axis is scaled by 0.05, its new axis by 0.75)
        rows += [(arm, {"lr": 1e-5}, 0.95, 0.60), (arm, {"lr": 1e-4}, 0.94, 0.90), (arm, {"lr": 1e-2}, 0.60, 0.95),
                 (arm, {"lr": 3e-3}, 0.50, 0.50)]  # dominated: never confirmed
    pts = plan.confirm_points(_search_frame(plan, rows), higher_is_better=True)
    seeds = fresh_seeds(spec.seeds, 10)
    for arm in ("adam", "profit"):
        mine = [p for p in pts if p.arm == arm]
        assert {p.choice for p in mine} == {"best-old", "knee", "best-new"}
        assert {p.params["lr"] for p in mine} == {1e-5, 1e-4, 1e-2}
        assert {p.config.lr for p in mine} == {1e-5, 1e-4, 1e-2}
        assert sorted(p.seed for p in mine) == sorted(seeds * 3)  # 10 fresh seeds (--confirm-seeds 10)


# ---------------------------------------------------------------------------------------------- no Ray
@pytest.mark.parametrize("module, banned", [("profit_bench.plan", "ray"), ("profit_bench.console", "ray"),
                                             ("profit_bench.options", "ray"), ("profit_bench.faults", "ray"),
                                             ("profit_bench.sweep", "ray.tune")])
def test_the_plan_and_the_console_import_without_ray(module, banned):
    code = (f"import json, sys; import {module}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m == {banned!r} or m.startswith({banned!r} + '.'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
