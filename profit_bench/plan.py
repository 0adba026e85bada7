"""What a sweep runs, without Ray: the points of every stage, how many trials, which checkpoints, how long.

    spec (spec.py) ─► Plan(spec, device, data_dir, cache_dir) ─► Points ─► sweep.py runs them on Ray Tune

A `Point` is one trial: its labels (arm, model, seed, params, stage, choice, ...) and its `TrialConfig`, resolved
once, when the point is made (`Plan.point`). Everything downstream — the worker, the MLflow callback, the
console, the pretraining keys — reads `point.config`. Ray Tune and Optuna carry a point as a plain dict
(`Point.to_tune`); `Plan.from_tune` turns it back: those two are the only crossing.

Stages: search (a grid's points, or each arm's Optuna study of `spec.arm_trials(arm)` trials starting from
scrambled-Sobol points), confirmation (protocol.confirm_choices of the search, on fresh seeds) and ablation
(Tables 8/9: one PROFIT knob at a time around the confirmed knee).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field

from profit_bench.spec import Arm, SweepSpec, corner_configs, resolved_config, trial_dict


# ---------------------------------------------------------------------------------------------- the point
@dataclass(frozen=True)
class Point:
    """One trial of a plan. `config` is the TrialConfig it runs (trial.resolve'd, sweep-wide fields included)."""
    arm: str
    model: str | None          # as the spec names it (None = the task's default); config.model is the resolved one
    seed: int
    params: dict = field(hash=False)   # the arm's searched / varied values of this point
    config: object = field(hash=False, repr=False)  # trial.TrialConfig
    stage: str = "search"      # search | confirm | ablation
    choice: str | None = None  # confirm: "best-old", "knee,best-new", ...; ablation: "ablation"
    ablation_knob: str | None = None   # "n_ref" | "ratio"
    search_index: int | None = None    # Optuna: the trial's place in its arm's study (1, 2, ...)

    @property
    def config_key(self) -> str:
        return config_key(self.arm, self.model, self.params)

    def to_tune(self) -> dict:
        """The plain dict Ray Tune's config carries (and Ray's params.json shows): labels only."""
        d = {"arm": self.arm, "model": self.model, "seed": self.seed, "params": self.params, "stage": self.stage}
        if self.choice is not None:
            d["choice"] = self.choice
        if self.ablation_knob is not None:
            d["ablation_knob"] = self.ablation_knob
        d["config_key"] = self.config_key
        if self.search_index is not None:
            d["search_index"] = self.search_index
        return d


def config_key(arm: str, model, params: dict) -> str:
    """Hash of a hyperparameter point without its seed: search and confirmation runs of one config share it."""
    blob = json.dumps({"arm": arm, "model": model, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Plan:
    """A spec and where its trials run (device, data and cache folders): makes the Points of every stage."""

    def __init__(self, spec: SweepSpec, *, device: str = "cpu", data_dir: str | None = None,
                 cache_dir: str | None = None):
        self.spec, self.device, self.data_dir, self.cache_dir = spec, device, data_dir, cache_dir
        self._known: dict[str, Point] = {}  # to_tune JSON → Point: a dict coming back from Tune is not resolved twice

    def point(self, arm: str, model, seed: int, params: dict, stage: str = "search", **labels) -> Point:
        """Resolve one point's TrialConfig (spec's trial block, the arm's fixed values, the point's params, the
        budget; a sweep's trial never pretrains: the driver's pretraining tasks fill the cache)."""
        d = trial_dict(self.spec, {"arm": arm, "model": model, "seed": seed, "params": params},
                       data_dir=self.data_dir, cache_dir=self.cache_dir, device=self.device)
        cfg = resolved_config({**d, "pretrain_if_missing": False})
        return Point(arm, model, seed, dict(params), cfg, stage, **labels)

    def from_tune(self, d: dict) -> Point:
        """The Point behind a Tune config's plain dict (Point.to_tune)."""
        key = json.dumps(d, sort_keys=True, default=str)
        p = self._known.get(key)
        if p is None:
            labels = {k: d[k] for k in ("choice", "ablation_knob", "search_index") if d.get(k) is not None}
            p = self._known[key] = self.point(d["arm"], d["model"], d["seed"], d.get("params", {}),
                                              d.get("stage", "search"), **labels)
        return p

    def with_seed(self, p: Point, seed: int) -> Point:
        return self.point(p.arm, p.model, seed, p.params, p.stage, choice=p.choice, ablation_knob=p.ablation_knob,
                          search_index=p.search_index)

    # -- stages
    def search_points(self) -> list[Point] | None:
        """A grid sweep's search points (every arm its whole grid, `num_samples` times); None for Optuna (its
        points come from the studies, `optuna_point`)."""
        spec = self.spec
        if spec.search != "grid":
            return None
        points = []
        for arm in spec.arms:
            keys = list(arm.space)
            values = [next(iter(arm.space[k].values())) for k in keys]
            for model, combo, seed in itertools.product(arm.models, itertools.product(*values), spec.seeds):
                points.append(self.point(arm.label, model, seed, dict(zip(keys, combo))))
        return points * spec.num_samples

    def optuna_point(self, arm: Arm, params: dict, search_index: int) -> Point:
        """The Point of an Optuna suggestion (`suggest`'s names: model and seed drawn only when there is a choice)."""
        params = dict(params)
        model = params.pop("model", arm.models[0])
        seed = params.pop("seed", self.spec.seeds[0])
        return self.point(arm.label, model, seed, params, search_index=search_index)

    def corner_points(self) -> list[Point]:
        """Each arm's low and high corner (grid: first and last value) on each of its models, first search seed."""
        return [self.point(d["_arm"], d["model"], d["seed"], d["_params"]) for d in corner_configs(self.spec)]

    def stage_points(self, points: list[Point] | None, seeds=None) -> list[Point]:
        """Points covering every checkpoint a stage loads: `points` (each at every seed of `seeds`, when given), or
        for Optuna each arm's corners × `seeds` (default: the search seeds)."""
        if points is not None:
            return [self.with_seed(p, s) for p in points for s in seeds] if seeds else list(points)
        return [self.with_seed(p, s) for p in self.corner_points() for s in (seeds or self.spec.seeds)]

    def confirm_points(self, df, higher_is_better: bool) -> list[Point]:
        """Per arm, the validation choices the spec confirms, each on `confirm_seeds` fresh seeds."""
        from profit_bench import protocol
        spec = self.spec
        if df.empty or spec.confirm_seeds == 0:
            return []
        seeds = protocol.fresh_seeds(spec.seeds, spec.confirm_seeds)
        return [self.point(row["arm"], row["model"], s, row["params"], stage="confirm", choice=row["choice"])
                for _, row in confirm_rows(df, spec, higher_is_better).iterrows() for s in seeds]

    def ablation_points(self, df, higher_is_better: bool) -> list[Point]:
        """Tables 8/9 around the ablated arm's confirmed knee: its n_ref over `ablate.n_ref` (ratio kept), then its
        ratio over `ablate.ratio` (n_ref kept), on the first `ablate.seeds` confirmation seeds. The knee itself is
        not re-run: its confirmation runs are the centre of both ablations."""
        from profit_bench import protocol
        spec, ab = self.spec, self.spec.ablate
        if ab is None or df.empty or spec.confirm_seeds == 0:
            return []
        rows = confirm_rows(df, spec, higher_is_better)
        if rows.empty:  # every trial of every arm diverged
            return []
        seeds = protocol.fresh_seeds(spec.seeds, spec.confirm_seeds)[:ab["seeds"] or spec.confirm_seeds]
        points = []
        knees = rows[(rows["arm"] == ab["arm"]) & rows["choice"].astype(str).str.contains("knee")]
        for _, row in knees.iterrows():
            knee = self.point(row["arm"], row["model"], seeds[0], row["params"]).config
            for knob, values, current in (("n_ref", ab["n_ref"], knee.n_ref), ("ratio", ab["ratio"], knee.ratio)):
                for v in values:
                    if float(v) == float(current):
                        continue
                    params = {**row["params"], knob: int(v) if knob == "n_ref" else float(v)}
                    points += [self.point(row["arm"], row["model"], s, params, stage="ablation", choice="ablation",
                                          ablation_knob=knob) for s in seeds]
        return points

    # -- pretraining
    def pretrain_keys(self, points: list[Point]) -> dict:
        """One Point per distinct pretrained checkpoint among `points`: key (task, model, seed, PretrainConfig,
        the sorted (statistic, n) old-task statistics its points' methods declared, () for none)."""
        from profit_bench.pretrain import old_stat_request_for, pretrain_config_for
        first, stats = {}, {}
        for p in points:
            cfg = p.config
            ckpt = (cfg.task, cfg.model, cfg.seed, pretrain_config_for(cfg))
            first.setdefault(ckpt, p)
            stats.setdefault(ckpt, set()).update(filter(None, [old_stat_request_for(cfg)]))
        # One task per checkpoint, building every statistic its trials need (EWC's Fisher, MAS's importance), so
        # two tasks never race to pretrain the same checkpoint.
        return {(*ckpt, tuple(sorted(stats[ckpt]))): p for ckpt, p in first.items()}


def confirm_rows(df, spec: SweepSpec, higher_is_better: bool):
    """Per arm, the validation choices (protocol.confirm_choices) the spec confirms (`confirm_choices`)."""
    from profit_bench import protocol
    chosen = protocol.confirm_choices(df, higher_is_better)
    wanted = set(spec.confirm_choices)
    return chosen[[bool(wanted & set(c.split(","))) for c in chosen["choice"]]] if len(chosen) else chosen


# ---------------------------------------------------------------------------------------------- counts
def search_total(spec: SweepSpec, points: list | None) -> int:
    """Search trials: the grid's points, or each arm's Optuna budget (spec.arm_trials)."""
    return len(points) if points is not None else sum(spec.arm_trials(a) for a in spec.arms)


def trials_per_arm_text(spec: SweepSpec, total: int) -> str:
    """Search trials per arm: one number when every arm has the same, else "min-max"."""
    if spec.search == "grid":
        return str(total // len(spec.arms))
    n = sorted({spec.arm_trials(a) for a in spec.arms})
    return str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"


def planned_trials(spec: SweepSpec, n_search: int) -> int:
    """An upper bound of a sweep's trials before its search has run (choices may coincide; a knee may sit on a
    grid value of the ablation)."""
    n_models = sum(len(a.models) for a in spec.arms)
    confirm = n_models * len(spec.confirm_choices) * spec.confirm_seeds
    ab = spec.ablate
    ablation = 0
    if ab and spec.confirm_seeds:
        arm = next(a for a in spec.arms if a.label == ab["arm"])
        ablation = len(arm.models) * (len(ab["n_ref"]) + len(ab["ratio"])) * (ab["seeds"] or spec.confirm_seeds)
    return n_search + confirm + ablation


def sweep_seeds(spec: SweepSpec) -> list[int]:
    """Search seeds, then the confirmation's fresh seeds (known before the search: protocol.fresh_seeds)."""
    from profit_bench.protocol import fresh_seeds
    return list(spec.seeds) + fresh_seeds(spec.seeds, spec.confirm_seeds)


def trial_prior_s(spec: SweepSpec, metas) -> float | None:
    """A trial's expected seconds before one has run: its checkpoint's pretraining seconds per epoch (per step) ×
    the fine-tuning budget. A trial trains on about as much data per epoch as pretraining did; evaluations make
    it an underestimate, which the measured mean replaces after the first trial."""
    kind = "epochs" if "epochs" in spec.budget else "steps"
    per = sorted(m["wall_time_s"] / m["config"][kind] * spec.budget[kind] for m in metas
                 if m and m.get("wall_time_s") and (m.get("config") or {}).get(kind))
    return per[len(per) // 2] if per else None


def objective_modes(spec: SweepSpec, higher_is_better: bool) -> list[str]:
    """Optuna's direction of each objective: validation metrics follow the task's metric, losses and forgetting
    go down."""
    up = "max" if higher_is_better else "min"
    return [up if o in ("old_val", "new_val") else "min" for o in spec.objectives]


def all_done(trials, total: int) -> bool:
    """Every trial of the stage ran to its end (or failed). Tune returns normally after Ctrl-C / SIGTERM, with
    stopped trials TERMINATED but lacking their final report, and Optuna trials never suggested at all.
    `trials`: Ray Tune Trial objects (status, last_result)."""
    ended = [t for t in trials if t.status == "ERROR" or (t.status == "TERMINATED" and (t.last_result or {}).get(
        "final"))]
    return len(ended) >= total


# ---------------------------------------------------------------------------------------------- Optuna search design
def arm_seed(sweep_seed: int, label: str) -> int:
    """An arm's own sampler seed, derived from the sweep seed and the arm's label (stable across runs and
    machines: sha256, not Python's salted hash). One seed for every arm made arms with equal ranges draw equal
    learning rates (issue 24)."""
    return int.from_bytes(hashlib.sha256(f"{int(sweep_seed)}/{label}".encode()).digest()[:4], "big") % 2 ** 31


def suggest(trial, arm: Arm, seeds: list[int]) -> None:
    """Optuna define-by-run space of one arm (each arm has its own study): its model, seed and searched fields."""
    if len(arm.models) > 1:
        trial.suggest_categorical("model", arm.models)
    if len(seeds) > 1:
        trial.suggest_categorical("seed", seeds)
    for k, dist in arm.space.items():
        kind, args = next(iter(dist.items()))
        if kind in ("loguniform", "uniform"):
            trial.suggest_float(k, float(args[0]), float(args[1]), log=kind == "loguniform")
        elif kind in ("int", "logint"):
            trial.suggest_int(k, int(args[0]), int(args[1]), log=kind == "logint")
        else:
            trial.suggest_categorical(k, args)


def space_filling_count(n: int) -> int:
    """How many of an arm's `n` trials come from the space-filling (QMC) start: all of them up to 4, else half
    (at least 4); the evolutionary / TPE phase takes the rest."""
    return n if n <= 4 else max(4, n // 2)


def space_filling_points(spec: SweepSpec, arm: Arm, n: int, seed: int) -> list[dict]:
    """The first `n` points of a scrambled Sobol sequence (scipy.stats.qmc, seeded) mapped onto the arm's Optuna
    space (the parameter names `suggest` uses): in every dimension the first 2^m points fall one into each of the
    2^m equal slices (log-slices for log distributions), so even 3–4 trials span an arm's lr range. Optuna's own
    QMCSampler is not used: it draws a study's first trial with its random independent sampler."""
    import warnings

    import numpy as np
    from scipy.stats import qmc
    dims = []  # (name, kind, args)
    if len(arm.models) > 1:
        dims.append(("model", "choice", arm.models))
    if len(spec.seeds) > 1:
        dims.append(("seed", "choice", spec.seeds))
    dims += [(k, *next(iter(d.items()))) for k, d in arm.space.items()]
    if n <= 0 or not dims:
        return []
    m = max(0, math.ceil(math.log2(n)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about a 1-point Sobol "sequence"
        u = qmc.Sobol(d=len(dims), scramble=True, seed=seed).random_base2(m)[:n]
    points = []
    for row in u:
        p = {}
        for (name, kind, args), x in zip(dims, row):
            if kind == "choice":
                p[name] = args[min(int(x * len(args)), len(args) - 1)]
            elif kind in ("int", "logint"):
                lo, hi = int(args[0]), int(args[1])
                v = (lo + x * (hi - lo + 1)) if kind == "int" else math.exp(
                    math.log(lo) + x * (math.log(hi + 1) - math.log(lo)))
                p[name] = int(min(hi, max(lo, math.floor(v))))
            else:
                lo, hi = float(args[0]), float(args[1])
                v = lo + x * (hi - lo) if kind == "uniform" else math.exp(
                    math.log(lo) + x * (math.log(hi) - math.log(lo)))
                p[name] = float(np.clip(v, lo, hi))
        points.append(p)
    return points


# ---------------------------------------------------------------------------------------------- names
def run_name(point: Point) -> str:
    """`profit r=431 n=3 lr=6.4e-4`: the arm and its key knobs (PROFIT's ratio / n_ref only where they apply)."""
    cfg = point.config
    parts = [point.arm]
    if cfg.profit:
        parts += [f"r={cfg.ratio:.0f}" if cfg.ratio >= 10 else f"r={cfg.ratio:.3g}", f"n={cfg.n_ref}"]
    parts.append(f"lr={fmt_num(cfg.lr)}")
    parts += [f"{k}={fmt_num(v)}" for k, v in point.params.items() if k not in ("lr", "ratio", "n_ref")]
    if point.stage == "confirm":
        parts.append(f"s={point.seed}")
    return " ".join(parts)


def fmt_num(v) -> str:
    if not isinstance(v, float):
        return str(v)
    if v != 0 and not 1e-2 <= abs(v) < 1e4:
        mantissa, exp = f"{v:.1e}".split("e")
        return f"{mantissa}e{int(exp)}"
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------------- stage results
def stage_frame(trials, plan: Plan, higher_is_better: bool):
    """Validation results of finished trials, one row each, diverged marked by protocol.mark_diverged."""
    import pandas as pd

    from profit_bench import protocol
    rows = []
    for t in trials:
        r = t.last_result or {}
        if t.status != "TERMINATED" or not r.get("final"):
            continue
        p = plan.from_tune(t.config["point"])
        rows.append({**{k: r.get(k) for k in ("old_val", "new_val", "old_val_before", "new_val_before",
                                               "chance_old", "chance_new", "status", "diverged_reason")},
                     "arm": p.arm, "model": p.model, "seed": p.seed, "config_key": p.config_key,
                     "params": p.params, "trial_id": t.trial_id, "order": p.search_index or 0,
                     "search_index": p.search_index or 0})  # protocol.TIE_BREAK_RULE reads it
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).sort_values("order", kind="stable")
    return pd.concat([protocol.mark_diverged(g, higher_is_better) for _, g in df.groupby("model", dropna=False)])


def arm_saturation(df, higher_is_better: bool) -> dict:
    """protocol.saturation per arm of a search-stage frame (stage_frame: `order` = search_index, `diverged`),
    against the sweep's validation reference point as the report draws it (protocol.reference_point, chance
    included for accuracy); diverged trials count as trials that added nothing."""
    import pandas as pd

    from profit_bench import protocol
    if df.empty:
        return {}
    chance = tuple(float(pd.to_numeric(df[c], errors="coerce").median()) if c in df else None
                   for c in ("chance_old", "chance_new"))
    ref = protocol.reference_point(df, higher_is_better, chance if higher_is_better else None)
    out = {}
    for arm, g in df.sort_values("order", kind="stable").groupby("arm", sort=True):
        pts = g[["old_val", "new_val"]].to_numpy(dtype=float, copy=True)
        pts[g["diverged"].to_numpy(bool)] = float("nan")
        out[arm] = protocol.saturation(pts, ref, higher_is_better)
    return out
