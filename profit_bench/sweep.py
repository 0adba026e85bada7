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
import json
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from profit_bench import UserError, safe_name
from profit_bench.console import Meter, duration, print_plan, report, say, suite_summary
from profit_bench.faults import (check_code, claim_sweep_dir, disk_full, disk_full_line, install_sigterm, interrupted,
                                 pin_code, resume_args)
from profit_bench.options import (Options, apply_options, check_options, plan_resources, resolve_cache_dir,
                                  resolve_spec)
from profit_bench.plan import (Plan, Point, all_done, arm_saturation, objective_modes, planned_trials, search_total,
                               stage_frame, sweep_seeds, trial_prior_s, trials_per_arm_text)
from profit_bench.spec import SweepSpec, load_spec

FAIL_ENV = "PROFIT_BENCH_FAIL_ARM"  # test hook: trials of this arm label raise before training
__all__ = ["Options", "run_sweep", "main", "load_spec"]


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


# ---------------------------------------------------------------------------------------------- pretraining
def _pretrain_one(cfg, old_stats: tuple, cache_dir: str, progress: bool) -> tuple[str, str, float, dict]:
    """One (task, model, seed, config) checkpoint (+ the old-task statistics `old_stats`, (name, n) pairs, its
    trials' methods declared) for the resolved TrialConfig `cfg` (a Point's config); a Ray task. Returns the checkpoint's path, the id of the node that built
    it, the seconds it took and its metadata."""
    import ray
    import torch

    from profit_bench import pretrain
    t0 = time.perf_counter()
    device = "cuda" if cfg.device == "cuda" and torch.cuda.is_available() else "cpu"
    path = pretrain.ensure_pretrained(cfg.task, cfg.model, cfg.seed, pretrain.pretrain_config_for(cfg), cache_dir,
                                      data_dir=cfg.data_dir, device=device, limit=cfg.limit,
                                      old_stats=old_stats, progress=progress)
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
    # A checkpoint built with old-task statistics also serves a key that needs a subset of them.
    built = {k[:4]: (set(k[4]), meta) for k, meta in known.items()}
    out = {k: built[k[:4]][1] for k in keys if k[:4] in built and set(k[4]) <= built[k[:4]][0]}
    todo = {k: p for k, p in keys.items() if k not in out}
    rank = {m: i for i, m in enumerate(PRETRAIN_ORDER)}
    todo = dict(sorted(todo.items(), key=lambda kv: rank.get(kv[0][1], len(rank))))
    task = ray.remote(_pretrain_one).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    refs = {task.remote(p.config, k[4], cache_dir, not quiet): k for k, p in todo.items()}
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
                       f"{duration(time.perf_counter() - t0)} elapsed) → {path}")
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------------------------------------- driver helpers
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

    from profit_bench import raytune
    ctx = replace(ctx, done=logger.done_results())
    logger.trials = []  # filled by this stage's callbacks
    trainable = tune.with_resources(tune.with_parameters(train_trial, ctx=ctx), {"cpu": cpus, "gpu": gpus})
    callbacks = [logger, raytune.TuneProgress(plan, stage.total, stage.name, meter, workload)]
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
                           tune_config=raytune.tune_config(plan, modes, concurrent, stage.exp_dir, stage.points),
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
            from profit_bench.raytune import close_orphan_optuna_trials
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
        print(f"suite {suite.name}: {len(metas)} pretrained checkpoints ready in {duration(t_pre)}", flush=True)
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


def _empty():
    import pandas as pd
    return pd.DataFrame()


def dry_run(plan: Plan, opts, experiment, uri) -> int:
    """--dry-run: the resources this sweep would get (the cluster's with --address) and its plan."""
    import torch
    spec = plan.spec
    cluster = {"CPU": os.cpu_count(), "GPU": torch.cuda.device_count()}
    if opts.address:
        init_ray(opts.address)
        import ray
        cluster = ray.cluster_resources()
    cpus, gpus, concurrent = plan_resources(opts, spec, cluster)
    print_plan(plan, cpus, gpus, concurrent, opts.storage_path, experiment, uri, opts.data_dir)
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
