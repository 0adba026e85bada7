"""The sweep spec (profit_bench/spec.py) and the sweep CLI's up-front checks: no Ray, no training."""
import pytest

from profit_bench import UserError
from profit_bench.plan import Plan, config_key, run_name
from profit_bench.spec import applicable_params, load_spec, resolved_config, trial_dict, yaml_load
from profit_bench.sweep import Options, main

BASE = "task: toy\nbudget: {steps: 10}\n"


def write_spec(tmp_path, text, name="spec"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return str(p)


def test_grid_expansion_overrides_and_table_key():
    spec = load_spec("table9_ratio")
    points = Plan(spec).search_points()
    # 3 backbones × 4 ratios × 3 seeds, each backbone with its own lr (Table 10)
    assert len(points) == 3 * 4 * 3 and spec.table == "9"
    assert {p.params["ratio"] for p in points} == {10, 100, 1000, 10000}
    small = load_spec("table9_ratio", ["budget.epochs=1", "seeds=[0]", "trial.limit=100"])
    assert small.budget == {"epochs": 1} and small.trial == {"limit": 100, "warmup_epochs": 0}
    assert len(Plan(small).search_points()) == 12
    assert load_spec("table8_nref", data_dir="/data").task == "cifar"
    assert load_spec("toy").table == ""


def test_set_budget_replaces_the_budget_so_epochs_work_on_a_steps_table():
    spec = load_spec("table1", ["budget.epochs=1"])
    assert spec.budget == {"epochs": 1}


def test_yaml_reads_1e_minus_3_as_a_number():
    assert yaml_load("a: 1e-3\nb: 2E4\nc: 1.0e-2\nd: abc") == {"a": 0.001, "b": 20000.0, "c": 0.01, "d": "abc"}


def test_config_key_ignores_the_seed_only():
    plan = Plan(load_spec("toy"))
    a = plan.point("profit", "mlp", 0, {"lr": 1e-3})
    assert a.config_key == plan.point("profit", "mlp", 1000, {"lr": 1e-3}, stage="confirm").config_key
    assert a.config_key != plan.point("profit", "mlp", 0, {"lr": 2e-3}).config_key
    assert a.config_key == config_key("profit", "mlp", {"lr": 1e-3})


def test_params_that_apply_and_run_names():
    plan = Plan(load_spec("toy"))
    full = plan.point("full", "mlp", 0, {"lr": 6.4e-4})
    prof = plan.point("profit", "mlp", 0, {"lr": 6.4e-4, "ratio": 431.2, "n_ref": 3})
    from dataclasses import asdict
    assert not {"ratio", "n_ref", "profit_memory"} & set(applicable_params(asdict(full.config)))
    assert {"ratio", "n_ref"} <= set(applicable_params(asdict(prof.config))) and prof.config.profit
    assert run_name(prof) == "profit r=431 n=3 lr=6.4e-4"
    assert run_name(plan.point("full", "mlp", 1001, {"lr": 6.4e-4}, stage="confirm")) == "full lr=6.4e-4 s=1001"


@pytest.mark.parametrize("text, expect", [
    (BASE + "methods: {full: {n_ref: 1.5}}\n", "n_ref"),
    (BASE + "methods: {full: {batch_size: 2.5}}\n", "batch_size"),
    (BASE + "trial: {eval_every: abc}\nmethods: {full: {}}\n", "eval_every"),
    (BASE + "methods: {full: {lr: .nan}}\n", "finite"),
    (BASE + "trial: {limit: 0}\nmethods: {full: {}}\n", "limit: must be >= 1"),
    (BASE + "trial: {eval_every: 0}\nmethods: {full: {}}\n", "eval_every: must be >= 1"),
    ("task: toy\nbudget: {steps: 0}\nmethods: {full: {}}\n", "budget"),
    ("task: toy\nbudget: {steps: 10, epochs: 1}\nmethods: {full: {}}\n", "budget"),
    (BASE + "num_samples: 0\nmethods: {full: {}}\n", "num_samples"),
    (BASE + "max_concurrent: -1\nmethods: {full: {}}\n", "max_concurrent"),
    (BASE + "seeds: [0.5]\nmethods: {full: {}}\n", "seeds"),
    (BASE + "objectives: [old_test]\nmethods: {full: {}}\n", "objectives"),  # search never reads test
    (BASE + "methods: {profit: {n_ref: {int: [0, 3]}}}\n", "n_ref: must be >= 1"),  # searched bounds checked
    (BASE + "search: grid\nmethods: {full: {lr: {grid: [1.0e-3, -1]}}}\n", "lr: must be >= 0"),
    ("task: toy\nbudget: {steps: [unclosed\n", "not valid YAML"),
    (BASE + "methods: {nosuch: {lr: 1.0e-3}}\n", "unknown method 'nosuch'"),
    ("task: mnist9\nbudget: {steps: 10}\nmethods: {full: {}}\n", "unknown task 'mnist9'"),
    (BASE + "methods: {full: {lr: {loguniform: [0, 1]}}}\n", "needs low > 0"),
    (BASE + "methods: {full: {optimizer: sgdx}}\n", "unknown optimizer 'sgdx'"),
    (BASE + "search: grid\nmethods: {full: {lr: {loguniform: [1, 2]}}}\n", "grid"),
    ("task: toy\nbudgets: {steps: 10}\nmethods: {full: {}}\n", "unknown keys ['budgets']"),
])
def test_bad_spec_is_one_clear_error_on_dry_run(tmp_path, capsys, text, expect):
    assert main([write_spec(tmp_path, text), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err, err


def test_a_spec_with_1e_minus_3_validates():
    load_spec_text = BASE + "methods: {full: {lr: 1e-3}, profit: {lr: {loguniform: [1e-5, 1e-2]}}}\n"
    import pathlib
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        spec = load_spec(write_spec(pathlib.Path(d), load_spec_text))
    assert spec.arms[0].fixed["lr"] == 0.001 and spec.arms[1].space["lr"] == {"loguniform": [1e-5, 1e-2]}


@pytest.mark.parametrize("args, expect", [
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--num-samples", "-3"], "--num-samples must be >= 1"),
    (["--max-concurrent", "-1"], "--max-concurrent must be >= 1"),
    (["--confirm-seeds", "-1"], "--confirm-seeds must be >= 0"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
])
def test_bad_cli_values_are_refused_up_front(tmp_path, capsys, args, expect):
    assert main(["toy", *args, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {err[7:]}" and expect in err and "\n" not in err
    assert not (tmp_path / "m.db").exists()  # refused before anything was written


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    opts_args = ["toy", "--dry-run", "--num-samples", "3", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert main(opts_args) == 0
    out = capsys.readouterr().out
    assert "9 search trials (3 per arm" in out and "confirmation: 5 fresh seeds" in out
    assert not (tmp_path / "m.db").exists()


def test_options_are_not_mutated():
    opts = Options(tracking_uri="sqlite:///rel.db", storage_path="rel")
    with pytest.raises(Exception):
        opts.tracking_uri = "x"  # frozen: run_sweep works on its own resolved copies
    with pytest.raises(UserError):
        load_spec("no_such_sweep")


def test_data_dir_is_checked_on_the_trial_node_and_names_it(tmp_path):
    import ray

    from profit_bench.sweep import check_data_dir
    with pytest.raises(UserError, match=f"empty on node {ray.util.get_node_ip_address()}"):
        check_data_dir(str(tmp_path))  # exists but holds no data
    (tmp_path / "cifar-10-batches-py").mkdir()
    check_data_dir(str(tmp_path))
    check_data_dir(None)


def test_method_knobs_sit_beside_trial_fields_and_become_method_args(tmp_path):
    from profit_bench.spec import validate_spec
    raw = dict(task="toy", search="grid", budget={"steps": 10},
               methods={"ewc": {"ewc_lambda": {"grid": [10.0, 1000.0]}, "lr": 1e-3},
                        "lora": {"lora_r": 4}})
    spec = validate_spec(raw)
    dicts = [trial_dict(spec, p.to_tune()) for p in Plan(spec).search_points()]
    assert [d["method_args"] for d in dicts] == [{"ewc_lambda": 10.0}, {"ewc_lambda": 1000.0}, {"lora_r": 4}]
    assert all("ewc_lambda" not in d and "lora_r" not in d for d in dicts)
    with pytest.raises(UserError, match=r"unknown keys \['lora_r'\]"):
        validate_spec(dict(raw, methods={"ewc": {"lora_r": 4}}))
    with pytest.raises(UserError, match="lora_r"):
        validate_spec(dict(raw, methods={"lora": {"lora_r": 2.5}}))  # an int knob


# ---------------------------------------------------------------------------------------------- search design
def _log_quartile(v, lo, hi):
    import math
    return min(3, int(4 * (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))))


def test_space_filling_start_puts_one_lr_in_each_log_quartile_and_arms_draw_differently():
    from profit_bench.plan import arm_seed, space_filling_points
    spec = load_spec("digits")
    lrs = {}
    for arm in spec.arms:
        lo, hi = arm.space["lr"]["loguniform"]
        pts = space_filling_points(spec, arm, 4, arm_seed(0, arm.label))
        assert sorted(_log_quartile(p["lr"], lo, hi) for p in pts) == [0, 1, 2, 3]
        for k, dist in arm.space.items():  # every value inside its distribution, of the right type
            kind, args = next(iter(dist.items()))
            for p in pts:
                if kind == "choice":
                    assert p[k] in args
                else:
                    assert args[0] <= p[k] <= args[1] and isinstance(p[k], int) == (kind in ("int", "logint"))
        lrs[arm.label] = tuple(p["lr"] for p in pts)
    assert len(set(lrs.values())) == len(lrs)  # no two arms share their lr draws
    assert len({arm_seed(0, a.label) for a in spec.arms}) == len(spec.arms)
    assert arm_seed(0, "profit") == arm_seed(0, "profit") != arm_seed(1, "profit")  # derived, deterministic


def test_trials_per_dim_gives_each_arm_n_per_searched_dimension(tmp_path, capsys):
    from profit_bench.plan import search_total
    from profit_bench.sweep import apply_options
    spec = apply_options(load_spec("digits"), Options(trials_per_dim=2))
    per_arm = {a.label: spec.arm_trials(a) for a in spec.arms}
    assert per_arm["full"] == 2 and per_arm["profit"] == 2 * 3 and per_arm["lwf"] == 2 * 3
    assert search_total(spec, None) == sum(per_arm.values())
    text = BASE + "trials_per_dim: 3\nmethods: {full: {lr: {loguniform: [1.0e-4, 1.0e-2]}}}\n"
    assert load_spec(write_spec(tmp_path, text)).arm_trials(load_spec("toy").arms[0]) == 3
    with pytest.raises(UserError, match="trials_per_dim"):
        load_spec(write_spec(tmp_path, BASE + "trials_per_dim: 3\nnum_samples: 4\nmethods: {full: {}}\n"))
    assert main(["digits", "--dry-run", "--trials-per-dim", "2", "--num-samples", "3"]) == 2
    assert main(["table2", "--dry-run", "--trials-per-dim", "2"]) == 2
    assert "alternatives" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- PROFIT as in the paper
def _profit_arms(spec):
    return [a for a in spec.arms if resolved_config(trial_dict(spec, {"arm": a.label, "model": a.models[0],
                                                                      "seed": 0, "params": {}})).profit]


@pytest.mark.parametrize("name", ["table2", "table8_nref", "table9_ratio"])
def test_tables_2_8_9_run_profit_without_warmup(name):
    spec = load_spec(name)
    arms = _profit_arms(spec)
    assert arms
    for a in arms:
        d = trial_dict(spec, {"arm": a.label, "model": a.models[0], "seed": 0, "params": {}})
        assert d["warmup_epochs"] == 0 and "warmup_epochs" not in a.space


def test_suite_profit_has_no_warmup_and_warmup_is_its_own_arm():
    from profit_bench.spec import load_suite
    for w, spec in load_suite("suite_cpu").workloads.items():
        arms = {a.label: a for a in spec.arms}
        assert "warmup_epochs" not in arms["profit"].space and not arms["profit"].fixed.get("warmup_epochs")
        if "profit_warmup" in arms:
            assert arms["profit_warmup"].space["warmup_epochs"]["int"][0] >= 1
        assert spec.ablate["arm"] == "profit"  # the ablation varies the no-warm-up arm
        assert set(spec.confirm_choices) == {"best-old", "knee", "best-new"}
    assert set(load_spec("digits").confirm_choices) == {"best-old", "knee", "best-new"}


def test_an_ablation_around_a_warmup_arm_is_refused(tmp_path):
    text = ("task: digits\nbudget: {epochs: 4}\nablate: {arm: p}\n"
            "methods: {p: {method: profit, lr: 1.0e-3, warmup_epochs: {int: [0, 2]}}}\n")
    with pytest.raises(UserError, match="warm-up"):
        load_spec(write_spec(tmp_path, text))


def test_table1_regime_study_and_table1_default_validate(capsys):
    from profit_bench.spec import load_suite
    suite = load_suite("table1_regime")
    readings = suite.workloads["readings"]
    points = Plan(readings).search_points()
    cells = {(p.arm, p.config.activation, p.config.layernorm, p.config.batch_size) for p in points}
    seen = {cell[1:] for cell in cells}  # batch 32: {relu, tanh} × LN {before, after}, GELU, no LN; batch 8
    assert seen == {(a, ln, 32) for a in ("relu", "tanh", "gelu") for ln in ("before_act", "after_act")} | \
        {("relu", "none", 32), ("relu", "before_act", 8)}
    assert len(cells) == 2 * len(seen) and {p.seed for p in points} == {0, 1, 2, 3, 4}
    assert {a.fixed["batch_size"] for a in readings.arms} == {32, 8}
    assert all(a.fixed["batch_size"] == a.fixed["pretrain_batch_size"] for a in readings.arms)
    profit = suite.workloads["profit"]
    assert not set(profit.seeds) & set(readings.seeds)  # stage 2 runs on fresh seeds
    assert main(["table1_regime", "--dry-run"]) == 0
    capsys.readouterr()
    assert main(["table1", "--dry-run"]) == 0
    assert "toy_variant today: {'activation': 'relu', 'layernorm': 'before_act'" in capsys.readouterr().out


def test_knobs_that_change_the_pretrained_model_are_grid_only(tmp_path, capsys):
    text = BASE + "methods: {full: {activation: {choice: [relu, tanh]}}}\n"
    assert main([write_spec(tmp_path, text), "--dry-run"]) == 2
    assert "changes the pretrained model" in capsys.readouterr().err


DIGITS_EPOCHS = ("task: digits\nmodels: [mlp]\nbudget: {epochs: 4}\ntrial: {limit: 32, batch_size: 16, "
                 "pretrain_epochs: 1}\nmethods:\n  full: {lr: 1.0e-3, epochs: {int: [1, 4]}}\n  head: {lr: 1.0e-3}\n")


def test_an_arm_searches_its_own_epochs_under_the_cap_and_the_trial_follows_the_draw(tmp_path):
    from profit_bench.plan import space_filling_points
    from profit_bench.trial import run_trial
    spec = load_spec(write_spec(tmp_path, DIGITS_EPOCHS))
    full, head = spec.arms
    assert full.space["epochs"] == {"int": [1, 4]} and spec.arm_trials(full) == spec.num_samples
    # the Sobol start spreads the epoch counts over [1, 4] like any int knob
    assert {p["epochs"] for p in space_filling_points(spec, full, 4, seed=1)} == {1, 2, 3, 4}
    d = trial_dict(spec, {"arm": "full", "model": "mlp", "seed": 0, "params": {"epochs": 3}},
                   cache_dir=str(tmp_path / "cache"))
    assert d["epochs"] == 3  # the draw, not the budget's cap
    assert trial_dict(spec, {"arm": "head", "model": "mlp", "seed": 0, "params": {}})["epochs"] == 4  # the cap
    r = run_trial(resolved_config(d))
    # 32 examples → 16 new-train rows (the task's split) in batches of 16: batches per epoch from the task itself
    one = run_trial(resolved_config({**d, "epochs": 1}))
    assert r["status"] == one["status"] == "ok"
    assert r["epochs_done"] == 3 and one["epochs_done"] == 1 and r["batches"] == 3 * one["batches"] > 0
    assert r["main_steps"] == r["batches"]  # plain Adam: every batch is a main update


@pytest.mark.parametrize("methods, expect", [
    ("full: {epochs: {int: [1, 30]}}", "methods.full.epochs: 30 is above the sweep's cap budget.epochs = 4"),
    ("full: {epochs: 5}", "methods.full.epochs: 5 is above the sweep's cap budget.epochs = 4"),
    ("full: {epochs: {loguniform: [1, 4]}}", "methods.full.epochs"),
    ("profit: {epochs: {int: [1, 4]}, warmup_epochs: 2}", "warmup_epochs (up to 2) can exceed the arm's epochs"),
])
def test_epochs_above_the_cap_are_refused_on_one_line(tmp_path, capsys, methods, expect):
    text = "task: digits\nbudget: {epochs: 4}\nmethods: {" + methods + "}\n"
    assert main([write_spec(tmp_path, text), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err, err


def test_arm_epochs_need_an_epochs_budget_and_follow_a_smaller_cap(tmp_path):
    with pytest.raises(UserError, match="needs an epochs budget"):
        load_spec(write_spec(tmp_path, BASE + "methods: {full: {epochs: 2}}\n"))
    with pytest.raises(UserError, match=r"sweep-owned keys \[.epochs.\]"):  # the trial: block still may not
        load_spec(write_spec(tmp_path, DIGITS_EPOCHS.replace("limit: 32,", "limit: 32, epochs: {int: [1, 2]},")))
    small = load_spec(write_spec(tmp_path, DIGITS_EPOCHS), ["budget.epochs=2"])  # the README's small version
    assert small.arms[0].space["epochs"] == {"int": [1, 2]} and small.budget == {"epochs": 2}
    one = load_spec(write_spec(tmp_path, DIGITS_EPOCHS), ["budget.epochs=1"])  # a range of one value: fixed
    assert "epochs" not in one.arms[0].space and one.arms[0].fixed["epochs"] == 1
