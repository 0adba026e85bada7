"""The sweep YAML: schema, validation, `--set` overrides, trial dicts. No Ray import here; the points a sweep runs
are made by plan.py.

Schema (every key but `task`, `budget`, `methods` optional):

    name: toy                       # MLflow experiment / Ray run name (default: the file name)
    table: 1                        # the paper table this sweep feeds (read by analysis/); omit for none
    task: toy                       # a profit_bench.tasks name
    task_if_data_dir: cifar         # used instead of `task` when --data-dir is given
    models: [mlp]                   # backbones (default: the task's); a grid axis, or searched by Optuna
    seeds: [0]                      # search seeds; a grid axis, or searched by Optuna
    search: optuna                  # optuna | grid
    sampler: nsga2                  # optuna only: nsga2 | tpe
    num_samples: 8                  # optuna: trials PER ARM (equal budgets); grid: repeats of every arm's grid
    trials_per_dim: 4               # optuna, instead of num_samples: each arm gets 4 × its searched dimensions
    max_concurrent: 2
    objectives: [old_val, new_val]  # validation only; directions come from the task (mse ↓, accuracy ↑)
    confirm_seeds: 5                # fresh seeds for the confirmation stage (0: no confirmation)
    early_stop: false               # ASHA; only with one objective
    budget: {steps: 1500}           # the fixed per-trial budget: steps or epochs (epochs: the cap of arms' own)
    trial: {eval_every: 100}        # TrialConfig values for every trial
    methods:                        # label (= arm) → TrialConfig values; {loguniform|uniform|int|logint|choice: ..}
      profit: {lr: {loguniform: [1e-5, 1e-2]}, ratio: {loguniform: [10, 10000]}, n_ref: {int: [1, 5]}}
      adam+profit: {method: full, optimizer: adam, profit: true, lr: 1e-4}   # grid: {grid: [...]}
      vit: {method: profit, models: [vit_tiny], lr: 1e-4}   # an arm's own backbones
      ewc: {lr: 1e-3, ewc_lambda: {loguniform: [1e2, 1e5]}}  # a method's own knobs (method_args) sit beside them
      adam: {lr: 1e-4, epochs: {int: [5, 20]}}   # an arm's own epochs (fixed or searched), ≤ budget.epochs

Every field is checked for type and range before anything runs (`--dry-run` included): a searched value's
bounds and every grid value go through the same per-field check as a fixed value.
"""
from __future__ import annotations

import copy
import functools
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from profit_bench import UserError

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
CHOICES = ("best-old", "best-new", "knee")  # protocol.confirm_choices' names
OBJECTIVES = ("old_val", "new_val", "forgetting_val", "old_val_loss", "new_val_loss")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice", "grid")
# TrialConfig fields the sweep owns: set from the spec's top level, the CLI or the budget, never per method.
SWEEP_OWNED = {"task", "model", "seed", "device", "data_dir", "cache_dir", "steps", "epochs", "pretrain_if_missing"}
# ... except an arm's own `epochs` (fixed or searched, ≤ the sweep's `budget: {epochs: cap}`): the paper tunes
# the epoch count per method (Table 10); the budget stays the cap, and the headline can keep it for every arm.
ARM_BUDGET = {"epochs"}
NOT_SEARCHABLE = (SWEEP_OWNED - ARM_BUDGET) | {"pretrain_steps", "pretrain_epochs", "pretrain_lr", "pretrain_scheduler", "limit",
                                "dtype", "method", "method_args"}
# Knobs that change the pretrained model: a grid sweep pretrains every grid point's checkpoint up front, an Optuna
# search (whose points appear while it runs) cannot, so they are searched by grids only.
GRID_ONLY = {"toy_variant", "activation", "layernorm", "pretrain_batch_size"}
# PROFIT-only TrialConfig fields: logged and shown only for runs that train through PROFIT.
PROFIT_FIELDS = ("ratio", "n_ref", "profit_memory", "profit_delta", "ref_optimizer", "ref_kwargs")
LOOKAHEAD_FIELDS = ("lookahead_alpha", "lookahead_k", "lookahead_base")


# ---------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; read it as the number everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


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
    table: str             # the paper table this sweep feeds, "" for none
    task: str
    models: list           # [None] = the task's default model
    seeds: list[int]
    search: str            # "optuna" | "grid"
    sampler: str           # "nsga2" | "tpe"
    num_samples: int       # optuna: per arm
    max_concurrent: int | None
    objectives: list[str]
    confirm_seeds: int
    early_stop: bool
    budget: dict           # {"steps": n} or {"epochs": n}
    trial: dict            # TrialConfig values shared by every trial
    arms: list[Arm]
    raw: dict = field(repr=False, default_factory=dict)  # the validated YAML
    confirm_choices: tuple = CHOICES   # which of each arm's validation choices the confirmation re-runs
    trials_per_dim: int | None = None  # optuna: every arm gets this × arm_dims(arm) trials instead of num_samples
    ablate: dict | None = None         # {arm, n_ref: [...], ratio: [...], seeds: n}: the ablation stage, or None

    def resolved(self) -> dict:
        """The spec as run (CLI overrides applied), for the MLflow parent run."""
        return {**self.raw, "name": self.name, "seeds": self.seeds, "num_samples": self.num_samples,
                "confirm_seeds": self.confirm_seeds, "objectives": self.objectives,
                "trials_per_dim": self.trials_per_dim}

    def arm_trials(self, arm: "Arm") -> int:
        """Search trials of one Optuna arm: `num_samples` (equal trials per arm, the headline: the tuning cost of
        a method's extra knobs is part of the method), or `trials_per_dim` × its searched dimensions (equal
        budget per dimension)."""
        return self.num_samples if self.trials_per_dim is None else self.trials_per_dim * arm_dims(self, arm)


class _Ablate(BaseModel):
    """Tables 8/9 around the confirmed knee of one PROFIT arm: one knob varied at a time, on confirmation seeds."""
    model_config = ConfigDict(extra="forbid", strict=True)
    arm: str = "profit"
    n_ref: list[typing.Annotated[int, Field(ge=1)]] = [1, 2, 5]
    ratio: list[typing.Annotated[float, Field(gt=0)] | typing.Annotated[int, Field(gt=0)]] = [10, 100, 1000, 10000]
    seeds: int | None = Field(default=None, ge=1)  # the first N confirmation seeds (default: all of them)


class _Top(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str | None = None
    description: str | None = None
    table: int | str | None = None
    task: str
    task_if_data_dir: str | None = None
    models: list[str | None] = Field(default=[None], min_length=1)
    seeds: list[typing.Annotated[int, Field(ge=0)]] = Field(default=[0], min_length=1)
    search: Literal["optuna", "grid"] = "optuna"
    sampler: Literal["nsga2", "tpe"] = "nsga2"
    num_samples: int | None = Field(default=None, ge=1)
    trials_per_dim: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)
    objectives: list[Literal[OBJECTIVES]] = Field(default=["old_val", "new_val"], min_length=1, max_length=2)
    confirm_seeds: int = Field(default=5, ge=0)
    confirm_choices: list[Literal[CHOICES]] = Field(default=list(CHOICES), min_length=1)
    ablate: _Ablate | None = None
    early_stop: bool = False
    budget: dict[Literal["steps", "epochs"], typing.Annotated[int, Field(ge=1)]] = Field(min_length=1,
                                                                                         max_length=1)
    trial: dict[str, Any] | None = None
    methods: dict[str, dict[str, Any] | None] = Field(min_length=1)


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "literal[")))
    return f"{loc}: {err['msg']} (got {err.get('input')!r})" if loc else f"{err['msg']} (got {err.get('input')!r})"


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
    """`--set a.b=VALUE`: VALUE is parsed as YAML (`1`, `[0, 1]`, `{loguniform: [1e-4, 1e-2]}`).
    `--set budget.X=N` replaces the whole budget, so `budget.epochs=1` works on a sweep budgeted in steps."""
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set budget.epochs=1")
        try:
            value = yaml_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: value is not valid YAML ({e.problem})") from None
        parts = key.split(".")
        if parts[0] == "budget" and len(parts) == 2:
            raw["budget"] = {parts[1]: value}
            fit_epochs_to_cap(raw)
            continue
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise UserError(f"--set {item!r}: {p!r} is not a mapping in the spec")
            node = node[p]
        node[parts[-1]] = value
    return raw


def load_spec(name: str, overrides: list[str] | None = None, data_dir=None) -> SweepSpec:
    """Read, override and validate a sweep YAML (schema in the module docstring)."""
    path, raw = read_yaml(name)
    if "workloads" in raw:
        raise UserError(f"{path} is a suite (workloads: ...), not one sweep; run it with python -m "
                        f"profit_bench.sweep {name}")
    raw = apply_overrides(raw, overrides)
    if data_dir is not None and raw.get("task_if_data_dir"):
        raw["task"] = raw["task_if_data_dir"]
    return validate_spec(raw, default_name=path.stem, where=str(path))


# ---------------------------------------------------------------------------------------------- suites
@dataclass
class Suite:
    """Several sweeps (workloads) run by one command in one Ray session; workload W is experiment NAME_W."""
    name: str
    description: str
    workloads: dict[str, SweepSpec]


def read_yaml(name: str) -> tuple[Path, dict]:
    path = find_spec_file(name)
    try:
        raw = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the sweep spec must be a mapping with keys task, budget, methods, ...")
    return path, raw


def is_suite(name: str) -> bool:
    return "workloads" in read_yaml(name)[1]


def load_suite(name: str, overrides: list[str] | None = None, data_dir=None, only: list[str] | None = None) -> Suite:
    """A suite YAML: `suite:` (name), `description:`, `workloads: {label: <sweep spec>}` (YAML anchors and `<<:`
    merge keys share arms between workloads). `--set workloads.W.KEY=V` edits one workload, any other `--set`
    every workload. Top-level `x-*` keys only hold YAML anchors. `only` keeps those workloads, in the suite's order."""
    path, raw = read_yaml(name)
    extra = {k for k in raw if not str(k).startswith("x-")} - {"suite", "description", "workloads"}
    if extra:
        raise UserError(f"{path}: unknown suite keys {sorted(extra)}; valid: description, suite, workloads, and "
                        f"x-* (blocks for YAML anchors)")
    mine = [o for o in overrides or [] if o.startswith("workloads.")]
    raw = apply_overrides(raw, mine)
    if not isinstance(raw.get("workloads"), dict) or not raw["workloads"]:
        raise UserError(f"{path}: workloads must be a non-empty mapping of label → sweep spec")
    suite = str(raw.get("suite") or path.stem)
    labels = list(raw["workloads"])
    unknown = [w for w in only or [] if w not in labels]
    if unknown:
        raise UserError(f"unknown workload(s) {', '.join(unknown)} in suite {suite}; it has {', '.join(labels)}")
    rest = [o for o in overrides or [] if not o.startswith("workloads.")]
    specs = {}
    for label in [w for w in labels if not only or w in only]:
        w = raw["workloads"][label]
        if not isinstance(w, dict):
            raise UserError(f"{path}: workloads.{label} must be a sweep spec mapping")
        w = apply_overrides({k: v for k, v in w.items() if k != "name"}, rest)
        if data_dir is not None and w.get("task_if_data_dir"):
            w["task"] = w["task_if_data_dir"]
        specs[label] = validate_spec(w, default_name=f"{suite}_{label}", where=f"{path}: workloads.{label}")
    return Suite(suite, str(raw.get("description") or ""), specs)


# ---------------------------------------------------------------------------------------------- field checks
@functools.lru_cache(maxsize=1)
def _trial_hints() -> dict:
    from profit_bench.trial import TrialConfig
    hints = typing.get_type_hints(TrialConfig)
    return {f.name: hints[f.name] for f in fields(TrialConfig)}


def check_field(where: str, key: str, value, hints: dict):
    """Type (strict: 1.5 is not an int, "abc" not a number), range and choices of one TrialConfig value (or a
    method knob, typed by its default): the trial's own per-field check, so a spec and a trial agree."""
    from profit_bench.trial import check_value
    try:
        check_value(key, value, hints[key])
    except UserError as e:
        msg = str(e).removeprefix(f"{key} ")  # "limit must be >= 1" reads "spec: trial.limit: must be >= 1"
        raise UserError(f"{where}.{key}: {msg}") from None


def _dist_values(where: str, key: str, value, search: str) -> list | None:
    """The values to check of a distribution ({kind: args}), None when `value` is not one."""
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS):
        return None
    kind, args = next(iter(value.items()))
    if key in NOT_SEARCHABLE:
        raise UserError(f"{where}.{key} cannot be searched; fix it in `trial:` / `budget:` instead")
    if key in GRID_ONLY and kind != "grid":
        raise UserError(f"{where}.{key} changes the pretrained model: vary it with `{{grid: [...]}}` in a grid "
                        f"sweep (search: grid), not by {kind}")
    if kind == "grid" and search != "grid":
        raise UserError(f"{where}.{key}: `grid` values need `search: grid` (this sweep uses {search})")
    if kind != "grid" and search == "grid":
        raise UserError(f"{where}.{key}: a grid sweep takes `{{grid: [...]}}` lists, not {kind}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise UserError(f"{where}.{key}: `{kind}` needs a non-empty list")
        return args
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
            and args[0] <= args[1]):
        raise UserError(f"{where}.{key}: `{kind}` needs [low, high] finite numbers with low <= high, got {args!r}")
    if kind in ("loguniform", "logint") and args[0] <= 0:
        raise UserError(f"{where}.{key}: `{kind}` needs low > 0")
    if kind in ("int", "logint"):
        if not all(float(a).is_integer() for a in args):
            raise UserError(f"{where}.{key}: `{kind}` needs integer bounds")
        return [int(a) for a in args]
    return [float(a) for a in args]


def validate_spec(raw: dict, default_name: str = "sweep", where: str = "spec") -> SweepSpec:
    from profit_bench.methods import get_method
    from profit_bench.tasks import TASKS

    fit_warmup_to_budget(raw)
    try:
        top = _Top.model_validate(raw)
    except ValidationError as e:
        if any(err["type"] == "extra_forbidden" for err in e.errors()):
            unknown = sorted(set(raw) - set(_Top.model_fields))
            raise UserError(f"{where}: unknown keys {unknown}; valid: {sorted(_Top.model_fields)}") from None
        raise UserError(f"{where}: {_one_line(e)}") from None
    if top.task not in TASKS:
        raise UserError(f"{where}: unknown task {top.task!r}; valid tasks: {', '.join(TASKS)}")
    if top.early_stop and (len(top.objectives) != 1 or top.search != "optuna"):
        raise UserError(f"{where}: early_stop needs a single objective and search: optuna (Pareto points need a "
                        f"fixed budget)")
    if top.trials_per_dim is not None and (top.search != "optuna" or top.num_samples is not None):
        raise UserError(f"{where}: trials_per_dim replaces num_samples in an optuna search; give one of them")
    hints = _trial_hints()
    owned = set(hints) & SWEEP_OWNED
    trial = top.trial or {}
    bad = set(trial) - (set(hints) - owned)
    if bad:
        raise UserError(f"{where}: trial: unknown or sweep-owned keys {sorted(bad)} (task/models/seeds/budget "
                        f"go at the top level)")
    for k, v in trial.items():
        check_field(f"{where}: trial", k, v, hints)
    arms = [_arm(where, str(label), entry, top, hints, owned, get_method) for label, entry in top.methods.items()]
    num_samples = top.num_samples if top.num_samples is not None else (1 if top.search == "grid" else 8)
    table = "" if top.table is None else str(top.table)
    spec = SweepSpec(name=str(top.name or default_name), table=table, task=top.task, models=list(top.models),
                     seeds=list(top.seeds), search=top.search, sampler=top.sampler, num_samples=num_samples,
                     max_concurrent=top.max_concurrent, objectives=list(top.objectives),
                     confirm_seeds=top.confirm_seeds, early_stop=top.early_stop, budget=dict(top.budget),
                     trial=dict(trial), arms=arms, raw=raw, confirm_choices=tuple(top.confirm_choices),
                     ablate=top.ablate.model_dump() if top.ablate else None, trials_per_dim=top.trials_per_dim)
    if top.ablate:
        check_ablation(spec, where)
    for d in corner_configs(spec):  # the trial code's own cross-field checks (optimizer, warmup ≤ epochs, ...)
        try:
            resolved_config(d)
        except (UserError, TypeError) as e:
            raise UserError(f"{where}: methods.{d['_arm']}: {e}") from None
    return spec


def fit_warmup_to_budget(raw: dict) -> None:
    """A searched `warmup_epochs: {int: [lo, hi]}` under a smaller epochs budget (`--set budget.epochs=1`, the
    README's small CPU version) searches [min(lo, E), E] instead: warm-up cannot outlast the budget, and one
    `--set budget.epochs` must work on every sweep. A fixed warm-up above the budget is still an error."""
    budget, methods = raw.get("budget"), raw.get("methods")
    epochs = budget.get("epochs") if isinstance(budget, dict) else None
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1 or not isinstance(methods, dict):
        return
    for entry in methods.values():
        if not isinstance(entry, dict):
            continue
        dist = entry.get("warmup_epochs")
        if isinstance(dist, dict) and list(dist) == ["int"] and isinstance(dist["int"], list) \
                and len(dist["int"]) == 2 and isinstance(dist["int"][1], (int, float)) and dist["int"][1] > epochs:
            entry["warmup_epochs"] = {"int": [min(dist["int"][0], epochs), epochs]}


def fit_epochs_to_cap(raw: dict) -> None:
    """`--set budget.epochs=E` (the README's small CPU version) lowers every arm's own epochs to at most E, so one
    override works on every sweep; in the YAML itself an arm's epochs above the cap is an error (`_arm_epochs`)."""
    cap = (raw.get("budget") or {}).get("epochs") if isinstance(raw.get("budget"), dict) else None
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1 or not isinstance(raw.get("methods"), dict):
        return
    for entry in raw["methods"].values():
        v = entry.get("epochs") if isinstance(entry, dict) else None
        if isinstance(v, int) and not isinstance(v, bool):
            entry["epochs"] = min(v, cap)
        elif isinstance(v, dict) and len(v) == 1 and isinstance(next(iter(v.values())), list):
            kind, args = next(iter(v.items()))
            args = [min(a, cap) if isinstance(a, int) and not isinstance(a, bool) else a for a in args]
            entry["epochs"] = args[0] if kind in ("int", "logint") and len(set(args)) == 1 else {kind: args}


def _arm_epochs(where: str, arm: "Arm", budget: dict) -> None:
    """An arm's own epochs: only under an epochs budget, never above it (the cap), never below its warm-up."""
    if "epochs" not in arm.fixed and "epochs" not in arm.space:
        return
    cap = budget.get("epochs")
    dist = arm.space.get("epochs")
    values = [arm.fixed["epochs"]] if dist is None else [int(v) for v in next(iter(dist.values()))]
    if cap is None:
        raise UserError(f"{where}.epochs: an arm's own epochs needs an epochs budget (budget: {{epochs: cap}}); "
                        f"this sweep is budgeted in {', '.join(budget)}")
    if max(values) > cap:
        raise UserError(f"{where}.epochs: {max(values)} is above the sweep's cap budget.epochs = {cap}")
    warm = arm.space.get("warmup_epochs")
    warm_max = max(next(iter(warm.values()))) if warm else arm.fixed.get("warmup_epochs", 0)
    if warm_max > min(values):
        raise UserError(f"{where}: warmup_epochs (up to {warm_max}) can exceed the arm's epochs (from "
                        f"{min(values)}); keep warm-up below the smallest epoch count")


def check_ablation(spec: SweepSpec, where: str) -> None:
    ab = spec.ablate
    arm = next((a for a in spec.arms if a.label == ab["arm"]), None)
    if arm is None:
        raise UserError(f"{where}: ablate.arm {ab['arm']!r} is not one of the methods "
                        f"({', '.join(a.label for a in spec.arms)})")
    if spec.confirm_seeds == 0 or "knee" not in spec.confirm_choices:
        raise UserError(f"{where}: ablate needs the confirmation stage with its knee (confirm_seeds > 0, "
                        f"confirm_choices including knee): it varies the confirmed knee's n_ref and ratio")
    d = next(d for d in corner_configs(spec) if d["_arm"] == arm.label)
    if not resolved_config(d).profit:
        raise UserError(f"{where}: ablate.arm {arm.label!r} does not train through PROFIT; n_ref and ratio "
                        f"mean nothing")
    if "warmup_epochs" in arm.space or any(d.get("warmup_epochs") for d in corner_configs(spec)
                                           if d["_arm"] == arm.label):
        raise UserError(f"{where}: ablate.arm {arm.label!r} has AdamW warm-up epochs; Tables 8/9 vary PROFIT's "
                        f"knobs around a configuration without warm-up (warmup_epochs: 0)")


def _arm(where, label, entry, top: _Top, hints, owned, get_method) -> Arm:
    entry = dict(entry or {})
    entry.setdefault("method", label)
    arm_models = entry.pop("models", top.models)
    if not isinstance(arm_models, list) or not arm_models:
        raise UserError(f"{where}: methods.{label}.models must be a non-empty list")
    for m in arm_models:
        try:
            knobs = get_method(entry["method"], m).args
        except UserError as e:
            raise UserError(f"{where}: methods.{label}: {e}") from None
    # The method's own knobs (ewc_lambda, lora_r, ...) sit beside the TrialConfig fields and can be searched;
    # trial_dict folds them into method_args. Their type is their default's.
    hints = {**hints, **{k: type(v) for k, v in knobs.items()}}
    valid = (set(hints) - owned) | ARM_BUDGET
    bad = set(entry) - valid
    if bad:
        raise UserError(f"{where}: methods.{label}: unknown keys {sorted(bad)}; valid: {sorted(valid)}")
    space = {}
    for k, v in entry.items():
        values = _dist_values(f"{where}: methods.{label}", k, v, top.search)
        for x in values if values is not None else [v]:
            check_field(f"{where}: methods.{label}", k, x, hints)
        if values is not None:
            space[k] = v
    fixed = {k: v for k, v in entry.items() if k not in space}
    arm = Arm(label, fixed, space, arm_models)
    _arm_epochs(f"{where}: methods.{label}", arm, dict(top.budget))
    return arm


# ---------------------------------------------------------------------------------------------- trial dicts
def trial_dict(spec: SweepSpec, point: dict, *, data_dir=None, cache_dir=None, device="cpu") -> dict:
    """The TrialConfig kwargs of one point {arm, model, seed, params}."""
    arm = next(a for a in spec.arms if a.label == point["arm"])
    d = {**spec.trial, **spec.budget, **arm.fixed, **point.get("params", {}),  # an arm's own epochs ≤ the cap
         "task": spec.task, "model": point["model"], "seed": point["seed"], "device": device,
         "data_dir": data_dir, "cache_dir": cache_dir}
    trial_fields = _trial_hints()
    knobs = {k: d.pop(k) for k in list(d) if k not in trial_fields and not k.startswith("_")}
    if knobs:
        d["method_args"] = {**d.get("method_args", {}), **knobs}
    return d


def resolved_config(d: dict):
    """The TrialConfig a trial dict runs with; `profit` says whether it trains through PROFIT (trial.resolve sets
    it where the method forces it), as the trial's own result does."""
    from profit_bench.trial import TrialConfig, resolve
    return resolve(TrialConfig(**{k: v for k, v in d.items() if not k.startswith("_")}))


def corner_configs(spec: SweepSpec):
    """Trial dicts at the low and high corner of every arm's space (grid: first and last value), for validation."""
    for arm in spec.arms:
        for corner in (0, -1):
            params = {}
            for k, dist in arm.space.items():
                kind, args = next(iter(dist.items()))
                params[k] = int(args[corner]) if kind in ("int", "logint") else args[corner]
            for m in arm.models:
                yield {**trial_dict(spec, {"arm": arm.label, "model": m, "seed": spec.seeds[0], "params": params}),
                       "_arm": arm.label, "_params": params}


def arm_dims(spec: SweepSpec, arm: Arm) -> int:
    """Searched dimensions of an Optuna arm: its searched fields, plus model / seed when it draws them (at least
    1, so a fixed arm still runs)."""
    return max(1, len(arm.space) + (len(arm.models) > 1) + (len(spec.seeds) > 1))


def applicable_params(cfg_dict: dict) -> dict:
    """The TrialConfig fields that apply to this run (no PROFIT knobs on a non-PROFIT run, ...)."""
    out = {k: v for k, v in cfg_dict.items() if k not in ("data_dir", "cache_dir", "pretrain_if_missing")}
    if not cfg_dict.get("profit"):
        for k in PROFIT_FIELDS:
            out.pop(k, None)
    if cfg_dict.get("optimizer") != "lookahead":
        for k in LOOKAHEAD_FIELDS:
            out.pop(k, None)
    return out
