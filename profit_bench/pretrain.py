"""A model converged on the old task, trained once and cached on disk for every trial that needs it.

Cache file: `<cache_dir>/<task>-<model>-s<seed>-<hash(PretrainConfig)>.pt` (a state_dict, loaded with
`weights_only=True`) plus a `.json` beside it with the config and the old-task metric it reached. Both are
written to a temp file in the same folder and `os.replace`d, so a concurrent reader sees either nothing or the
whole file; two processes pretraining the same key at once both succeed and the last rename wins (the two
files are identical: pretraining is seeded).

Pretraining uses the one training loop from trial.py (`train_steps`) on old-train, training backbone + old head.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from profit_bench.methods import make_optimizer
from profit_bench.tasks import TaskData, evaluate

CACHE_VERSION = 1  # bump when pretraining code changes in a way the config hash cannot see


@dataclass(frozen=True)
class PretrainConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    steps: int | None = None      # budget in optimizer steps (toy) ...
    epochs: int | None = None     # ... or in passes over old-train (images)
    batch_size: int = 128
    scheduler: str = "none"       # "none" | "step" | "cosine"
    step_size: int = 0            # StepLR period in steps
    gamma: float = 1.0            # StepLR decay
    weight_decay: float = 0.0
    limit: int | None = None      # the task's subsample size: different data, different weights
    dtype: str = "fp32"


# Paper C.1 (toy): RMSProp lr 1e-2, ×0.9 every 500 steps, 10 000 steps, batch 32.
# Paper C.2.5 (images): Adam lr 1e-4 for 200-400 epochs; the epoch defaults here are CPU-sized.
# digits (not in the paper; 8×8 sklearn set, ~900 old-train images) converges in seconds at Adam 1e-3.
PRETRAIN_DEFAULTS = {
    "toy": dict(optimizer="rmsprop", lr=1e-2, steps=10_000, batch_size=32, scheduler="step", step_size=500, gamma=0.9),
    "digits": dict(optimizer="adam", lr=1e-3, epochs=60, batch_size=64),
    "fmnist": dict(optimizer="adam", lr=1e-4, epochs=20, batch_size=128),
    "cifar": dict(optimizer="adam", lr=1e-4, epochs=20, batch_size=128),
}


def default_pretrain_config(task_name: str, **overrides) -> PretrainConfig:
    d = dict(PRETRAIN_DEFAULTS.get(task_name, PRETRAIN_DEFAULTS["cifar"]))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "steps" in overrides:
        d.pop("epochs", None)
    if "epochs" in overrides:
        d.pop("steps", None)
    d.update(overrides)
    return PretrainConfig(**d)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PROFIT_BENCH_CACHE", Path.home() / ".cache" / "profit_bench"))


def config_hash(pcfg: PretrainConfig) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **asdict(pcfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_path(task_name: str, model_name: str, seed: int, pcfg: PretrainConfig, cache_dir=None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{task_name}-{model_name}-s{seed}-{config_hash(pcfg)}.pt"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def pretrain(model, task: TaskData, pcfg: PretrainConfig, seed: int, progress=True) -> dict:
    """Train backbone + old head on old-train in place; return {old_metric, old_loss, steps, wall_time_s}."""
    from profit_bench.trial import LoopState, make_lr_factor, train_steps  # trial imports us: import late

    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.backbone.parameters()) + list(model.heads["old"].parameters())
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(pcfg.optimizer, params, pcfg)
    gen = torch.Generator(device=task.device).manual_seed(seed)
    batches_per_epoch = -(-len(task.old_train) // pcfg.batch_size)
    total = pcfg.steps if pcfg.steps is not None else pcfg.epochs * batches_per_epoch

    t0 = time.perf_counter()

    def show(opt_, state, train_loss):
        if progress:
            print(f"pretrain {task.name}: step {state.main_steps}/{total} train_loss {train_loss:.4g} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        return bool(torch.isfinite(torch.tensor(train_loss)))

    state = LoopState()
    train_steps(model, opt, task.old_train, head="old", loss_fn=task.loss, batch_size=pcfg.batch_size,
                generator=gen, augment=task.augment, state=state,
                lr_factor=make_lr_factor(pcfg.scheduler, pcfg.step_size, pcfg.gamma, total),
                max_main_steps=pcfg.steps, max_epochs=pcfg.epochs, eval_every=max(total // 10, 1), on_eval=show,
                dtype=pcfg.dtype)
    if state.diverged:
        raise RuntimeError(f"pretraining {task.name} diverged (non-finite loss); lower the pretraining lr")
    for p in model.parameters():
        p.requires_grad_(True)
    old_metric, old_loss = evaluate(model, task, "old")
    return dict(old_metric=old_metric, old_loss=old_loss, steps=state.main_steps,
                wall_time_s=time.perf_counter() - t0)


def load_or_pretrain(task: TaskData, model_name: str, seed: int, pcfg: PretrainConfig, cache_dir=None,
                     progress=True):
    """The TaskModel for (task, model, seed), converged on the old task: from the cache, else trained and cached."""
    from profit_bench.models import build_model  # imports timm (seconds): keep it off the CLI's error paths

    path = cache_path(task.name, model_name, seed, pcfg, cache_dir)
    model = build_model(model_name, task, seed).to(task.device)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location=task.device, weights_only=True))
        return model
    info = pretrain(model, task, pcfg, seed, progress=progress)
    meta = dict(task=task.name, model=model_name, seed=seed, config=asdict(pcfg), hash=config_hash(pcfg),
                metric=task.metric, **info)
    # JSON first: whoever sees the .pt can rely on the .json being there too.
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=2).encode()))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda f: torch.save(state, f))
    return model
