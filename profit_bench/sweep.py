"""A sweep: YAML spec → search (one Optuna study per arm, or every arm's whole grid) → confirmation of the
chosen configurations on fresh seeds, all as Ray Tune trials; MLflow written by this driver only.

    python -m profit_bench.sweep toy                 # Optuna search per method + confirmation, results in ./mlflow.db
    python -m profit_bench.sweep table9_ratio --set budget.epochs=1 --set seeds=[0]   # a small table on a CPU
    python -m profit_bench.sweep toy --resume        # continue the latest interrupted `toy` sweep (both stages)
    mlflow ui --backend-store-uri sqlite:///mlflow.db   # then open http://127.0.0.1:5000

NAME is a file in sweeps/ (without .yaml) or a path; the schema is in profit_bench/spec.py. `--set KEY=VALUE`
(repeatable, dotted keys, VALUE parsed as YAML) edits the spec before validation.

Search reads validation metrics only. Equal budgets: every arm gets `num_samples` Optuna trials (its own study,
same sampler seed) or its whole grid. After the search, protocol.py marks relatively diverged trials and picks
per arm the validation Pareto set's best-old / best-new / knee; each is re-run on `--confirm-seeds` fresh seeds
(stage=confirm runs under the same MLflow parent). Pretraining: one Ray task per missing checkpoint, in
parallel, into the cache `trial` uses too (--cache-dir; on a cluster under --storage-path); trials only load it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

import yaml

from profit_bench import UserError, safe_name
from profit_bench.plan import (Plan, Point, all_done, arm_seed, planned_trials, run_name, search_total,
                               space_filling_count, space_filling_points, suggest, sweep_seeds, trial_prior_s,
                               trials_per_arm_text)
from profit_bench.spec import SweepSpec, load_spec

FAIL_ENV = "PROFIT_BENCH_FAIL_ARM"  # test hook: trials of this arm label raise before training
__all__ = ["Options", "run_sweep", "main", "load_spec"]


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Options:
    num_samples: int | None = None
    trials_per_dim: int | None = None
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
    confirm_seeds: int | None = None
    no_confirm: bool = False
    resume: bool = False
    dry_run: bool = False
    quiet: bool = False
    overrides: tuple = ()
    verbose: int = 0
    workloads: list | None = None


def check_options(opts: Options) -> None:
    """CLI values a user can get wrong, refused before anything starts."""
    for name, low in (("num_samples", 1), ("trials_per_dim", 1), ("max_concurrent", 1), ("confirm_seeds", 0),
                      ("seed", 0)):
        v = getattr(opts, name)
        if v is not None and v < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    if opts.gpus_per_trial is not None and not (opts.gpus_per_trial >= 0 and math.isfinite(opts.gpus_per_trial)):
        raise UserError(f"--gpus-per-trial must be >= 0, got {opts.gpus_per_trial}")
    if opts.cpus_per_trial is not None and not (opts.cpus_per_trial > 0 and math.isfinite(opts.cpus_per_trial)):
        raise UserError(f"--cpus-per-trial must be > 0, got {opts.cpus_per_trial}")
    if not 0 <= opts.verbose <= 3:
        raise UserError(f"--verbose must be 0-3, got {opts.verbose}")


def resolve_spec(name: str, opts: Options) -> SweepSpec:
    return apply_options(load_spec(name, list(opts.overrides), data_dir=opts.data_dir), opts)


def apply_options(spec: SweepSpec, opts: Options) -> SweepSpec:
    if opts.seed is not None:
        spec.seeds = [opts.seed]
    if opts.num_samples is not None and opts.trials_per_dim is not None:
        raise UserError("--num-samples and --trials-per-dim are alternatives; give one")
    if opts.num_samples is not None:
        spec.num_samples, spec.trials_per_dim = opts.num_samples, None
    if opts.trials_per_dim is not None:
        if spec.search != "optuna":
            raise UserError(f"--trials-per-dim needs an optuna search; {spec.name} is a {spec.search} sweep")
        spec.trials_per_dim = opts.trials_per_dim
    if opts.confirm_seeds is not None:
        spec.confirm_seeds = opts.confirm_seeds
    if opts.no_confirm:
        spec.confirm_seeds = 0
    return spec


# ---------------------------------------------------------------------------------------------- worker side
@dataclass
class SweepContext:
    """What a trial needs besides its point; shipped to workers through tune.with_parameters. No MLflow."""
    plan: Plan             # the spec, device, data and cache folders: turns Tune's point dict into a Point
    threads: int
    fail_arm: str | None = None
    done: dict = field(default_factory=dict)  # ray trial id → final result already in MLflow (re-run after a crash)
    code_sha256: str | None = None  # code_fingerprint() when the sweep (or its resume) started: trials check it


def check_data_dir(data_dir: str | None) -> None:
    """--data-dir is read on the node that runs the trial: say which node lacks it."""
    if data_dir is None:
        return
    p = Path(data_dir)
    if not p.is_dir() or not any(p.iterdir()):
        import ray
        raise UserError(f"--data-dir {data_dir} is missing or empty on node {ray.util.get_node_ip_address()}; "
                        f"put the datasets there on every node (or on shared storage)")


def train_trial(config: dict, ctx: SweepContext):
    """Ray Tune function trainable: one run_trial, every evaluation and the final result via tune.report."""
    import torch
    from ray import tune

    from profit_bench.trial import run_trial

    check_code(ctx.code_sha256)
    trial_id = tune.get_context().get_trial_id()
    if trial_id in ctx.done:  # finished before the driver died: report the logged result, do not train again
        tune.report(ctx.done[trial_id])
        return
    t0 = time.perf_counter()
    torch.set_num_threads(ctx.threads)
    check_data_dir(ctx.plan.data_dir)
    point = ctx.plan.from_tune(config["point"])  # its config never pretrains: the driver's tasks filled the cache
    if ctx.fail_arm is not None and point.arm == ctx.fail_arm:
        raise RuntimeError(f"failure injected by {FAIL_ENV}={ctx.fail_arm}")
    result = run_trial(point.config, report=tune.report)
    final = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    import ray
    tune.report({**final, "trainable_s": time.perf_counter() - t0, "final": True,
                 "node_id": ray.get_runtime_context().get_node_id()})


# ---------------------------------------------------------------------------------------------- code pinning
CODE_PACKAGES = ("profit_bench", "baselines", "analysis")
_PROCESS_CODE: dict = {}  # this process's code_fingerprint, taken once: what it imported, not later edits


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 over the .py files of profit_bench/, baselines/ and analysis/ (relative path + bytes, sorted):
    the code a sweep's trials run. Ray workers import the working tree, so an edit during a sweep would otherwise
    change what later trials execute under the same recorded commit."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def git_dirty(root: Path | None = None) -> str:
    """"true" when git sees uncommitted changes in the code packages, "false" when not, "unknown" outside git."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *CODE_PACKAGES], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return "unknown" if out.returncode else str(bool(out.stdout.strip())).lower()


def check_code(expected: str | None) -> None:
    """A trial refuses to run code other than what its sweep pinned (the worker's fingerprint, taken the first
    time this process runs a trial, before the trial's own imports)."""
    if expected is None:
        return
    have = _PROCESS_CODE.setdefault("sha256", code_fingerprint())
    if have != expected:
        raise UserError(f"code changed since the sweep started: this worker's profit_bench/baselines/analysis hash "
                        f"{have[:12]} differs from the sweep's {expected[:12]} (files under "
                        f"{Path(__file__).resolve().parent.parent} edited during the sweep?); restore them and "
                        f"--resume, or start a new sweep")


# ---------------------------------------------------------------------------------------------- search
def _searcher_base():
    from ray.tune.search import Searcher
    return Searcher


def _define(trial, arm, seeds):
    suggest(trial, arm, seeds)


class _PicklableLock:
    """A thread lock that pickles (as a new, unlocked lock). Optuna >= 5.1's NSGA-II sampler holds a plain
    lock, which Tune cannot pickle into tuner.pkl or the searcher's checkpoint."""

    def __init__(self):
        self._lock = threading.Lock()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._lock = threading.Lock()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def acquire(self, *a, **kw):
        return self._lock.acquire(*a, **kw)

    def release(self):
        self._lock.release()


def _picklable(sampler):
    if hasattr(sampler, "_thread_lock"):
        sampler._thread_lock = _PicklableLock()
    return sampler


class ArmSearch(_searcher_base()):
    """One Optuna study per arm behind one Tune searcher: every arm gets exactly `spec.arm_trials(arm)` trials
    (suggestions go to the arm with the fewest so far), each study sees only its own arm's results.

    Search design (issue 24): each arm's sampler has its own seed (spec.arm_seed: sweep seed × arm label), and its
    first space_filling_count(n) trials are scrambled-Sobol points of its space (spec.space_filling_points),
    enqueued into its study, so a small budget still covers the arm's whole range. They are NSGA-II's first
    generation (population = that count) or TPE's startup trials; the sampler proposes the rest."""

    def __init__(self, plan: Plan, metric, mode, storage_url: str, study_prefix: str):
        import functools

        import optuna
        from ray.tune.search.optuna import OptunaSearch
        super().__init__(metric=metric, mode=mode)
        spec = plan.spec
        self.plan, self.spec, self.owner, self.index = plan, spec, {}, {}
        self.counts = {a.label: 0 for a in spec.arms}
        self.budget = {a.label: spec.arm_trials(a) for a in spec.arms}
        self.subs = {}
        for a in spec.arms:
            seed = arm_seed(spec.seeds[0], a.label)
            start = space_filling_count(self.budget[a.label])
            sampler = _picklable(optuna.samplers.NSGAIISampler(population_size=max(2, min(50, start)), seed=seed)
                                 if spec.sampler == "nsga2" else
                                 optuna.samplers.TPESampler(seed=seed, n_startup_trials=start))
            self.subs[a.label] = OptunaSearch(
                space=functools.partial(_define, arm=a, seeds=spec.seeds), metric=metric, mode=mode,
                sampler=sampler, storage=optuna.storages.RDBStorage(storage_url),
                study_name=f"{study_prefix}/{a.label}",
                points_to_evaluate=space_filling_points(spec, a, start, seed) or None)

    def suggest(self, trial_id: str):
        label = self.owner.get(trial_id)
        if label is None:
            open_ = [a.label for a in self.spec.arms if self.counts[a.label] < self.budget[a.label]]
            if not open_:
                return self.FINISHED
            label = min(open_, key=lambda k: self.counts[k])
            self.counts[label] += 1
            self.owner[trial_id], self.index[trial_id] = label, self.counts[label]
        params = self.subs[label].suggest(trial_id)
        arm = next(a for a in self.spec.arms if a.label == label)
        # search_index: the trial's place in its arm's study (1, 2, ...), the order the saturation check reads
        return {"point": self.plan.optuna_point(arm, params, self.index.get(trial_id, 0)).to_tune()}

    def on_trial_result(self, trial_id: str, result: dict):
        if trial_id in self.owner:
            self.subs[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        if trial_id in self.owner:
            self.subs[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def close_orphan_optuna_trials(storage_url: str) -> int:
    """Optuna trials left RUNNING by a driver killed between `ask` and Ray's next checkpoint: no Ray trial will
    ever `tell` them (Ray suggests that point again under a new id), so they are marked FAIL."""
    import optuna
    storage = optuna.storages.RDBStorage(storage_url)
    n = 0
    for s in optuna.study.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            n += 1
    return n


def objective_modes(spec: SweepSpec, higher_is_better: bool) -> list[str]:
    up = "max" if higher_is_better else "min"
    return [up if o in ("old_val", "new_val") else "min" for o in spec.objectives]


def tune_config(plan: Plan, modes, concurrent: int, exp_dir: Path, points):
    from ray import tune
    spec = plan.spec
    if points is not None:  # Tune's own grid generator (it honours max_concurrent_trials; a passed one does not)
        return tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent, reuse_actors=True)
    metric = spec.objectives if len(spec.objectives) > 1 else spec.objectives[0]
    mode = modes if len(modes) > 1 else modes[0]
    exp_dir.mkdir(parents=True, exist_ok=True)
    search = ArmSearch(plan, metric, mode, f"sqlite:///{exp_dir / 'optuna.db'}", exp_dir.name)
    scheduler = None
    if spec.early_stop:
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(metric=metric, mode=mode, grace_period=1)
    # reuse_actors: a fresh actor pays seconds of imports (torch, Ray) per trial.
    return tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=search_total(spec, None),
                           max_concurrent_trials=concurrent, reuse_actors=True)


# ---------------------------------------------------------------------------------------------- pretraining
def _pretrain_one(cfg, cache_dir: str, progress: bool) -> tuple[str, str, float, dict]:
    """One (task, model, seed, config) checkpoint (+ EWC Fisher where the method needs it) for the resolved
    TrialConfig `cfg` (a Point's config); a Ray task. Returns the checkpoint's path, the id of the node that built
    it, the seconds it took and its metadata."""
    import ray
    import torch

    from profit_bench import pretrain
    t0 = time.perf_counter()
    device = "cuda" if cfg.device == "cuda" and torch.cuda.is_available() else "cpu"
    path = pretrain.ensure_pretrained(cfg.task, cfg.model, cfg.seed, pretrain.pretrain_config_for(cfg), cache_dir,
                                      data_dir=cfg.data_dir, device=device, limit=cfg.limit,
                                      fisher_samples=pretrain.fisher_samples_for(cfg), progress=progress)
    meta = {}
    with contextlib.suppress(OSError, ValueError):  # a URI cache: the local copy may be gone; curves are extras
        meta = json.loads(Path(path).with_suffix(".json").read_text())
    return str(path), ray.get_runtime_context().get_node_id(), time.perf_counter() - t0, meta


# Rough relative cost of pretraining a backbone: the longest tasks go first so the last slot is not left alone.
PRETRAIN_ORDER = ("vit_small", "vit_tiny", "resnet18", "vit_micro", "resnet_small")


def pretrain_on_cluster(keys: dict, cache_dir: str, cpus: float, gpus: float, quiet: bool,
                        meter: "Meter | None" = None) -> tuple[float, dict]:
    """Every checkpoint of `keys` (Plan.pretrain_keys: key → Point) not built yet by this driver (meter.pretrained)
    as a Ray task with the trials' resources, all in parallel, longest first. Returns (seconds, {key: checkpoint
    metadata})."""
    import ray
    t0 = time.perf_counter()
    known = meter.pretrained if meter is not None else {}
    # A checkpoint built with its Fisher also serves the plain key (no Fisher).
    built = {k[:4]: meta for k, meta in known.items()}
    out = {k: known.get(k, built.get(k[:4])) for k in keys if k in known or (k[4] is None and k[:4] in built)}
    todo = {k: p for k, p in keys.items() if k not in out}
    rank = {m: i for i, m in enumerate(PRETRAIN_ORDER)}
    todo = dict(sorted(todo.items(), key=lambda kv: rank.get(kv[0][1], len(rank))))
    task = ray.remote(_pretrain_one).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    refs = {task.remote(p.config, cache_dir, not quiet): k for k, p in todo.items()}
    pending = list(refs)
    while pending:  # in the order they finish: progress shows while the long ones still run
        (ref,), pending = ray.wait(pending, num_returns=1)
        k = refs[ref]
        path, node, seconds, meta = ray.get(ref)
        out[k] = meta
        if meter is not None:
            meter.pretrained[k] = meta
            meter.busy_s += seconds
        if not quiet:
            p = todo[k]
            old_val = meta.get("old_val", float("nan"))
            say(meter, f"pretrained [{len(refs) - len(pending)}/{len(refs)}] {p.config.task}/{p.model or 'default'} "
                       f"seed {p.seed} on node {node[:12]} in {seconds:.0f}s (old val {old_val:.4g}, "
                       f"{_dur(time.perf_counter() - t0)} elapsed) → {path}")
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------------------------------------- driver helpers
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
    concurrent = opts.max_concurrent or spec.max_concurrent
    cpus = opts.cpus_per_trial
    if cpus is None:
        cpus = max(1.0, math.floor(n_cpu / concurrent)) if concurrent else 1.0
    if cpus > n_cpu:
        raise UserError(f"--cpus-per-trial {cpus:g} must be in (0, {n_cpu:g}] (the cluster's CPUs)")
    if concurrent is None:
        concurrent = max(1, int(n_cpu // cpus))
    if gpus is None:  # share the GPUs between the concurrent trials; never more than one GPU a trial
        gpus = min(1.0, n_gpu / concurrent) if n_gpu else 0.0
    return cpus, gpus, concurrent


def init_ray(address: str | None):
    import logging

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


def task_facts(spec: SweepSpec, data_dir) -> tuple[str, bool, dict]:
    """The task's metric, its direction and the size of each split the trials see (after `trial.limit`)."""
    from profit_bench.tasks import SPLITS, get_task
    task = get_task(spec.task, data_dir=data_dir, limit=spec.trial.get("limit"))
    return task.metric, task.higher_is_better, {k: len(getattr(task, k)) for k in SPLITS}


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _progress_base():
    from ray import tune
    return tune.Callback


def _dur(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class Meter:
    """Progress and accounting of one command (a sweep, or a suite of them): trials done / planned, elapsed, ETA,
    and the busy slot-seconds (trials and pretraining tasks) against which the harness overhead is measured.
    Shown as one live tqdm bar on stderr (only on a terminal); the command's lines go above it (`write`)."""
    concurrent: int = 1
    t0: float = field(default_factory=time.perf_counter)
    planned: dict = field(default_factory=dict)   # workload → trials it will run (upper bound until known)
    done: dict = field(default_factory=dict)      # workload → trials finished (failed included)
    trial_s: dict = field(default_factory=dict)   # workload → [seconds of each trial that ran here]
    busy_s: float = 0.0                           # trial + pretraining seconds run in this process's session
    pretrained: dict = field(default_factory=dict)  # pretrain key → checkpoint metadata (built or found)
    prior_s: dict = field(default_factory=dict)   # workload → expected trial seconds before any has run
    t_trials: float | None = None                 # when the first trial stage started (throughput ETA)
    done_here: int = 0                            # trials finished since t_trials (replayed ones excluded)
    bar: object = None                            # the live tqdm display, None until trials start

    def finished(self, workload: str, seconds: float | None):
        self.done[workload] = self.done.get(workload, 0) + 1
        if seconds is not None:
            self.busy_s += seconds
            self.trial_s.setdefault(workload, []).append(seconds)
            self.done_here += 1
        self.refresh()

    def eta(self) -> float | None:
        """Remaining trials × their workload's mean trial time / concurrent trials (a workload not started yet
        counts its prior (trial_prior_s), else the mean over every trial so far); once `concurrent` trials have
        finished here, never less than the remaining trials at the measured throughput (which includes the
        harness's own time between trials): the first estimate then stops swinging with each trial."""
        every = [x for v in self.trial_s.values() for x in v]
        if not every:  # a prior alone (pretraining time) misses Ray's actor start-up and PROFIT's n_ref + 1 cost
            return None
        left, remaining = 0.0, 0
        for w, n in self.planned.items():
            ts = self.trial_s.get(w)
            per = sum(ts) / len(ts) if ts else self.prior_s.get(w, sum(every) / len(every) if every else None)
            if per is None:
                return None
            left += max(0, n - self.done.get(w, 0)) * per
            remaining += max(0, n - self.done.get(w, 0))
        eta = left / max(1, self.concurrent)
        if self.t_trials is not None and self.done_here >= self.concurrent:
            eta = max(eta, remaining * (time.perf_counter() - self.t_trials) / self.done_here)
        return eta

    def line(self) -> str:
        done, total = sum(self.done.values()), sum(self.planned.values())
        eta = self.eta()
        return (f"{done}/{total} trials, {_dur(time.perf_counter() - self.t0)} elapsed, "
                f"ETA {'~' + _dur(eta) if eta is not None else '?'}")

    # -- the live display
    def start(self):
        """Show the bar (trial stages begin); on a terminal only, refreshed every second so elapsed ticks."""
        if self.t_trials is None:
            self.t_trials = time.perf_counter()
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=sum(self.planned.values()), file=sys.stderr, disable=None, dynamic_ncols=True,
                            bar_format="{desc} |{bar}|", leave=False)
            if not self.bar.disable:
                threading.Thread(target=self._tick, daemon=True).start()
        self.refresh()

    def _tick(self):
        while self.bar is not None:
            time.sleep(1.0)
            with contextlib.suppress(Exception):  # closed meanwhile
                self.refresh()

    def refresh(self):
        bar = self.bar
        if bar is None or bar.disable:
            return
        done, total = sum(self.done.values()), sum(self.planned.values())
        eta = self.eta()
        bar.total, bar.n = total, done
        bar.set_description_str(self.line(), refresh=False)
        bar.refresh()

    def write(self, line: str, file=None):
        """A line above the bar (plain print when there is none)."""
        file = file or sys.stdout
        if self.bar is not None and not self.bar.disable:
            from tqdm import tqdm
            tqdm.write(line, file=file)
            file.flush()
        else:
            print(line, file=file, flush=True)

    def close(self):
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.close()


def say(meter: "Meter | None", line: str, file=None):
    """Print a line, above the live progress bar when there is one."""
    if meter is not None:
        meter.write(line, file)
    else:
        print(line, file=file or sys.stdout, flush=True)


class Progress(_progress_base()):
    """One compact line per finished trial: stage, arm and knobs, old/new validation metric, status, time, and
    the command's trials done / planned, elapsed time and ETA."""

    def __init__(self, plan: Plan, total: int, stage: str, meter: Meter, workload: str):
        self.plan, self.total, self.stage, self.done = plan, total, stage, 0
        self.meter, self.workload = meter, workload

    def _name(self, trial) -> str:
        return run_name(self.plan.from_tune(trial.config["point"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        self.meter.finished(self.workload, None if r.get("replayed") else r.get("trainable_s"))
        self.meter.write(f"[{self.done}/{self.total}] {self.stage} {self._name(trial)} | old_val "
                         f"{_fmt(r.get('old_val'))} new_val {_fmt(r.get('new_val'))} | {r.get('status', '?')} "
                         f"{r.get('wall_time_s', 0):.1f}s | {self.meter.line()}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self.meter.finished(self.workload, None)
        self.meter.write(f"[{self.done}/{self.total}] {self.stage} {self._name(trial)} | FAILED (traceback: "
                         f"{getattr(trial, 'path', None) or trial.local_path}/error.txt; MLflow tag `error`)")


SIGTERM_GRACE_S = 15  # Slurm and Kubernetes send SIGKILL 30 s after SIGTERM


def install_sigterm(abort):
    """SIGTERM (timeout, Slurm, Kubernetes) gets Ctrl-C's clean stop: Tune catches SIGINT during fit. When the
    signal went to the whole process group, Ray's own processes die with it and Tune cannot stop cleanly; then
    `abort()` closes the MLflow record and prints the resume line after SIGTERM_GRACE_S, and the driver exits."""
    def watchdog():
        time.sleep(SIGTERM_GRACE_S)
        abort()
        os._exit(130)

    def handler(signum, frame):
        threading.Thread(target=watchdog, daemon=True).start()
        os.kill(os.getpid(), signal.SIGINT)
    signal.signal(signal.SIGTERM, handler)


def _metric_name(label: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", label)


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    name: str              # "search" | "confirm"
    exp_dir: Path          # the Ray experiment folder
    points: list[Point] | None  # grid / confirm / ablation points; None = Optuna
    total: int


def run_stage(stage: Stage, plan: Plan, ctx: SweepContext, logger, opts: Options, modes, cpus, gpus, concurrent,
              meter: Meter, workload: str):
    """One Tuner (new or restored) to the end or to an interrupt; the trials afterwards, or None if interrupted
    before Tune returned."""
    from ray import tune
    ctx = replace(ctx, done=logger.done_results())
    logger.trials = []  # filled by this stage's callbacks
    trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx), {"cpu": cpus, "gpu": gpus})
    callbacks = [logger, Progress(plan, stage.total, stage.name, meter, workload)]
    if (stage.exp_dir / "tuner.pkl").exists():
        tuner = tune.Tuner.restore(str(stage.exp_dir), trainable, resume_unfinished=True, resume_errored=True)
        # restore() keeps the callbacks pickled with the tuner; this driver's logger must be the live one.
        tuner._local_tuner._run_config.callbacks = callbacks
    else:
        param_space = ({"point": tune.grid_search([p.to_tune() for p in stage.points])}
                       if stage.points is not None else None)
        run_config = tune.RunConfig(name=stage.exp_dir.name, storage_path=str(stage.exp_dir.parent),
                                    callbacks=callbacks, verbose=opts.verbose,
                                    failure_config=tune.FailureConfig(max_failures=0))
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=tune_config(plan, modes, concurrent, stage.exp_dir, stage.points),
                           run_config=run_config)
    try:
        results = tuner.fit()
    finally:
        logger.reconcile(stage.name)
    # Ray's final trial states (private attribute: ResultGrid has no public list of Trial objects); also
    # covers a stage restored after it finished, where no callback fires.
    logger.trials = list(results._experiment_analysis.trials)
    logger.reconcile(stage.name)
    return logger.trials


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
                     "params": p.params, "trial_id": t.trial_id, "order": p.search_index or 0})
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


def flag_unsaturated(sweep, sats: dict) -> None:
    """The saturation check's verdict on the sweep parent (tag `unsaturated_arms`, comma-separated, "" when every
    judged arm saturated) and on the console."""
    from profit_bench.tracking import _retry
    bad = sorted(a for a, s in sats.items() if s["saturated"] is False)
    _retry(sweep.client.set_tag, sweep.parent_id, "unsaturated_arms", ",".join(bad))
    if bad:
        from profit_bench.protocol import SATURATION_GAIN
        print(f"search not saturated (validation hypervolume still grew ≥ {SATURATION_GAIN:.0%} over the last "
              f"third of trials): "
              + ", ".join(f"{a} +{100 * sats[a]['gain_share']:.0f} %" for a in bad)
              + "; more trials (--num-samples) could change these arms' choices", flush=True)


def summary_metrics(sweep_children, df, higher_is_better: bool, chance=None) -> dict:
    """Parent metrics: counts per stage and status, validation hypervolume per arm (search stage), and per arm
    the saturation check (protocol.SATURATION_RULE): saturated.<arm> 1/0, hv_gain_last_third.<arm> (a share)."""
    from profit_bench import protocol
    out = {}
    for r in sweep_children:
        key = f"n_{r.data.tags.get('stage', 'search')}_{r.data.tags.get('status', 'unknown')}"
        out[key] = out.get(key, 0) + 1
    if not df.empty:
        ok = df[~df["diverged"]]
        ref = protocol.reference_point(df, higher_is_better, chance)
        for arm, g in ok.groupby("arm"):
            out[f"hypervolume_val.{_metric_name(arm)}"] = protocol.hypervolume(
                g[["old_val", "new_val"]].to_numpy(dtype=float), ref, (higher_is_better, higher_is_better))
        if "order" in df:
            for arm, sat in arm_saturation(df, higher_is_better).items():
                if sat["saturated"] is not None:
                    out[f"saturated.{_metric_name(arm)}"] = float(sat["saturated"])
                    out[f"hv_gain_last_third.{_metric_name(arm)}"] = sat["gain_share"]
    return out


# ---------------------------------------------------------------------------------------------- the driver
ACTIVE: dict = {}  # "abort": the running sweep's clean stop (a suite's SIGTERM handler calls it)


@dataclass
class SuiteRun:
    """What run_sweep needs to know when it runs as one workload of a suite."""
    name: str                # the suite's name (tag `suite` on every workload's parent run)
    command: str             # the command line (tag `suite_command`)
    workload: str


def run_sweep(name: str, opts: Options, argv: list[str] | None = None, *, spec: SweepSpec | None = None,
              meter: Meter | None = None, suite: SuiteRun | None = None) -> int:
    """Search + confirmation (+ ablation); returns the exit code (0 ok, 1 every trial failed, 130 interrupted).
    A suite passes the workload's `spec`, its shared `meter` and `suite`; Ray is then already running."""
    from profit_bench import tracking
    check_options(opts)
    uri = tracking.absolute_tracking_uri(opts.tracking_uri)
    if not opts.dry_run and suite is None:  # first: a dead server fails in seconds, on one line, before torch/Ray
        tracking.check_reachable(uri)
    spec = resolve_spec(name, opts) if spec is None else spec
    experiment = safe_name(opts.experiment or spec.name, "experiment")
    storage = Path(opts.storage_path).resolve()
    cache_dir = resolve_cache_dir(opts, storage)
    data_dir = str(Path(opts.data_dir).resolve()) if opts.data_dir else None
    if opts.dry_run:
        return dry_run(Plan(spec, data_dir=data_dir, cache_dir=cache_dir), opts, experiment, uri)
    from profit_bench.tasks import ensure_task_data
    ensure_task_data(spec.task, data_dir)  # CIFAR on demand: on the driver, before Ray or any MLflow run starts

    sweep = tracking.Sweep(uri, experiment, create=False)  # nothing is written before the sweep starts
    previous = sweep.find(None) if opts.resume else None
    if opts.resume and previous is None:
        raise UserError(f"nothing to resume: no sweep parent run in experiment {experiment!r} of {uri}; pass the "
                        f"same --tracking-uri / --experiment as the interrupted sweep, or drop --resume")
    if previous is not None and previous.info.status == "FINISHED" and not sweep.failed_children(previous):
        # Nothing to re-run: its record (wall_time_s included) stays as it was.
        print(f"{previous.data.tags['sweep_dir']}: this sweep has finished already; nothing to resume", flush=True)
        return 0
    state = {"sweep": None, "t0": time.perf_counter(), "wall_before": 0.0}

    def abort():
        if state["sweep"] is not None and state["sweep"].parent_id is not None:
            state["sweep"].kill_running(state["wall_before"] + time.perf_counter() - state["t0"])
        interrupted(argv, name)
    ACTIVE["abort"] = abort
    if suite is None:
        init_ray(opts.address)
        install_sigterm(abort)  # after ray.init, which installs a C++ handler that aborts the process on SIGTERM
    import ray
    cpus, gpus, concurrent = plan_resources(opts, spec, ray.cluster_resources())
    device = "cuda" if gpus > 0 else "cpu"
    plan = Plan(spec, device=device, data_dir=data_dir, cache_dir=cache_dir)
    points = plan.search_points()
    total = search_total(spec, points)
    metric_name, higher_is_better, sizes = task_facts(spec, data_dir)
    modes = objective_modes(spec, higher_is_better)
    workload = suite.workload if suite else spec.name
    meter = meter or Meter(concurrent=concurrent)
    meter.planned[workload] = planned_trials(spec, total)

    code = pin_code(sweep, previous)
    if previous is not None:
        exp_dir = Path(previous.data.tags["sweep_dir"])
        sweep.attach(previous)
        print(f"resuming {exp_dir}", flush=True)
        wall_before = previous.data.metrics.get("wall_time_s", 0.0)
    else:
        exp_dir = claim_sweep_dir(storage, experiment)
        sweep.ensure_experiment()
        tags = {"suite": suite.name, "suite_command": suite.command, "suite_workload": suite.workload} if suite else {}
        sweep.create(exp_dir, spec, yaml.safe_dump(spec.resolved(), sort_keys=False),
                     {**{f"cli.{k}": v for k, v in asdict(opts).items() if k not in ("dry_run", "verbose")},
                      "cpus_per_trial": cpus, "gpus_per_trial": gpus, "max_concurrent": concurrent,
                      "objectives": ",".join(spec.objectives), "modes": ",".join(modes), "num_trials": total,
                      "trials_per_arm": trials_per_arm_text(spec, total), "data_sizes": json.dumps(sizes)},
                     device, tags)
        wall_before = 0.0

    t_start = time.perf_counter()
    state.update(sweep=sweep, t0=t_start, wall_before=wall_before)
    sweep.wall_before, sweep.t0 = wall_before, t_start  # sweep.log_wall: the running total as trials finish
    logger = tracking.MlflowLogger(sweep, plan, metric_name=metric_name, higher_is_better=higher_is_better)
    ctx = SweepContext(plan=plan, threads=max(1, int(cpus)), fail_arm=os.environ.get(FAIL_ENV), code_sha256=code)
    status, df = "KILLED", None
    t_pretrain = 0.0
    args = (plan, ctx, logger, opts, modes, cpus, gpus, concurrent, meter, workload)
    try:
        later_bound = meter.planned[workload] - total
        say(meter, f"sweep {spec.name}: {total} search trials ({trials_per_arm_text(spec, total)} per arm)"
                   + (f" + at most {later_bound} confirmation/ablation trials" if later_bound else "")
                   + f", {concurrent} at once, {cpus:g} CPU + {gpus:g} GPU each → {exp_dir}")
        # Every seed's checkpoint up front (the confirmation's fresh seeds are known now): one parallel batch.
        seconds, metas = pretrain_on_cluster(plan.pretrain_keys(plan.stage_points(points, sweep_seeds(spec))),
                                             cache_dir, cpus, gpus, opts.quiet, meter)
        t_pretrain += seconds
        meter.prior_s.setdefault(workload, trial_prior_s(spec, metas.values()))
        sweep.log_pretraining(metas)
        meter.start()
        trials = run_stage(Stage("search", exp_dir, points, total), *args)
        if not all_done(trials, total):
            return interrupted(argv, name)
        df = stage_frame(trials, plan, higher_is_better)
        for _, row in df[df["diverged"]].iterrows() if not df.empty else []:
            logger.tag_diverged(row["trial_id"], row["diverged_reason"])
        if spec.search == "optuna":
            flag_unsaturated(sweep, arm_saturation(df, higher_is_better))
        later = [("confirm", plan.confirm_points(df, higher_is_better)),
                 ("ablation", plan.ablation_points(df, higher_is_better))]
        planned = total + sum(len(p) for _, p in later)
        if planned != meter.planned[workload]:  # the plan changed: say why, once (the bar's total follows)
            bound = meter.planned[workload] - total
            configs = len({p.config_key for _, ps in later for p in ps})
            say(meter, f"plan: {planned - total} confirmation/ablation trials, not the {bound} bound: {configs} "
                       f"distinct chosen configurations (an arm's best-old / knee / best-new can coincide)")
        meter.planned[workload] = planned
        meter.refresh()
        for stage_name, stage_points in later:
            if not stage_points:
                continue
            t_pretrain += pretrain_on_cluster(plan.pretrain_keys(stage_points), cache_dir, cpus, gpus, opts.quiet,
                                              meter)[0]
            trials = run_stage(Stage(stage_name, exp_dir / stage_name, stage_points, len(stage_points)), *args)
            if not all_done(trials, len(stage_points)):
                return interrupted(argv, name)
        if spec.search == "optuna":
            close_orphan_optuna_trials(f"sqlite:///{exp_dir / 'optuna.db'}")
        status = "FINISHED"
    except KeyboardInterrupt:
        return interrupted(argv, name)
    except BaseException as e:
        status = "KILLED" if disk_full(e) else "FAILED"  # a full disk is resumable once there is space again
        raise
    finally:
        if suite is None:
            meter.close()
        wall = wall_before + time.perf_counter() - t_start
        if status == "KILLED":
            sweep.close_running()
        children = sweep.children()
        metrics = summary_metrics(children, df if df is not None else _empty(), higher_is_better)
        sweep.finish(status, {**metrics, "wall_time_s": wall, "pretrain_s": t_pretrain}, counts=True)
    return report(children, metrics, exp_dir, experiment, uri, wall)


def resolve_cache_dir(opts: Options, storage: Path) -> str:
    """--cache-dir; else on one machine the cache `trial` uses too ($PROFIT_BENCH_CACHE or ~/.cache/profit_bench),
    so checkpoints are shared; on a cluster (--address) STORAGE_PATH/pretrain_cache, which every node reads."""
    if opts.cache_dir is not None and "://" in opts.cache_dir:  # a pyarrow.fs URI (pretrain.local_cache)
        return opts.cache_dir
    if opts.cache_dir is None and not opts.address:
        from profit_bench.pretrain import default_cache_dir
        return str(Path(default_cache_dir()).resolve())
    return str(Path(opts.cache_dir or storage / "pretrain_cache").resolve())


def run_suite(name: str, opts: Options, argv: list[str]) -> int:
    """Every workload of a suite, one after the other, in one Ray session: all checkpoints pretrained up front as
    one parallel batch, then each workload's sweep (experiment SUITE_WORKLOAD). Prints the wall time and the
    harness overhead: the share of the slots' time (wall × concurrent trials) not spent inside a trial or a
    pretraining task (Ray and actor start-up, MLflow, stage barriers, idle slots)."""
    from profit_bench import tracking
    from profit_bench.spec import load_suite
    check_options(opts)
    if opts.experiment:
        raise UserError("--experiment names one sweep; a suite's workloads are the experiments SUITE_WORKLOAD")
    uri = tracking.absolute_tracking_uri(opts.tracking_uri)
    suite = load_suite(name, list(opts.overrides), data_dir=opts.data_dir, only=opts.workloads)
    specs = {w: apply_options(spec, opts) for w, spec in suite.workloads.items()}
    command = "python -m profit_bench.sweep " + shlex.join(argv)
    storage = Path(opts.storage_path).resolve()
    cache_dir = resolve_cache_dir(opts, storage)
    data_dir = str(Path(opts.data_dir).resolve()) if opts.data_dir else None
    if opts.dry_run:
        for w, spec in specs.items():
            print(f"--- workload {w} (experiment {suite.name}_{w})")
            dry_run(Plan(spec, data_dir=data_dir, cache_dir=cache_dir), opts, f"{suite.name}_{w}", uri)
        return 0
    tracking.check_reachable(uri)
    for w in specs:
        safe_name(f"{suite.name}_{w}", "suite workload experiment")
    from profit_bench.tasks import ensure_task_data
    for task in dict.fromkeys(spec.task for spec in specs.values()):
        ensure_task_data(task, data_dir)  # before the suite pretrains every workload's models
    resume = {w: bool(opts.resume) and tracking.Sweep(uri, f"{suite.name}_{w}", create=False).find(None) is not None
              for w in specs}
    if opts.resume and not any(resume.values()):
        raise UserError(f"nothing to resume: no sweep of suite {suite.name} in {uri}; drop --resume")
    init_ray(opts.address)
    install_sigterm(lambda: ACTIVE.get("abort", lambda: interrupted(argv, name))())
    import ray
    resources = {w: plan_resources(opts, spec, ray.cluster_resources()) for w, spec in specs.items()}
    plans = {w: Plan(spec, device="cuda" if resources[w][1] > 0 else "cpu", data_dir=data_dir, cache_dir=cache_dir)
             for w, spec in specs.items()}
    points = {w: plan.search_points() for w, plan in plans.items()}
    meter = Meter(concurrent=max(r[2] for r in resources.values()))
    meter.planned = {w: planned_trials(spec, search_total(spec, points[w])) for w, spec in specs.items()}
    print(f"suite {suite.name}: {len(specs)} workloads ({', '.join(specs)}), ~{sum(meter.planned.values())} trials "
          f"at most, {meter.concurrent} at once", flush=True)
    try:
        wkeys = {w: plan.pretrain_keys(plan.stage_points(points[w], sweep_seeds(plan.spec)))
                 for w, plan in plans.items()}
        cpus, gpus, _ = next(iter(resources.values()))
        t_pre, metas = pretrain_on_cluster({k: p for ks in wkeys.values() for k, p in ks.items()}, cache_dir, cpus,
                                           gpus, opts.quiet, meter)
        meter.prior_s = {w: p for w, spec in specs.items()
                         if (p := trial_prior_s(spec, [metas.get(k) for k in wkeys[w]])) is not None}
        print(f"suite {suite.name}: {len(metas)} pretrained checkpoints ready in {_dur(t_pre)}", flush=True)
        codes, walls = {}, {}
        for w, spec in specs.items():
            t = time.perf_counter()
            say(meter, f"\n=== suite {suite.name}: workload {w} ({list(specs).index(w) + 1}/{len(specs)}) | "
                       f"{meter.line()}")
            code = run_sweep(name, replace(opts, experiment=f"{suite.name}_{w}", resume=resume[w]), argv,
                             spec=spec, meter=meter, suite=SuiteRun(suite.name, command, w))
            meter.planned[w] = meter.done.get(w, 0)
            codes[w], walls[w] = code, time.perf_counter() - t
            if code == 130:
                return 130
    except KeyboardInterrupt:
        return interrupted(argv, name)
    return suite_summary(suite.name, command, meter, walls, codes, storage, uri)


def suite_summary(name, command, meter: Meter, walls: dict, codes: dict, storage: Path, uri: str) -> int:
    meter.close()
    wall = time.perf_counter() - meter.t0
    capacity = wall * meter.concurrent
    share = max(0.0, 1 - meter.busy_s / capacity) if capacity > 0 else 0.0
    out = {"suite": name, "command": command, "wall_s": wall, "concurrent": meter.concurrent,
           "busy_s": meter.busy_s, "harness_share": share, "workload_wall_s": walls,
           "trials": dict(meter.done), "exit_codes": codes}
    storage.mkdir(parents=True, exist_ok=True)
    path = storage / f"{name}_summary_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\nsuite {name}: {sum(meter.done.values())} trials in {_dur(wall)} wall "
          f"({', '.join(f'{w} {_dur(s)}' for w, s in walls.items())})")
    print(f"harness overhead: {100 * share:.1f}% of {meter.concurrent} slots × {_dur(wall)} (busy in trials and "
          f"pretraining: {_dur(meter.busy_s)} slot-time; the rest is Ray/actor start-up, MLflow, stage barriers "
          f"and idle slots) → {path}")
    print(f"report: python -m analysis.report --suite {name} --tracking-uri {uri}")
    return max(codes.values(), default=0)


def _empty():
    import pandas as pd
    return pd.DataFrame()


def pin_code(sweep, previous) -> str:
    """The code fingerprint this driver's trials must run (tags `code_sha256`, `git_dirty` on the parent and every
    child). On --resume after an edit: one warning line and the parent tag `code_changed_on_resume`; trials from
    then on run (and record) the new code."""
    code = code_fingerprint()
    sweep.code = {"code_sha256": code, "git_dirty": git_dirty()}
    started = previous.data.tags.get("code_sha256") if previous is not None else None
    if started and started != code:
        print(f"warning: the code changed since this sweep started (code_sha256 {started[:12]} → {code[:12]}); "
              f"the trials run from now on use the new code and record its hash", file=sys.stderr, flush=True)
        sweep.code["code_changed_on_resume"] = "true"
    return code


def resume_args(argv, name) -> list[str]:
    args = list(argv if argv is not None else sys.argv[1:]) or [name]
    if "--resume" not in args:
        args.append("--resume")
    return args


def interrupted(argv, name) -> int:
    print(f"interrupted; continue with: python -m profit_bench.sweep {shlex.join(resume_args(argv, name))}",
          file=sys.stderr, flush=True)
    return 130


# ---------------------------------------------------------------------------------------------- faults
def claim_sweep_dir(storage: Path, experiment: str, now: datetime | None = None) -> Path:
    """A new folder for one sweep, created atomically (os.mkdir fails when it exists): two launches of one
    experiment in the same second get `NAME_<time>` and `NAME_<time>-2`, never one shared Ray folder and Optuna
    db. The folder's name is the sweep's identity (parent tag `sweep_dir`, Optuna study prefix)."""
    storage.mkdir(parents=True, exist_ok=True)
    base = f"{safe_name(experiment, 'experiment')}_{(now or datetime.now()).strftime('%Y-%m-%d_%H-%M-%S')}"
    for i in range(1, 1000):
        path = storage / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"{storage}: 999 sweeps of {experiment!r} started in one second; wait a second")


DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT


def disk_full(exc: BaseException) -> OSError | None:
    """The OSError 'no space left' (or quota exceeded) behind `exc`, following causes, contexts and Ray's
    wrapped task errors; None when the failure is something else."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and getattr(e, "errno", None) in DISK_FULL_ERRNOS:
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def disk_full_line(err: OSError, fallback: str) -> str:
    """'disk full writing PATH (N MB free on that file system)'."""
    import shutil
    path = Path(err.filename or fallback).resolve()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 1024 ** 2:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return f"disk full writing {path} ({free} on that file system; {err.strerror or err})"


def report(children, metrics, exp_dir, experiment, uri, wall) -> int:
    counts = {k[2:]: int(v) for k, v in metrics.items() if k.startswith("n_")}
    print(f"\n{len(children)} runs in {wall:.0f}s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"Ray Tune results: {exp_dir}")
    print(f"MLflow: experiment {experiment!r} in {uri}")
    if uri.startswith("sqlite:"):
        exp_id = children[0].info.experiment_id if children else None
        print(f"  open it: mlflow ui --backend-store-uri {uri}   (then "
              f"{ui_link(exp_id) if exp_id else 'http://127.0.0.1:5000'})")
    print(f"  report:  python -m analysis.report --experiment {shlex.quote(experiment)} --tracking-uri {uri}")
    failed = sum(v for k, v in counts.items() if k.endswith("_failed"))
    if children and failed == len(children):
        print(f"error: every trial failed ({failed} of {len(children)}); see the MLflow tag `error`",
              file=sys.stderr)
        return 1
    return 0


def ui_link(exp_id, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table in `mlflow ui`: MLflow 3.17 opens its GenAI overview unless the URL (or the
    browser's stored GenAI / Model training switch) says machine_learning; it does not read mlflow.experimentKind."""
    return f"{base}/#/experiments/{exp_id}?workflowType=machine_learning"


def dry_run(plan: Plan, opts, experiment, uri) -> int:
    import torch
    spec = plan.spec
    points = plan.search_points()
    total = search_total(spec, points)
    cluster = {"CPU": os.cpu_count(), "GPU": torch.cuda.device_count()}
    if opts.address:
        init_ray(opts.address)
        import ray
        cluster = ray.cluster_resources()
    cpus, gpus, concurrent = plan_resources(opts, spec, cluster)
    print(f"sweep {spec.name}: task {spec.task}, {spec.search} search, objectives "
          f"{', '.join(spec.objectives)}, budget {spec.budget}, trial settings {spec.trial}")
    if spec.trial.get("toy_variant"):
        from profit_bench.tasks import TOY_VARIANTS
        print(f"toy_variant {spec.trial['toy_variant']}: {TOY_VARIANTS.get(spec.trial['toy_variant'])}")
    print(f"resources: {cpus:g} CPU + {gpus:g} GPU per trial, at most {concurrent} at once; "
          f"device {'cuda' if gpus > 0 else 'cpu'}")
    print(f"ray: {opts.storage_path}/{experiment}_<timestamp>; mlflow: {uri} experiment {experiment}")
    from profit_bench.tasks import describe_task_data
    for line in describe_task_data(spec.task, opts.data_dir):
        print(line)
    if points is not None:
        print(f"{len(points)} search trials (grid, every arm its whole grid):")
        for p in points:
            print(f"  {p.arm} model={p.model} seed={p.seed} {p.params}")
    else:
        per = (f"{spec.num_samples} per arm" if spec.trials_per_dim is None else
               f"{spec.trials_per_dim} per searched dimension")
        print(f"{total} search trials ({per}, {spec.sampler}, sampler seed per arm from seed {spec.seeds[0]} and "
              f"the arm label, a scrambled-Sobol start; seeds {spec.seeds}):")
        for a in spec.arms:
            n = spec.arm_trials(a)
            print(f"  {a.label} on {a.models}: {n} trials ({space_filling_count(n)} Sobol, seed "
                  f"{arm_seed(spec.seeds[0], a.label)}), fixed {a.fixed}, search {a.space}")
    print(f"confirmation: {spec.confirm_seeds} fresh seeds per chosen configuration"
          if spec.confirm_seeds else "confirmation: off")
    return 0


# ---------------------------------------------------------------------------------------------- CLI
SMALL_CPU_RUN = "--set budget.epochs=1 --set trial.limit=1000 --set seeds=[0]"  # as in the README


def known_sweeps() -> list[str]:
    """The sweeps and suites in sweeps/, as `--help` lists them."""
    from profit_bench.spec import SWEEPS_DIR
    return sorted(x.stem for x in SWEEPS_DIR.glob("*.yaml"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profit_bench.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Spec overrides: --set budget.epochs=1 --set seeds=[0] "
                                       "--set 'methods.profit.n_ref={int: [1, 2]}'. `--set budget.X=N` replaces "
                                       "the budget. A small CPU run of any table: "
                                       f"{SMALL_CPU_RUN} --confirm-seeds 2.")
    p.add_argument("name", help=f"a sweep or suite in sweeps/ ({', '.join(known_sweeps())}) or a path to a YAML "
                                "file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="edit the spec: dotted key, YAML value (repeatable)")
    p.add_argument("--num-samples", type=int, help="Optuna trials per arm (grid: repeats of the grid)")
    p.add_argument("--trials-per-dim", type=int, help="Optuna: every arm gets N × its searched dimensions trials "
                                                      "(equal budget per dimension) instead of --num-samples")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: spec, else CPUs / cpus-per-trial)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (0.25 = 4 per GPU); "
                                                         "default: the cluster's GPUs shared by concurrent trials")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (= torch threads); default CPUs / concurrent")
    p.add_argument("--address", help="join a running Ray cluster: auto or host:port (default: start a local one)")
    p.add_argument("--storage-path", default="ray_results", help="Ray Tune results folder (default ./ray_results); "
                                                                 "shared storage on a multi-node cluster")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default "
                                                                         "sqlite:///mlflow.db in this folder)")
    p.add_argument("--experiment", help="MLflow experiment and Ray run name (default: the spec's name)")
    p.add_argument("--data-dir", help="dataset folder (CIFAR / Fashion-MNIST), present on every node")
    p.add_argument("--cache-dir", help="pretrained-model cache, shared with `trial` (default: $PROFIT_BENCH_CACHE "
                                       "or ~/.cache/profit_bench; with --address STORAGE_PATH/pretrain_cache); on "
                                       "a cluster a folder every node reads, or a pyarrow.fs URI (s3://, gs://, ...)")
    p.add_argument("--workloads", type=lambda v: [w for w in v.split(",") if w],
                   help="a suite only: run these workloads (comma-separated labels), in the suite's order")
    p.add_argument("--seed", type=int, help="search with this seed only (replaces the spec's seeds) and seed "
                                            "the samplers with it")
    p.add_argument("--confirm-seeds", type=int, help="fresh seeds per confirmed configuration (default: spec, 5)")
    p.add_argument("--no-confirm", action="store_true", help="search only, no confirmation stage")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted sweep of this experiment")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; run and write nothing")
    p.add_argument("--quiet", action="store_true", help="no pretraining lines")
    p.add_argument("--verbose", type=int, default=0, help="Ray Tune's own console output 0-3 (default 0: off; "
                                                          "1: its status table; the progress bar and one line per "
                                                          "trial are always shown)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    kw = {f.name: getattr(args, f.name) for f in fields(Options) if getattr(args, f.name, None) is not None}
    kw["overrides"] = tuple(args.overrides)
    opts = Options(**kw)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter: silent at verbose 0, a table at 1
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not "Creating initial MLflow database tables..."
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a hard kill loses at most ~2 s of Tune's state
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        from profit_bench.spec import is_suite
        if is_suite(args.name):
            return run_suite(args.name, opts, argv)
        if opts.workloads:
            raise UserError(f"--workloads is for suites; {args.name} is one sweep")
        return run_sweep(args.name, opts, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(argv, args.name)
    except Exception as e:  # noqa: BLE001 - only a full disk is turned into one line; the rest propagates
        full = disk_full(e)
        if full is None:
            raise
        print(f"error: {disk_full_line(full, opts.storage_path)}; free space, then continue with: python -m "
              f"profit_bench.sweep {shlex.join(resume_args(argv, args.name))}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
