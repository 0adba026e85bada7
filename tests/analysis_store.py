"""Synthetic MLflow stores for the analysis tests, in the MLflow layout of docs/architecture.md (search runs,
protocol-chosen confirmation runs), built in a tmp sqlite file in seconds.

The synthetic sweep: per arm a grid of hyperparameter points; validation metrics trade old against new along the
grid, test = validation + independent noise. Confirmation runs are the protocol's choices on validation. Optional:
an ablation stage around a PROFIT arm's knee (n_ref, then ratio, on confirmation seeds), pretraining curves and
suite tags on the sweep's parent run."""

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from analysis import stats
from analysis.report import main
from profit_bench import protocol


ROOT = Path(__file__).resolve().parents[1]
CONFIRM_SEEDS = [1000, 1001, 1002]
SEARCH_TEST_SENTINEL = 7.777  # search runs' test metrics: never in a table or a test front
SUITE = "suite_cpu"
SUITE_COMMAND = "python -m profit_bench.sweep suite_cpu --set budget.steps=20"


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


def section(md: str, start: str, end: str = "\n## ") -> str:
    return md.split(start, 1)[1].split(end, 1)[0]


def _lines(md: str, start: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(start)]


def part(md: str, top: str, experiment: str) -> str:
    """The subsection of experiment `experiment` in section `top`, its name replaced so copies compare equal."""
    return section(section(md, top), f"### {experiment}: ", "\n### ").replace(experiment, "EXP")


def selection_of(out: Path, experiment: str) -> pd.DataFrame:
    sel = pd.read_csv(out / "selection.csv")
    return sel[sel["experiment"] == experiment].drop(columns="experiment").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- reading report rows
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
