"""A sweep: a YAML spec → Ray Tune trials (Optuna multi-objective search or a grid) → one MLflow run per trial.

    python -m profit_bench.sweep toy                 # 8 Optuna trials on the 2-D toy task, results in ./mlflow.db
    python -m profit_bench.sweep table9_ratio --set budget.epochs=1 --set seeds=[0]   # a small table on a CPU
    python -m profit_bench.sweep toy --resume        # continue the latest interrupted `toy` sweep
    mlflow ui --backend-store-uri sqlite:///mlflow.db   # then open http://127.0.0.1:5000

NAME is a file in sweeps/ (without .yaml) or a path. The spec schema is in `load_spec`; `--set KEY=VALUE`
(repeatable, dotted keys, VALUE parsed as YAML) edits the spec before validation, e.g. `--set budget.epochs=1`.

Every trial trains for the same fixed budget so that the (old, new) points are comparable; early stopping
(ASHA) exists only for single-objective sweeps. Pretraining runs once per (task, model, seed) in the driver
before any trial starts; trials read it from the cache. MLflow: one parent run per sweep, one child per Ray
trial, found again by its `ray_trial_id` tag so that a resumed sweep updates runs instead of duplicating them.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import itertools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import yaml

from profit_bench import UserError

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
OBJECTIVES = ("old_metric", "new_metric", "forgetting", "old_loss", "new_loss")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice", "grid")
TOP_KEYS = {"name", "description", "task", "task_if_data_dir", "models", "seeds", "search", "sampler", "num_samples", "max_concurrent",
            "objectives", "early_stop", "budget", "trial", "methods"}
# TrialConfig fields the sweep owns: set from the spec's top level, the CLI or the budget, never per method.
SWEEP_OWNED = {"task", "model", "seed", "device", "data_dir", "cache_dir", "steps", "epochs"}
NOT_SEARCHABLE = SWEEP_OWNED | {"pretrain_steps", "pretrain_epochs", "limit", "dtype", "method", "method_args"}
FAIL_ENV = "PROFIT_BENCH_FAIL_ARM"  # test hook: trials of this method label raise before training (see README)


def _trial_fields() -> set[str]:
    from profit_bench.trial import TrialConfig
    return {f.name for f in fields(TrialConfig)}


# ---------------------------------------------------------------------------------------------- the spec
@dataclass
class Arm:
    """One `methods:` entry: a label, the TrialConfig values it fixes, and the ones it searches."""
    label: str
    fixed: dict            # TrialConfig field → value (method, optimizer, profit, method_args, ...)
    space: dict            # TrialConfig field → {distribution: args}
    models: list           # the backbones this arm runs on (default: the sweep's `models`)


@dataclass
class SweepSpec:
    name: str
    task: str
    models: list           # [None] = the task's default model
    seeds: list[int]
    search: str            # "optuna" | "grid"
    sampler: str           # "nsga2" | "tpe"
    num_samples: int
    max_concurrent: int | None
    objectives: list[str]
    early_stop: bool
    budget: dict           # {"steps": n} or {"epochs": n}
    trial: dict            # TrialConfig values shared by every trial
    arms: list[Arm]
    raw: dict = field(repr=False, default_factory=dict)  # the validated YAML, for the MLflow parent run


def find_spec_file(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    q = SWEEPS_DIR / f"{name}.yaml"
    if q.is_file():
        return q
    known = sorted(x.stem for x in SWEEPS_DIR.glob("*.yaml"))
    raise UserError(f"no sweep {name!r}: not a YAML file and not in {SWEEPS_DIR}/ (known: {', '.join(known)})")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set a.b=VALUE`: VALUE is parsed as YAML (`1`, `[0, 1]`, `{loguniform: [1e-4, 1e-2]}`)."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set budget.epochs=1")
        node, parts = raw, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise UserError(f"--set {item!r}: {p!r} is not a mapping in the spec")
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: value is not valid YAML ({e.problem})") from None
    return raw


def _check_dist(where: str, key: str, value, search: str) -> bool:
    """True when `value` is a distribution ({kind: args}); UserError when it looks like one but is malformed."""
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS):
        return False
    kind, args = next(iter(value.items()))
    if kind == "grid" and search != "grid":
        raise UserError(f"{where}.{key}: `grid` values need `search: grid` (this sweep uses {search})")
    if kind != "grid" and search == "grid":
        raise UserError(f"{where}.{key}: a grid sweep takes `{{grid: [...]}}` lists, not {kind}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}.{key}: `{kind}` needs a non-empty list")
    else:
        if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
                and args[0] <= args[1]):
            raise UserError(f"{where}.{key}: `{kind}` needs [low, high] numbers with low <= high, got {args!r}")
        if kind in ("loguniform", "logint") and args[0] <= 0:
            raise UserError(f"{where}.{key}: `{kind}` needs low > 0")
        if kind in ("int", "logint") and not all(float(a).is_integer() for a in args):
            raise UserError(f"{where}.{key}: `{kind}` needs integer bounds")
    if key in NOT_SEARCHABLE:
        raise UserError(f"{where}.{key} cannot be searched; fix it in `trial:` / `budget:` instead")
    return True


def load_spec(name: str, overrides: list[str] | None = None, data_dir=None) -> SweepSpec:
    """Read and validate a sweep YAML. Schema (every key but `task`, `budget`, `methods` optional):

        name: toy                       # MLflow experiment / Ray run name (default: the file name)
        task: toy                       # a profit_bench.tasks name
        task_if_data_dir: cifar         # used instead of `task` when --data-dir is given
        models: [mlp]                   # backbones (default: the task's); a grid axis, or searched by Optuna
        seeds: [0]                      # trial seeds; a grid axis, or searched by Optuna
        search: optuna                  # optuna | grid
        sampler: nsga2                  # optuna only: nsga2 | tpe
        num_samples: 8                  # optuna: trials; grid: repeats of the whole grid
        max_concurrent: 2
        objectives: [old_metric, new_metric]   # directions come from the task (mse ↓, accuracy ↑)
        early_stop: false               # ASHA; only with one objective
        budget: {steps: 1500}           # the fixed per-trial budget: steps or epochs
        trial: {eval_every: 100}        # TrialConfig values for every trial
        methods:                        # label → TrialConfig values; {loguniform|uniform|int|logint|choice: ..}
          profit: {lr: {loguniform: [1e-5, 1e-2]}, ratio: {loguniform: [10, 10000]}, n_ref: {int: [1, 5]}}
          adam+profit: {method: full, optimizer: adam, profit: true, lr: 1e-4}   # grid: {grid: [...]}
          vit: {method: profit, models: [vit_tiny], lr: 1e-4}   # an entry's own backbones
    """
    path = find_spec_file(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the sweep spec must be a mapping with keys task, budget, methods, ...")
    raw = apply_overrides(raw, overrides)
    if data_dir is not None and raw.get("task_if_data_dir"):
        raw["task"] = raw["task_if_data_dir"]
    return validate_spec(raw, default_name=path.stem, where=str(path))


def validate_spec(raw: dict, default_name: str = "sweep", where: str = "spec") -> SweepSpec:
    from profit_bench.methods import get_method
    from profit_bench.tasks import TASKS

    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    for key in ("task", "budget", "methods"):
        if key not in raw:
            raise UserError(f"{where}: missing required key `{key}`")
    task = raw["task"]
    if task not in TASKS:
        raise UserError(f"{where}: unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    search = raw.get("search", "optuna")
    if search not in ("optuna", "grid"):
        raise UserError(f"{where}: search must be optuna or grid, got {search!r}")
    sampler = raw.get("sampler", "nsga2")
    if sampler not in ("nsga2", "tpe"):
        raise UserError(f"{where}: sampler must be nsga2 or tpe, got {sampler!r}")
    objectives = raw.get("objectives", ["old_metric", "new_metric"])
    if (not isinstance(objectives, list) or not 1 <= len(objectives) <= 2
            or any(o not in OBJECTIVES for o in objectives)):
        raise UserError(f"{where}: objectives must be a list of one or two of {', '.join(OBJECTIVES)}")
    early_stop = bool(raw.get("early_stop", False))
    if early_stop and (len(objectives) != 1 or search != "optuna"):
        raise UserError(f"{where}: early_stop needs a single objective and search: optuna (Pareto points need a "
                        f"fixed budget)")
    budget = raw["budget"]
    if not (isinstance(budget, dict) and len(budget) == 1 and next(iter(budget)) in ("steps", "epochs")
            and isinstance(next(iter(budget.values())), int) and next(iter(budget.values())) > 0):
        raise UserError(f"{where}: budget must be {{steps: N}} or {{epochs: N}} with N a positive integer")
    models = raw.get("models", [None])
    seeds = raw.get("seeds", [0])
    if not isinstance(models, list) or not models:
        raise UserError(f"{where}: models must be a non-empty list")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"{where}: seeds must be a non-empty list of integers")
    num_samples = raw.get("num_samples", 1 if search == "grid" else 8)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"{where}: num_samples must be a positive integer")
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise UserError(f"{where}: max_concurrent must be a positive integer")

    valid = _trial_fields()
    trial = raw.get("trial") or {}
    if not isinstance(trial, dict):
        raise UserError(f"{where}: trial must be a mapping of TrialConfig fields")
    bad = set(trial) - (valid - SWEEP_OWNED)
    if bad:
        raise UserError(f"{where}: trial: unknown or sweep-owned keys {sorted(bad)} (task/models/seeds/budget "
                        f"go at the top level)")
    methods = raw["methods"]
    if not isinstance(methods, dict) or not methods:
        raise UserError(f"{where}: methods must be a mapping label → settings, e.g. {{profit: {{lr: 1e-4}}}}")
    arms = []
    for label, entry in methods.items():
        if not isinstance(entry or {}, dict):
            raise UserError(f"{where}: methods.{label} must be a mapping of TrialConfig fields")
        entry = dict(entry or {})
        entry.setdefault("method", label)
        arm_models = entry.pop("models", models)
        if not isinstance(arm_models, list) or not arm_models:
            raise UserError(f"{where}: methods.{label}.models must be a non-empty list")
        bad = set(entry) - (valid - SWEEP_OWNED)
        if bad:
            raise UserError(f"{where}: methods.{label}: unknown keys {sorted(bad)}; valid: "
                            f"{sorted(valid - SWEEP_OWNED)}")
        for m in arm_models:
            try:
                get_method(entry["method"], m)
            except UserError as e:
                raise UserError(f"{where}: methods.{label}: {e}") from None
        space = {k: v for k, v in entry.items() if _check_dist(f"methods.{label}", k, v, search)}
        fixed = {k: v for k, v in entry.items() if k not in space}
        arms.append(Arm(str(label), fixed, space, arm_models))
    spec = SweepSpec(name=str(raw.get("name", default_name)), task=task, models=models, seeds=seeds,
                     search=search, sampler=sampler, num_samples=num_samples, max_concurrent=max_concurrent,
                     objectives=objectives, early_stop=early_stop, budget=dict(budget), trial=dict(trial),
                     arms=arms, raw=raw)
    for d in corner_configs(spec):  # the trial code's own checks (optimizer, scheduler, warmup ≤ epochs, ...)
        try:
            _resolved(d)
        except UserError as e:
            raise UserError(f"{where}: methods.{d['_arm']}: {e}") from None
        except TypeError as e:
            raise UserError(f"{where}: methods.{d['_arm']}: {e}") from None
    return spec


def trial_dict(spec: SweepSpec, point: dict, *, data_dir=None, cache_dir=None, device="cpu") -> dict:
    """The TrialConfig kwargs of one point {arm, model, seed, params}."""
    arm = next(a for a in spec.arms if a.label == point["arm"])
    d = {**spec.trial, **arm.fixed, **point.get("params", {}), **spec.budget,
         "task": spec.task, "model": point["model"], "seed": point["seed"], "device": device,
         "data_dir": data_dir, "cache_dir": cache_dir}
    return d


def _resolved(d: dict):
    from profit_bench.trial import TrialConfig, resolve
    return resolve(TrialConfig(**{k: v for k, v in d.items() if not k.startswith("_")}))


def corner_configs(spec: SweepSpec):
    """Trial dicts at the low and high corner of every arm's space (grid: every value), for validation."""
    for arm in spec.arms:
        for corner in (0, -1):
            params = {}
            for k, dist in arm.space.items():
                kind, args = next(iter(dist.items()))
                params[k] = args[corner]
                if kind in ("int", "logint"):
                    params[k] = int(params[k])
            for m in arm.models:
                yield {**trial_dict(spec, {"arm": arm.label, "model": m, "seed": spec.seeds[0], "params": params}),
                       "_arm": arm.label}


def grid_points(spec: SweepSpec) -> list[dict]:
    """Every (arm, model, seed, values) of a grid sweep; each arm has its own grid."""
    points = []
    for arm in spec.arms:
        keys = list(arm.space)
        values = [next(iter(arm.space[k].values())) for k in keys]
        for model, combo, seed in itertools.product(arm.models, itertools.product(*values), spec.seeds):
            points.append(dict(arm=arm.label, model=model, seed=seed, params=dict(zip(keys, combo))))
    return points * spec.num_samples


def define_by_run(trial, spec: SweepSpec):
    """Optuna define-by-run space: the method label first, then only that method's parameters.

    Parameter names are `<label>/<field>`, so that e.g. `profit/lr` and `full/lr` are separate distributions;
    Ray unflattens them into config[label][field].
    """
    label = trial.suggest_categorical("arm", [a.label for a in spec.arms])
    arm = next(a for a in spec.arms if a.label == label)
    if len(arm.models) > 1:
        trial.suggest_categorical(f"{label}/model", arm.models)
    if len(spec.seeds) > 1:
        trial.suggest_categorical("seed", spec.seeds)
    for k, dist in arm.space.items():
        kind, args = next(iter(dist.items()))
        name = f"{label}/{k}"
        if kind in ("loguniform", "uniform"):
            trial.suggest_float(name, float(args[0]), float(args[1]), log=kind == "loguniform")
        elif kind in ("int", "logint"):
            trial.suggest_int(name, int(args[0]), int(args[1]), log=kind == "logint")
        else:
            trial.suggest_categorical(name, args)
    return None


def point_from_config(spec: SweepSpec, config: dict) -> dict:
    """Ray config (grid: {"point": ...}; Optuna: {"arm", "model"?, "seed"?, label: {...}}) → a point."""
    if "point" in config:
        return config["point"]
    label = config["arm"]
    params = dict(config.get(label, {}))
    arm = next(a for a in spec.arms if a.label == label)
    return dict(arm=label, model=params.pop("model", arm.models[0]), seed=config.get("seed", spec.seeds[0]),
                params=params)


def objective_modes(spec: SweepSpec, higher_is_better: bool) -> list[str]:
    up = "max" if higher_is_better else "min"
    return [up if o in ("old_metric", "new_metric") else "min" for o in spec.objectives]


# ---------------------------------------------------------------------------------------------- MLflow
def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _param_str(v) -> str:
    s = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
    return s[:6000]


def _retry(fn, *a, **kw):
    # SQLite allows one writer at a time; concurrent trials can see "database is locked" under load.
    for attempt in range(6):
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - mlflow wraps the sqlalchemy error in its own types
            if "locked" not in str(e) or attempt == 5:
                raise
            time.sleep(0.5 * 2 ** attempt)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    out = {}
    for pkg in ("profit-bench", "torch", "timm", "peft", "ray", "optuna", "mlflow", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class TrialRun:
    """The MLflow child run of one Ray trial: created once, found again (by tag ray_trial_id) on a re-run."""

    def __init__(self, ctx: "SweepContext", trial_id: str, label: str, cfg_dict: dict):
        from mlflow.entities import Param, RunTag
        self.client = _client(ctx.tracking_uri)
        self.step_key = "main_steps" if cfg_dict.get("steps") is not None else "epoch"
        query = f"tags.ray_trial_id = '{trial_id}' and tags.`mlflow.parentRunId` = '{ctx.parent_run_id}'"
        found = _retry(self.client.search_runs, [ctx.experiment_id], query, max_results=1)
        tags = {"mlflow.parentRunId": ctx.parent_run_id, "profit_bench.role": "trial", "ray_trial_id": trial_id,
                "status": "running", "metric_name": ctx.metric_name, "higher_is_better": str(ctx.higher_is_better),
                "arm": label, "device_name": device_name(cfg_dict.get("device", "cpu")),
                "mlflow.runName": f"{label}-{trial_id}", **ctx.provenance}
        self.logged_step = -1  # evaluations up to here are in MLflow already (a re-run of an interrupted trial)
        if found:
            self.run_id = found[0].info.run_id
            _retry(self.client.update_run, self.run_id, status="RUNNING")
            history = _retry(self.client.get_metric_history, self.run_id, "old_metric")
            self.logged_step = max((m.step for m in history), default=-1)
        else:
            self.run_id = _retry(self.client.create_run, ctx.experiment_id, tags=tags,
                                 run_name=tags["mlflow.runName"]).info.run_id
        params = [Param(k, _param_str(v)) for k, v in sorted(cfg_dict.items())]
        _retry(self.client.log_batch, self.run_id, params=params,
               tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, values: dict, step: int):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(step)) for k, v in values.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
        _retry(self.client.log_batch, self.run_id, metrics=ms)

    def epoch(self, rec: dict):
        # Trials are seeded, so a re-run reproduces the evaluations an interrupted attempt already logged.
        if rec[self.step_key] <= self.logged_step:
            return
        self.logged_step = rec[self.step_key]
        self.log_metrics({k: rec[k] for k in ("old_metric", "new_metric", "old_loss", "new_loss", "train_loss",
                                              "main_steps", "epoch")}, step=rec[self.step_key])

    def finish(self, result: dict, overhead: dict):
        keys = ("old_metric", "new_metric", "old_loss", "new_loss", "old_before", "new_before", "forgetting",
                "peak_mem_bytes", "step_time_median_s", "wall_time_s", "n_trainable", "profit_state_bytes",
                "main_steps")
        step = result["main_steps"] if self.step_key == "main_steps" else result["epochs_done"]
        if step <= self.logged_step:  # the last evaluation is the final one (same weights): one point per step
            keys = tuple(k for k in keys if k not in ("old_metric", "new_metric", "old_loss", "new_loss"))
        self.log_metrics({**{k: result[k] for k in keys}, **overhead}, step=step)
        self.client.set_tag(self.run_id, "status", result["status"])
        _retry(self.client.set_terminated, self.run_id, status="FINISHED")

    def fail(self, err: BaseException):
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            self.client.set_tag(self.run_id, "status", "failed" if status == "FAILED" else "killed")
            self.client.set_tag(self.run_id, "error", f"{type(err).__name__}: {err}"[:5000])
            self.client.set_terminated(self.run_id, status=status)
        except Exception:  # noqa: BLE001 - never hide the trial's own error behind a logging one
            traceback.print_exc()


# ---------------------------------------------------------------------------------------------- the trainable
@dataclass
class SweepContext:
    """Everything a trial needs besides its point; shipped to workers through tune.with_parameters."""
    spec: SweepSpec
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric_name: str
    higher_is_better: bool
    device: str
    threads: int
    data_dir: str | None
    cache_dir: str
    fail_arm: str | None = None
    provenance: dict = field(default_factory=dict)  # git commit + package versions, tagged on every child run


def train_trial(config: dict, ctx: SweepContext):
    """Ray Tune function trainable: one run_trial, reported to Tune at every evaluation and logged to MLflow."""
    import torch
    from ray import tune

    from profit_bench.trial import run_trial

    t0 = time.perf_counter()
    torch.set_num_threads(ctx.threads)
    point = point_from_config(ctx.spec, config)
    cfg = _resolved(trial_dict(ctx.spec, point, data_dir=ctx.data_dir, cache_dir=ctx.cache_dir, device=ctx.device))
    trial_id = tune.get_context().get_trial_id()
    run = TrialRun(ctx, trial_id, point["arm"], asdict(cfg))
    t_run, t_report = 0.0, [0.0]  # report time (MLflow + tune.report) is Ray/MLflow overhead inside run_trial
    try:
        if ctx.fail_arm is not None and point["arm"] == ctx.fail_arm:
            raise RuntimeError(f"failure injected by {FAIL_ENV}={ctx.fail_arm}")

        def report(rec):
            t = time.perf_counter()
            run.epoch(rec)
            tune.report({k: v for k, v in rec.items()})
            t_report[0] += time.perf_counter() - t

        t1 = time.perf_counter()
        result = run_trial(cfg, report=report)
        t_run = time.perf_counter() - t1
    except BaseException as e:
        run.fail(e)
        raise
    overhead = {"run_trial_s": t_run, "report_s": t_report[0], "trainable_s": time.perf_counter() - t0}
    run.finish(result, overhead)
    final = {k: v for k, v in result.items() if k not in ("history", "config") and not isinstance(v, dict)}
    tune.report({**final, **overhead, "trainable_s": time.perf_counter() - t0, "final": True,
                 "mlflow_run_id": run.run_id})


# ---------------------------------------------------------------------------------------------- the driver
@dataclass
class Options:
    num_samples: int | None = None
    max_concurrent: int | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    address: str | None = None
    storage_path: str = "ray_results"
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    seed: int | None = None
    resume: bool = False
    dry_run: bool = False
    overrides: list = field(default_factory=list)
    verbose: int = 1


def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///rel.db → sqlite:////abs/rel.db: Ray workers do not share the driver's working directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain folder = file store
        return Path(uri).resolve().as_uri()
    return uri


def plan_resources(opts: Options, spec: SweepSpec, cluster: dict) -> tuple[float, float, int]:
    """(cpus, gpus per trial, max concurrent trials) from the options, or from what the cluster has."""
    n_cpu, n_gpu = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    gpus = opts.gpus_per_trial
    if gpus is not None and gpus > 0 and n_gpu == 0:
        raise UserError(f"--gpus-per-trial {gpus:g} asked for, but the Ray cluster has no GPUs; drop the option "
                        f"(or use --address to join a cluster that has GPUs)")
    if gpus is not None and gpus > n_gpu:
        raise UserError(f"--gpus-per-trial {gpus:g} exceeds the cluster's {n_gpu:g} GPUs; use a fraction such as "
                        f"0.25 to share one GPU between trials")
    if gpus is not None and gpus < 0:
        raise UserError("--gpus-per-trial must be >= 0")
    concurrent = opts.max_concurrent or spec.max_concurrent
    cpus = opts.cpus_per_trial
    if cpus is None:
        cpus = max(1.0, math.floor(n_cpu / concurrent)) if concurrent else 1.0
    if cpus <= 0 or cpus > n_cpu:
        raise UserError(f"--cpus-per-trial {cpus:g} must be in (0, {n_cpu:g}] (the cluster's CPUs)")
    if concurrent is None:
        concurrent = max(1, int(n_cpu // cpus))
    if gpus is None:  # share the GPUs between the concurrent trials; never more than one GPU a trial
        gpus = min(1.0, n_gpu / concurrent) if n_gpu else 0.0
    return cpus, gpus, concurrent


def sweep_dirs(storage: Path, name: str) -> list[Path]:
    return sorted((p for p in storage.glob(f"{name}_*") if (p / "tuner.pkl").exists()), key=lambda p: p.name)


def init_ray(address: str | None):
    import ray
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level=logging.ERROR)
    if address:
        ray.init(address=address, **kw)
    else:
        # Small object store: trials pass only configs and metrics; this keeps /dev/shm needs tiny.
        ray.init(num_cpus=os.cpu_count(), object_store_memory=200 * 1024 ** 2, **kw)


def pretrain_all(spec: SweepSpec, opts: Options, device: str, cache_dir: str) -> float:
    """Pretrain (or find in the cache) every (task, model, seed, pretrain config) the trials will load."""
    from profit_bench.pretrain import cache_path, default_pretrain_config, load_or_pretrain
    from profit_bench.tasks import get_task

    t0 = time.perf_counter()
    keys = {}
    for d in corner_configs(spec):
        cfg = _resolved({**d, "data_dir": opts.data_dir})
        for seed in spec.seeds:
            keys[(cfg.model, seed, cfg.pretrain_steps, cfg.pretrain_epochs, cfg.limit, cfg.dtype)] = cfg
    tasks = {}
    for (model, seed, steps, epochs, limit, dtype), cfg in keys.items():
        if (seed, limit) not in tasks:
            tasks[(seed, limit)] = get_task(spec.task, data_dir=opts.data_dir, device=device, seed=seed,
                                            limit=limit)
        task = tasks[(seed, limit)]
        pcfg = default_pretrain_config(task.name, steps=steps, epochs=epochs, limit=limit, dtype=dtype)
        path = cache_path(task.name, model, seed, pcfg, cache_dir)
        if not path.is_file():
            print(f"pretraining {task.name}/{model} seed {seed} once for all trials → {path}", flush=True)
        load_or_pretrain(task, model, seed, pcfg, cache_dir)
    return time.perf_counter() - t0


def task_direction(spec: SweepSpec, data_dir) -> tuple[str, bool]:
    from profit_bench.tasks import get_task
    task = get_task(spec.task, data_dir=data_dir, limit=8)
    return task.metric, task.higher_is_better


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def point_summary(spec: SweepSpec, config: dict) -> str:
    p = point_from_config(spec, config)
    extra = [f"{k}={_fmt(v)}" for k, v in p["params"].items()]
    if any(len(a.models) > 1 for a in spec.arms) or len({m for a in spec.arms for m in a.models}) > 1:
        extra.insert(0, str(p["model"]))
    if len(spec.seeds) > 1:
        extra.append(f"seed={p['seed']}")
    return " ".join([p["arm"]] + extra)


def _progress_base():
    from ray import tune
    return tune.Callback


class Progress(_progress_base()):
    """One compact line per finished trial: method, params, old/new metric, status, time."""

    def __init__(self, spec: SweepSpec, total: int):
        self.spec, self.total, self.done = spec, total, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        print(f"[{self.done}/{self.total}] {point_summary(self.spec, trial.config)} | old "
              f"{_fmt(r.get('old_metric'))} new {_fmt(r.get('new_metric'))} | {r.get('status', '?')} "
              f"{r.get('wall_time_s', 0):.1f}s", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        print(f"[{self.done}/{self.total}] {point_summary(self.spec, trial.config)} | FAILED (traceback: "
              f"{trial.local_path}/error.txt; MLflow tag `error`)", flush=True)


def print_plan(spec: SweepSpec, opts: Options, cpus, gpus, concurrent, points, name):
    print(f"sweep {spec.name}: task {spec.task}, {spec.search} search, objectives "
          f"{', '.join(spec.objectives)}, budget {spec.budget}, trial settings {spec.trial}")
    print(f"resources: {cpus:g} CPU + {gpus:g} GPU per trial, at most {concurrent} at once; "
          f"device {'cuda' if gpus > 0 else 'cpu'}")
    print(f"ray: {opts.storage_path}/{name}; mlflow: {opts.tracking_uri} experiment {opts.experiment or spec.name}")
    if points is not None:
        print(f"{len(points)} trials (grid):")
        for p in points:
            print(f"  {p['arm']} model={p['model']} seed={p['seed']} {p['params']}")
    else:
        print(f"{spec.num_samples} trials ({spec.sampler} over models {spec.models}, seeds {spec.seeds}):")
        for a in spec.arms:
            print(f"  {a.label} on {a.models}: fixed {a.fixed}, search {a.space}")


def run_sweep(name: str, opts: Options):
    """Resolve, validate, pretrain, run the trials; return the ray ResultGrid (None for a dry run)."""
    spec = load_spec(name, opts.overrides, data_dir=opts.data_dir)
    if opts.seed is not None:
        spec.seeds = [opts.seed]
    if opts.num_samples is not None:
        spec.num_samples = opts.num_samples
    experiment = opts.experiment or spec.name
    storage = Path(opts.storage_path).resolve()
    cache_dir = str(Path(opts.cache_dir).resolve()) if opts.cache_dir else None
    if cache_dir is None:
        from profit_bench.pretrain import default_cache_dir
        cache_dir = str(Path(default_cache_dir()).resolve())
    data_dir = str(Path(opts.data_dir).resolve()) if opts.data_dir else None
    opts.data_dir = data_dir
    opts.tracking_uri = absolute_tracking_uri(opts.tracking_uri)
    points = grid_points(spec) if spec.search == "grid" else None
    total = len(points) if points is not None else spec.num_samples

    if opts.dry_run:
        import torch
        cluster = {"CPU": os.cpu_count(), "GPU": torch.cuda.device_count()}
        if opts.address:
            init_ray(opts.address)
            import ray
            cluster = ray.cluster_resources()
        cpus, gpus, concurrent = plan_resources(opts, spec, cluster)
        print_plan(spec, opts, cpus, gpus, concurrent, points, f"{experiment}_<timestamp>")
        return None

    init_ray(opts.address)
    import ray
    from ray import tune

    cpus, gpus, concurrent = plan_resources(opts, spec, ray.cluster_resources())
    device = "cuda" if gpus > 0 else "cpu"
    metric_name, higher_is_better = task_direction(spec, data_dir)
    modes = objective_modes(spec, higher_is_better)

    if opts.resume:
        found = sweep_dirs(storage, experiment)
        if not found:
            raise UserError(f"nothing to resume: no {experiment}_* sweep under {storage}; drop --resume")
        exp_dir = found[-1]
        print(f"resuming {exp_dir}", flush=True)
    else:
        exp_dir = storage / f"{experiment}_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}"

    # MLflow parent run: one per sweep directory, found again on --resume.
    client = _client(opts.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        art = None
        if opts.tracking_uri.startswith("sqlite:///"):
            art = (Path(opts.tracking_uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=art)
    else:
        exp_id = exp.experiment_id
    commit = git_commit()
    provenance = {"git_commit": commit, "mlflow.source.git.commit": commit,
                  **{f"version.{k}": v for k, v in package_versions().items()}}
    parent = client.search_runs([exp_id], f"tags.ray_experiment_path = '{exp_dir}'", max_results=1)
    if parent:
        parent_id = parent[0].info.run_id
        client.update_run(parent_id, status="RUNNING")
    else:
        if opts.resume:
            raise UserError(f"no MLflow parent run for {exp_dir} in {opts.tracking_uri}; pass the same "
                            f"--tracking-uri and --experiment as the interrupted sweep")
        resolved_yaml = yaml.safe_dump(spec.raw, sort_keys=False)
        tags = {"profit_bench.role": "sweep", "ray_experiment_path": str(exp_dir), "sweep": spec.name,
                "mlflow.source.git.commit": commit, "git_commit": commit,
                "device_name": device_name(device), "mlflow.runName": exp_dir.name}
        parent_id = client.create_run(exp_id, tags=tags, run_name=exp_dir.name).info.run_id
        cli = {k: v for k, v in asdict(opts).items() if k not in ("dry_run", "verbose")}
        params = {"sweep.yaml": resolved_yaml, **{f"cli.{k}": _param_str(v) for k, v in cli.items()},
                  **{f"version.{k}": v for k, v in package_versions().items()},
                  "cpus_per_trial": cpus, "gpus_per_trial": gpus, "max_concurrent": concurrent,
                  "objectives": ",".join(spec.objectives), "modes": ",".join(modes), "num_trials": total}
        for k, v in params.items():
            client.log_param(parent_id, k, _param_str(v))
        try:
            client.log_text(parent_id, resolved_yaml, "sweep.yaml")
        except Exception as e:  # noqa: BLE001 - an artifact store we cannot write should not stop the sweep
            print(f"warning: could not store sweep.yaml as an artifact ({e})", file=sys.stderr)

    t_start = time.perf_counter()
    t_pretrain = pretrain_all(spec, opts, device if torch_cuda_ok(device) else "cpu", cache_dir)
    ctx = SweepContext(spec=spec, tracking_uri=opts.tracking_uri, experiment_id=exp_id, parent_run_id=parent_id,
                       metric_name=metric_name, higher_is_better=higher_is_better, device=device,
                       threads=max(1, int(cpus)), data_dir=data_dir, cache_dir=cache_dir,
                       fail_arm=os.environ.get(FAIL_ENV), provenance=provenance)
    trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx), {"cpu": cpus, "gpu": gpus})
    callbacks = [Progress(spec, total)]
    run_config = tune.RunConfig(name=exp_dir.name, storage_path=str(storage), callbacks=callbacks,
                                verbose=opts.verbose, failure_config=tune.FailureConfig(max_failures=0),
                                progress_reporter=trial_table(spec, points))
    print(f"sweep {spec.name}: {total} trials, {concurrent} at once, {cpus:g} CPU + {gpus:g} GPU each → "
          f"{exp_dir}", flush=True)
    status = "FAILED"
    try:
        if opts.resume:
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(trainable, param_space=param_space(spec, points),
                               tune_config=tune_config(spec, modes, concurrent, exp_dir),
                               run_config=run_config)
        results = tuner.fit()
        finished = sum(r.error is not None or (r.metrics or {}).get("final") is True for r in results)
        status = "FINISHED" if finished >= total else "KILLED"  # Tune returns normally after a Ctrl-C
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        wall = time.perf_counter() - t_start
        client.log_metric(parent_id, "wall_time_s", wall)
        client.log_metric(parent_id, "pretrain_s", t_pretrain)
        client.set_terminated(parent_id, status=status)
    summarize(results, spec, opts, exp_dir, experiment, wall, t_pretrain, concurrent)
    if status == "KILLED":
        raise KeyboardInterrupt
    return results


def trial_table(spec: SweepSpec, points):
    """Ray's trial table with the searched parameters and both objectives, at most every 30 s."""
    from ray.tune import CLIReporter
    if points is not None:
        params = ["point/arm", "point/model", "point/seed"] + sorted({f"point/params/{k}" for p in points
                                                                      for k in p["params"]})
    else:
        params = ["arm"] + [f"{a.label}/{k}" for a in spec.arms for k in a.space]
    names = {p: p.split("/")[-1] if p.startswith("point/") else p for p in params}
    return CLIReporter(parameter_columns=names, metric_columns={**{o: o for o in spec.objectives}, "status": "result"},
                       max_report_frequency=30, print_intermediate_tables=True, max_column_length=12)


def torch_cuda_ok(device: str) -> bool:
    if device != "cuda":
        return True
    import torch
    return torch.cuda.is_available()


def param_space(spec: SweepSpec, points):
    from ray import tune
    if points is not None:
        return {"point": tune.grid_search(points)}
    return {}


def tune_config(spec: SweepSpec, modes, concurrent: int, exp_dir: Path):
    from ray import tune
    if spec.search == "grid":
        from ray.tune.search import BasicVariantGenerator
        return tune.TuneConfig(search_alg=BasicVariantGenerator(random_state=0), num_samples=1,
                               max_concurrent_trials=concurrent, reuse_actors=True)
    import functools

    import optuna
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = spec.seeds[0]
    # NSGA-II samples its whole first generation at random: keep generations small enough that a short sweep
    # gets to evolve (8 trials → 2 generations of 4).
    population = max(4, min(50, spec.num_samples // 2))
    sampler = (optuna.samplers.NSGAIISampler(population_size=population, seed=seed) if spec.sampler == "nsga2"
               else optuna.samplers.TPESampler(seed=seed))
    exp_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{exp_dir / 'optuna.db'}")
    metric = spec.objectives if len(spec.objectives) > 1 else spec.objectives[0]
    mode = modes if len(modes) > 1 else modes[0]
    # Every method gets at least one trial: its label is enqueued, its parameters are still sampled.
    first = [{"arm": a.label} for a in spec.arms][:spec.num_samples]
    search = OptunaSearch(space=functools.partial(define_by_run, spec=spec), metric=metric, mode=mode,
                          sampler=sampler, storage=storage, study_name=exp_dir.name, points_to_evaluate=first)
    scheduler = None
    if spec.early_stop:
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(metric=metric, mode=mode, grace_period=1)
    # reuse_actors: a fresh actor pays ~10 s of imports (torch, Ray, MLflow's schema check) per trial.
    return tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=spec.num_samples,
                           max_concurrent_trials=concurrent, reuse_actors=True)


def summarize(results, spec, opts, exp_dir, experiment, wall, t_pretrain, concurrent):
    """Counts, the overhead outside run_trial, and where to look."""
    rows = [r for r in results]
    n_err = sum(r.error is not None for r in rows)
    metrics = [r.metrics or {} for r in rows if r.error is None and (r.metrics or {}).get("final")]
    statuses = [m.get("status", "?") for m in metrics]
    busy = sum(m.get("run_trial_s", 0.0) - m.get("report_s", 0.0) for m in metrics)
    slots = max((wall - t_pretrain) * concurrent, 1e-9)
    print(f"\n{len(rows)} trials: {statuses.count('ok')} ok, {statuses.count('diverged')} diverged, {n_err} failed, "
          f"{len(rows) - n_err - len(metrics)} unfinished "
          f"in {wall:.0f}s (pretraining {t_pretrain:.0f}s). Time in run_trial (less its report callbacks): {busy:.0f}s "
          f"of {slots:.0f}s trial-slot time → {100 * (1 - busy / slots):.1f}% outside (Ray + MLflow + idle slots).")
    print(f"Ray Tune results: {exp_dir}")
    if spec.search == "optuna":
        print(f"Optuna study: sqlite:///{exp_dir / 'optuna.db'} (study {exp_dir.name})")
    print(f"MLflow: experiment {experiment!r} in {opts.tracking_uri}")
    if opts.tracking_uri.startswith("sqlite:"):
        print(f"  open it: mlflow ui --backend-store-uri {opts.tracking_uri}   (then http://127.0.0.1:5000)")
    print(f"  report:  python -m analysis.report --experiment {experiment} --tracking-uri {opts.tracking_uri}")


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profit_bench.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Spec overrides: --set budget.epochs=1 --set seeds=[0] "
                                       "--set 'methods.profit.n_ref={int: [1, 2]}'. A small CPU run of any table: "
                                       "--set budget.epochs=1 --set trial.limit=2000 --set seeds=[0].")
    p.add_argument("name", help="a sweep in sweeps/ (toy, digits, fmnist, cifar, table1, table2, table8_nref, "
                                "table9_ratio, table12_ratio) or a path to a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="edit the spec: dotted key, YAML value (repeatable)")
    p.add_argument("--num-samples", type=int, help="Optuna trials (grid: repeats of the grid)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: spec, else CPUs / cpus-per-trial)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (0.25 = 4 per GPU); "
                                                         "default: the cluster's GPUs shared by concurrent trials")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (= torch threads); default CPUs / concurrent")
    p.add_argument("--address", help="join a running Ray cluster: auto or ray://host:port (default: start a local one)")
    p.add_argument("--storage-path", default="ray_results", help="Ray Tune results folder (default ./ray_results)")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default "
                                                                         "sqlite:///mlflow.db in this folder)")
    p.add_argument("--experiment", help="MLflow experiment and Ray run name (default: the spec's name)")
    p.add_argument("--data-dir", help="dataset folder (CIFAR / Fashion-MNIST)")
    p.add_argument("--cache-dir", help="pretrained-model cache (default $PROFIT_BENCH_CACHE or ~/.cache/profit_bench)")
    p.add_argument("--seed", type=int, help="run every trial with this seed (replaces the spec's seeds) and seed "
                                            "the sampler with it")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted sweep of this name")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan; run and write nothing")
    p.add_argument("--verbose", type=int, default=1, help="Ray Tune verbosity 0-3 (default 1: trial table)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    opts = Options(**{f.name: getattr(args, f.name) for f in fields(Options)
                      if getattr(args, f.name, None) is not None})
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter: a compact trial table, no result dumps
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        run_sweep(args.name, opts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; continue with: python -m profit_bench.sweep {args.name} --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
