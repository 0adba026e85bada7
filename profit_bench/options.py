"""The sweep command's options: what a user can pass, checked before anything starts, and what each means for the
spec (--seed, --num-samples, ...), the resources per trial and the pretraining cache. No Ray."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from profit_bench import UserError
from profit_bench.spec import SweepSpec, load_spec


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


def resolve_cache_dir(opts: Options, storage: Path) -> str:
    """--cache-dir; else on one machine the cache `trial` uses too ($PROFIT_BENCH_CACHE or ~/.cache/profit_bench),
    so checkpoints are shared; on a cluster (--address) STORAGE_PATH/pretrain_cache, which every node reads."""
    if opts.cache_dir is not None and "://" in opts.cache_dir:  # a pyarrow.fs URI (pretrain.local_cache)
        return opts.cache_dir
    if opts.cache_dir is None and not opts.address:
        from profit_bench.pretrain import default_cache_dir
        return str(Path(default_cache_dir()).resolve())
    return str(Path(opts.cache_dir or storage / "pretrain_cache").resolve())
