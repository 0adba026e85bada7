"""The CPU evidence suite (sweeps/suite_cpu.yaml): its spec machinery without Ray, then the real command end to
end at smoke budgets (every workload, one trial per arm, one confirmation seed, a two-point ablation)."""
import json
import os
import re
from pathlib import Path

import pytest

from profit_bench import UserError
from profit_bench.plan import Plan, search_total
from profit_bench.spec import load_spec, load_suite
from profit_bench.console import Meter
from profit_bench.sweep import main

SUITE_WORKLOADS = ["toy", "digits", "fmnist_mlp", "fmnist_resnet", "fmnist_vit"]


# ---------------------------------------------------------------------------------------------- spec
def test_suite_file_lists_every_workload_and_method_family():
    suite = load_suite("suite_cpu")
    assert list(suite.workloads) == SUITE_WORKLOADS
    arms = {w: {a.label for a in s.arms} for w, s in suite.workloads.items()}
    table2 = {"sgd", "adam", "lookahead", "adan", "head", "profit", "l2sp", "ewc", "lwf"}
    core = {"adam", "head", "profit", "lora", "lora_profit"}
    for w in SUITE_WORKLOADS:
        assert core <= arms[w], w
    for w in ["toy", "digits", "fmnist_mlp"]:  # the full Table 2 set where a trial costs seconds (issue 29's cuts)
        assert table2 | {"lora", "lora_profit"} <= arms[w], w
    assert {"ewc", "lwf"} <= arms["fmnist_resnet"]
    assert not {"sgd", "lookahead", "adan", "l2sp", "profit_warmup"} & (arms["fmnist_resnet"] | arms["fmnist_vit"])
    assert {"convadapter", "convadapter_profit"} <= arms["fmnist_resnet"]
    assert {"vpt", "vpt_profit"} <= arms["fmnist_vit"]
    models = {w: {m for a in s.arms for m in a.models} for w, s in suite.workloads.items()}
    assert models["fmnist_resnet"] == {"resnet_small"} and models["fmnist_vit"] == {"vit_micro"}
    for w, s in suite.workloads.items():
        assert s.confirm_seeds == 5 and s.ablate["arm"] == "profit", w
        assert len({a.label: None for a in s.arms}) == len(s.arms)
        # equal budgets: one study per arm of num_samples trials
        assert Plan(s).search_points() is None and search_total(s, None) == s.num_samples * len(s.arms)
    # PROFIT as Tables 2/8/9 run it (no warm-up); Table 13's AdamW warm-up is its own arm, searched, on epochs budgets
    for w in SUITE_WORKLOADS:
        arms_w = {a.label: a for a in suite.workloads[w].arms}
        assert "warmup_epochs" not in arms_w["profit"].space, w
        assert ("profit_warmup" in arms_w) == (w in ("digits", "fmnist_mlp")), w
        if "profit_warmup" in arms_w:
            assert arms_w["profit_warmup"].space["warmup_epochs"]["int"][0] >= 1


def test_suite_overrides_reach_one_or_every_workload():
    suite = load_suite("suite_cpu", ["workloads.toy.num_samples=3", "trial.limit=64"])
    assert suite.workloads["toy"].num_samples == 3 and suite.workloads["digits"].num_samples == 8
    assert all(s.trial["limit"] == 64 for s in suite.workloads.values())
    # a --set on the trial block keeps the workload's other trial settings
    assert suite.workloads["fmnist_vit"].trial["pretrain_epochs"] == 40
    only = load_suite("suite_cpu", only=["fmnist_vit", "toy"])
    assert list(only.workloads) == ["toy", "fmnist_vit"]  # the suite's order


@pytest.mark.parametrize("text, message", [
    ("suite: s\nworkloads: {a: {task: toy, budget: {steps: 5}, methods: {full: {}}}}\nbogus: 1\n",
     "unknown suite keys"),
    ("suite: s\nworkloads: []\n", "non-empty mapping"),
    ("suite: s\nworkloads: {a: {task: toy, budget: {steps: 5}, methods: {full: {}},"
     " ablate: {arm: full}}}\n", "does not train through PROFIT"),
    ("suite: s\nworkloads: {a: {task: toy, budget: {steps: 5}, methods: {profit: {}}, confirm_choices: [best-new],"
     " ablate: {arm: profit}}}\n", "knee"),
    ("suite: s\nworkloads: {a: {task: toy, budget: {steps: 5}, methods: {profit: {}}, ablate: {arm: nope}}}\n",
     "not one of the methods"),
])
def test_bad_suite_files_fail_on_one_line(tmp_path, text, message):
    p = tmp_path / "s.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=message):
        load_suite(str(p))


def test_a_suite_is_not_a_sweep_and_unknown_workloads_are_named():
    with pytest.raises(UserError, match="is a suite"):
        load_spec("suite_cpu")
    with pytest.raises(UserError, match="unknown workload.*nope"):
        load_suite("suite_cpu", only=["nope"])


# ---------------------------------------------------------------------------------------------- progress
def test_eta_weights_each_workload_by_its_own_trial_time():
    m = Meter(concurrent=2)
    m.planned = {"a": 4, "b": 10}
    m.finished("a", 10.0)
    m.finished("a", 30.0)
    # a: 2 left × 20 s; b (not started): 10 × the mean of everything so far (20 s); two slots
    assert m.eta() == pytest.approx((2 * 20 + 10 * 20) / 2)
    m.finished("b", 2.0)
    assert m.eta() == pytest.approx((2 * 20 + 9 * 2) / 2)
    m.finished("b", None)  # a failed or replayed trial counts as done, adds no busy time
    assert m.busy_s == pytest.approx(42.0) and m.done == {"a": 2, "b": 2}
    assert "4/14 trials" in m.line() and "ETA ~" in m.line()
    fresh = Meter(concurrent=1, planned={"a": 3, "b": 2}, prior_s={"a": 5.0, "b": 40.0})
    assert fresh.eta() is None and "ETA ?" in fresh.line()  # no trial has run: a prior alone is no estimate
    fresh.finished("a", 7.0)
    assert fresh.eta() == pytest.approx(2 * 7 + 2 * 40)  # b, not started yet: its own prior
    assert Meter(planned={"a": 1}).eta() is None


# ---------------------------------------------------------------------------------------------- pretraining
def test_pretraining_records_one_old_val_point_per_epoch_and_before_metrics_are_cached(tmp_path):
    from profit_bench.pretrain import before_metrics, cache_path, default_pretrain_config, ensure_pretrained
    from profit_bench.tasks import evaluate, get_task
    pcfg = default_pretrain_config("digits", epochs=3)
    path = Path(ensure_pretrained("digits", "mlp", 0, pcfg, tmp_path, progress=False))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert len(meta["old_val_curve"]) == 3 and meta["old_val_curve"][-1] == pytest.approx(meta["old_val"])
    task = get_task("digits", seed=0)
    from profit_bench.pretrain import load_or_pretrain
    model = load_or_pretrain(task, "mlp", 0, pcfg, tmp_path, progress=False, build=False)
    direct = {f"{s}_before": evaluate(model, task, s)[0] for s in ("old_val", "new_val", "old_test", "new_test")}
    direct["new_val_loss_before"] = evaluate(model, task, "new_val")[1]
    assert before_metrics(model, task, path) == direct
    sidecar = path.with_name(path.stem + ".before-cpu.json")
    assert sidecar.is_file()
    # a rebuilt checkpoint (another content hash) makes the saved numbers stale: recomputed from the model
    from profit_bench.pretrain import _numbers_sha256
    saved = json.loads(sidecar.read_text())
    values = {**saved["values"], "old_val_before": -1.0}
    sidecar.write_text(json.dumps({**saved, "values": values, "sha256": _numbers_sha256(values)}))
    assert before_metrics(model, task, path)["old_val_before"] == -1.0  # same checkpoint: read
    sidecar.write_text(json.dumps({**saved, "values": values, "sha256": _numbers_sha256(values),
                                   "checkpoint_sha256": "another checkpoint"}))
    assert before_metrics(model, task, path) == direct
    assert cache_path("digits", "mlp", 0, pcfg, tmp_path) == path


# ---------------------------------------------------------------------------------------------- end to end
SMOKE = ["--set", "trial.limit=64", "--set", "budget.epochs=2", "--set", "trial.eval_every=1",
         "--set", "ablate.n_ref=[2]", "--set", "ablate.ratio=[10]", "--set", "workloads.toy.trial.pretrain_steps=20",
         *[x for w in SUITE_WORKLOADS[1:] for x in ("--set", f"workloads.{w}.trial.pretrain_epochs=1")],
         "--num-samples", "1", "--confirm-seeds", "1", "--verbose", "0", "--quiet"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import ray
    tmp = tmp_path_factory.mktemp("suite")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 ** 2)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = ["suite_cpu", *SMOKE, "--storage-path", str(tmp / "ray"), "--tracking-uri", uri]
    yield tmp, uri, args
    ray.shutdown()


def test_suite_smoke_runs_every_workload_with_confirmation_ablation_and_accounting(smoke, capsys):
    from mlflow.tracking import MlflowClient
    tmp, uri, args = smoke
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"harness overhead: \d+\.\d% of 2 slots", out)
    assert re.search(r"\[\d+/\d+\] search .* \| \d+/\d+ trials, \d+m\d\ds elapsed, ETA", out)
    assert "== Status ==" not in out
    summary = json.loads(next((tmp / "ray").glob("suite_cpu_summary_*.json")).read_text())
    assert 0 <= summary["harness_share"] <= 1 and summary["busy_s"] > 0
    assert set(summary["trials"]) == set(SUITE_WORKLOADS)

    client = MlflowClient(uri)
    for w in SUITE_WORKLOADS:
        exp = client.get_experiment_by_name(f"suite_cpu_{w}")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        parent = next(r for r in runs if r.data.tags.get("profit_bench.role") == "sweep")
        trials = [r for r in runs if r.data.tags.get("profit_bench.role") == "trial"]
        assert parent.data.tags["suite"] == "suite_cpu" and "suite_cpu" in parent.data.tags["suite_command"]
        sizes = json.loads(parent.data.params["data_sizes"])
        assert set(sizes) >= {"old_train", "new_test"} and max(sizes.values()) <= 64
        curves = [k for k in parent.data.metrics if re.fullmatch(r"pretrain\.\w+\.seed\d+\.old_val", k)]
        assert {c.split(".")[2] for c in curves} == {"seed0", "seed1000"}  # search and confirmation seeds
        stages = {}
        for r in trials:
            stages.setdefault(r.data.tags["stage"], []).append(r)
        assert len(stages["search"]) == trials_per_arm(parent) * n_arms(parent)
        assert all("knee" in r.data.tags["choice"] for r in stages.get("confirm", []))
        for r in stages.get("ablation", []):
            assert r.data.tags["arm"] == "profit" and r.data.tags["ablation_knob"] in ("n_ref", "ratio")
            assert r.data.params["seed"] == "1000"
            assert r.data.params[r.data.tags["ablation_knob"]] in ("2", "10.0")


def trials_per_arm(parent) -> int:
    return int(parent.data.params["trials_per_arm"])


def n_arms(parent) -> int:
    return int(parent.data.params["num_trials"]) // trials_per_arm(parent)


def test_suite_resume_after_it_finished_reruns_nothing(smoke, capsys):
    from mlflow.tracking import MlflowClient
    tmp, uri, args = smoke
    client = MlflowClient(uri)
    count = sum(len(client.search_runs([e.experiment_id], max_results=1000)) for e in client.search_experiments())
    if count == 0:
        pytest.skip("needs the smoke run")
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.count("finished already") == len(SUITE_WORKLOADS)
    assert sum(len(client.search_runs([e.experiment_id], max_results=1000))
               for e in client.search_experiments()) == count


def test_suite_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["suite_cpu", "--workloads", "nope", "--dry-run"]) == 2
    assert "unknown workload(s) nope" in capsys.readouterr().err
    assert main(["toy", "--workloads", "toy", "--dry-run"]) == 2
    assert "--workloads is for suites" in capsys.readouterr().err
    assert main(["suite_cpu", "--experiment", "x", "--dry-run"]) == 2
    assert main(["suite_cpu", "--dry-run", "--workloads", "toy"]) == 0
    assert "workload toy" in capsys.readouterr().out
