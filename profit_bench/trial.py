"""One fine-tuning trial: pretrained model → method → (PROFIT-wrapped) optimizer → train → evaluate.

    python -m profit_bench.trial --task toy --method profit            # prints the result as JSON

`run_trial(cfg, report)` is what the sweep calls. It holds the project's one training loop, `train_steps`,
which pretrain.py uses as well.

Budgets and schedules count *main* steps. A PROFIT main step closes a cycle of n_ref reference steps + 1 main
step, i.e. it consumes n_ref + 1 batches; the paper counts one such cycle as one "step", so the toy budget
(1500 steps), `eval_every` and the StepLR period are in main steps and the scheduler steps once per main step.
For image tasks the budget is in epochs, an epoch being one pass over the new-train batches (whatever the
optimizer does with them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import sys
import time
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Callable

import torch

from profit_bench import UserError
from profit_bench.methods import OPTIMIZERS, get_method, make_optimizer
from profit_bench.optim import MEMORY_MODES
from profit_bench.pretrain import default_cache_dir, default_pretrain_config, load_or_pretrain
from profit_bench.tasks import evaluate, get_task

DTYPES = ("fp32", "bf16")
SCHEDULERS = ("none", "step", "cosine")


@dataclass
class TrialConfig:
    task: str = "toy"
    model: str | None = None            # None → task default (toy: mlp)
    seed: int = 0
    method: str = "full"                # full | head | profit | whatever baselines/ registers
    optimizer: str | None = None        # main optimizer: sgd | adam | adamw | rmsprop | lookahead | adan
    lr: float | None = None
    weight_decay: float | None = None   # None → 0 (adamw: 1e-2)
    scheduler: str | None = None        # none | step | cosine; steps once per *main* step
    step_size: int | None = None        # StepLR period in main steps
    gamma: float | None = None          # StepLR decay factor
    steps: int | None = None            # budget in main steps (toy default) ...
    epochs: int | None = None           # ... or in epochs of new-train (image default)
    batch_size: int | None = None
    eval_every: int | None = None       # evaluate + report every N main steps; None → after every epoch
    profit: bool = False                # train through PROFIT(main optimizer); method "profit" forces it
    ratio: float = 100.0                # PROFIT λ_main / λ_ref
    n_ref: int = 1                      # PROFIT reference steps per cycle
    profit_memory: str = "full"         # PROFIT θ_ref: "full" | "compact" (both exact) | "low" (approximate; optim.py)
    warmup_epochs: int = 0              # paper Table 13: first epochs with AdamW, then the configured optimizer
    lookahead_alpha: float = 0.5        # C.2.5; with k=1 this is the base optimizer at half step size
    lookahead_k: int = 1
    lookahead_base: str = "adam"
    method_args: dict = field(default_factory=dict)  # for baselines, e.g. {"lora_r": 8}
    pretrain_steps: int | None = None   # override the task's pretraining budget (changes the cache key)
    pretrain_epochs: int | None = None
    device: str = "auto"                # cpu | cuda | auto
    dtype: str = "fp32"                 # fp32 | bf16 (autocast)
    compile: bool = False               # torch.compile the model (CUDA; the first epoch pays for compilation)
    data_dir: str | None = None
    cache_dir: str | None = None        # None → $PROFIT_BENCH_CACHE or ~/.cache/profit_bench
    limit: int | None = None            # subsample every split to this many examples (smoke tests)


# Toy = paper C.1: RMSProp 5e-4, ×0.95 every 100 steps, 1500 steps, batch 32 (the paper does not give the batch
# size; 32 reproduces its baseline rows). Images = C.2.5's Adam 1e-4 with CPU-sized epochs. digits is not in the
# paper: a tiny offline CI task; its numbers are sized so a trial takes seconds on one CPU core.
TASK_DEFAULTS = {
    "toy": dict(model="mlp", optimizer="rmsprop", lr=5e-4, scheduler="step", step_size=100, gamma=0.95,
                steps=1500, batch_size=32, eval_every=100),
    "digits": dict(model="mlp", optimizer="adam", lr=1e-3, scheduler="none", epochs=20, batch_size=64),
    "fmnist": dict(model="resnet18", optimizer="adam", lr=1e-4, scheduler="none", epochs=10, batch_size=128),
    "cifar": dict(model="resnet18", optimizer="adam", lr=1e-4, scheduler="none", epochs=10, batch_size=128),
}


def resolve(cfg: TrialConfig) -> TrialConfig:
    """Fill the None fields with the task's defaults and check the values a user can get wrong."""
    d = TASK_DEFAULTS.get(cfg.task, TASK_DEFAULTS["cifar"])
    if cfg.steps is not None and cfg.epochs is not None:
        raise UserError("set either steps or epochs, not both")
    budget_given = cfg.steps is not None or cfg.epochs is not None
    filled = {k: v for k, v in d.items()
              if getattr(cfg, k) is None and not (k in ("steps", "epochs") and budget_given)}
    cfg = replace(cfg, **filled)
    if cfg.weight_decay is None:
        cfg = replace(cfg, weight_decay=1e-2 if cfg.optimizer == "adamw" else 0.0)
    cfg = replace(cfg, step_size=cfg.step_size or 1, gamma=1.0 if cfg.gamma is None else cfg.gamma)
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {cfg.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.profit_memory not in MEMORY_MODES:
        raise UserError(f"unknown profit_memory {cfg.profit_memory!r}; choose {', '.join(MEMORY_MODES)}")
    if cfg.lr < 0 or cfg.ratio <= 0 or cfg.n_ref < 1 or cfg.batch_size < 1:
        raise UserError("need lr >= 0, ratio > 0, n_ref >= 1 and batch_size >= 1")
    if cfg.warmup_epochs and cfg.epochs is None:
        raise UserError("warmup_epochs needs an epochs budget (set --epochs instead of --steps)")
    if cfg.epochs is not None and cfg.warmup_epochs > cfg.epochs:
        raise UserError(f"warmup_epochs ({cfg.warmup_epochs}) exceeds epochs ({cfg.epochs})")
    return cfg


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda asked for but no CUDA GPU is visible; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use cpu, cuda or auto")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class LoopState:
    epoch: int = 0          # completed epochs
    batches: int = 0        # optimizer.step() calls (PROFIT: reference + main)
    main_steps: int = 0
    step_times: list = field(default_factory=list)
    diverged: bool = False


def make_lr_factor(scheduler: str, step_size: int, gamma: float, total_main_steps: int) -> Callable[[int], float]:
    """lr multiplier as a function of main steps taken (StepLR / cosine / constant)."""
    if scheduler == "step":
        return lambda s: gamma ** (s // max(step_size, 1))
    if scheduler == "cosine":
        return lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(total_main_steps, 1), 1.0)))
    return lambda s: 1.0


def train_steps(model, opt, split, *, head: str, loss_fn, batch_size: int, generator: torch.Generator,
                augment, state: LoopState, lr_factor, max_main_steps=None, max_epochs=None, eval_every=None,
                on_eval=None, dtype="fp32", channels_last=False) -> LoopState:
    """Train `model(x, task=head)` on `split` until `state` reaches max_main_steps or max_epochs (absolute counts).

    Each epoch draws a fresh permutation from `generator` (on the data's device) and slices batches from the
    device tensors; `augment(x, generator)` runs batched on the device. After a main step (any step of a plain
    optimizer; PROFIT's `is_main_step`), the lr of every group becomes initial_lr × lr_factor(main_steps).
    `on_eval(opt, state, mean_train_loss) -> bool` runs every `eval_every` main steps, or after each epoch when
    eval_every is None; returning False (e.g. non-finite metrics) stops the loop with state.diverged set.

    On CUDA the loop never waits for the GPU: batch times come from CUDA events read at evaluation time, the
    training loss is summed on the device, and divergence is checked at each evaluation.
    """
    device = split.x.device
    cuda = device.type == "cuda"
    events = []  # CUDA (start, end) event pairs, resolved into state.step_times when the host syncs anyway

    def collect_times():
        if events:
            events[-1][1].synchronize()
            state.step_times.extend(a.elapsed_time(b) / 1e3 for a, b in events)
            events.clear()
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext())
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])

    def set_lr():
        f = lr_factor(state.main_steps)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * f

    def done():
        return ((max_main_steps is not None and state.main_steps >= max_main_steps)
                or (max_epochs is not None and state.epoch >= max_epochs))

    def evaluate_now():
        collect_times()
        mean = (loss_sum / max(n_loss, 1)).item()
        ok = math.isfinite(mean) and (on_eval is None or on_eval(opt, state, mean) is not False)
        state.diverged = not ok
        return ok

    set_lr()
    model.train()
    n = len(split)
    while not done():
        loss_sum, n_loss = torch.zeros((), device=device), 0
        perm = torch.randperm(n, generator=generator, device=generator.device).to(device)
        for i in range(0, n, batch_size):
            if cuda:
                events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                events[-1][0].record()
            else:
                t0 = time.perf_counter()
            idx = perm[i:i + batch_size]
            x, y = augment(split.x[idx], generator), split.y[idx]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                loss = loss_fn(model(x, task=head).float(), y)
            loss.backward()
            main = getattr(opt, "is_main_step", True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.batches += 1
            if cuda:
                events[-1][1].record()
            else:
                state.step_times.append(time.perf_counter() - t0)
            loss_sum += loss.detach()
            n_loss += 1
            if not cuda and not math.isfinite(loss.item()):  # free on CPU; on CUDA checked at each eval
                state.diverged = True
                return state
            if main:
                state.main_steps += 1
                set_lr()
                if eval_every and state.main_steps % eval_every == 0:
                    if not evaluate_now():
                        return state
                    loss_sum, n_loss = torch.zeros((), device=device), 0
                    model.train()
                if done():
                    collect_times()
                    return state
        state.epoch += 1
        if not eval_every and not evaluate_now():
            return state
        model.train()
    collect_times()
    return state


# ---------------------------------------------------------------------------------------------- the trial
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a long-lived worker measures each trial afresh (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_trial(cfg: TrialConfig | dict, report: Callable[[dict], None] | None = None, *, return_model=False):
    """Fine-tune a pretrained model per `cfg` and return the result dict (keys in docs/architecture.md).

    `report(dict)` is called at every evaluation (after each epoch, or every `eval_every` main steps) with
    epoch, step (batches), main_steps, old/new metric and loss, train_loss. A PROFIT model is evaluated at
    θ_ref (`anchored()`) and left there at the end (`finish()`).

    `forgetting` is signed so that positive always means worse on the old task: old_before - old_after for
    accuracy, old_after - old_before for MSE.

    `peak_mem_bytes`: CUDA max_memory_allocated during fine-tuning; on CPU the growth of the process's peak RSS
    over fine-tuning (VmHWM, reset at the start of the trial through /proc/self/clear_refs, so a reused worker
    measures each trial afresh; where that file is missing it falls back to ru_maxrss, which cannot be reset).

    A non-finite loss or metric stops training and returns status "diverged" (metrics as last evaluated).
    `return_model=True` returns (result, fine-tuned model) instead, for tests and notebooks.
    """
    if isinstance(cfg, dict):
        unknown = set(cfg) - {f.name for f in fields(TrialConfig)}
        if unknown:
            raise UserError(f"unknown trial config keys {sorted(unknown)}; valid keys: "
                            f"{', '.join(f.name for f in fields(TrialConfig))}")
        cfg = TrialConfig(**cfg)
    t_start = time.perf_counter()
    cfg = resolve(cfg)
    device = pick_device(cfg.device)
    method = get_method(cfg.method, cfg.model)  # fail on a bad method before any data loads or training runs
    use_profit = cfg.profit or method.profit
    cfg = replace(cfg, profit=use_profit)  # the recorded config says what actually ran
    if use_profit:
        from profit_bench.optim import PROFIT
    task = get_task(cfg.task, data_dir=cfg.data_dir, device=device, seed=cfg.seed, limit=cfg.limit)
    pcfg = default_pretrain_config(task.name, steps=cfg.pretrain_steps, epochs=cfg.pretrain_epochs,
                                   limit=cfg.limit, dtype=cfg.dtype)
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir()
    model = load_or_pretrain(task, cfg.model, cfg.seed, pcfg, cache_dir)
    old_before, _ = evaluate(model, task, "old")
    new_before, _ = evaluate(model, task, "new")

    # Reseed: fine-tuning must not depend on whether pretraining ran in this process or came from the cache.
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = 0
    else:
        _reset_peak_rss()
        mem0 = _peak_rss_bytes()

    model, params = method.prepare(model, cfg)
    params = list({id(p): p for p in params}.values())
    channels_last = device.type == "cuda" and cfg.model == "resnet18"  # NHWC convolutions on tensor cores
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.backbone.compile()  # in place: parameters and state_dict keys stay as they are
    n_trainable = sum(p.numel() for p in params)
    main_opt = make_optimizer(cfg.optimizer, params, cfg)
    opt = PROFIT(main_opt, ratio=cfg.ratio, n_ref=cfg.n_ref, memory=cfg.profit_memory) if use_profit else main_opt

    batches_per_epoch = -(-len(task.new_train) // cfg.batch_size)
    per_main = cfg.n_ref + 1 if use_profit else 1
    if cfg.steps is not None:
        total_main = cfg.steps
    else:  # warmup batches are main steps of AdamW; the rest run at per_main batches per main step
        total_main = cfg.warmup_epochs * batches_per_epoch + \
            (cfg.epochs - cfg.warmup_epochs) * batches_per_epoch // per_main
    lr_factor = make_lr_factor(cfg.scheduler, cfg.step_size, cfg.gamma, total_main)

    history = []

    def on_eval(active_opt, state, train_loss):
        with getattr(active_opt, "anchored", contextlib.nullcontext)():
            old_metric, old_loss = evaluate(model, task, "old")
            new_metric, new_loss = evaluate(model, task, "new")
        rec = dict(epoch=state.epoch, step=state.batches, main_steps=state.main_steps, old_metric=old_metric,
                   new_metric=new_metric, old_loss=old_loss, new_loss=new_loss, train_loss=train_loss)
        history.append(rec)
        if report is not None:
            report(rec)
        return all(math.isfinite(v) for v in (old_loss, new_loss, train_loss))

    loop = dict(head="new", loss_fn=task.loss, batch_size=cfg.batch_size, generator=gen, augment=task.augment,
                lr_factor=lr_factor, eval_every=cfg.eval_every, on_eval=on_eval, dtype=cfg.dtype,
                channels_last=channels_last)
    state = LoopState()
    if cfg.warmup_epochs:
        wd = cfg.weight_decay if cfg.optimizer == "adamw" else 1e-2
        warm = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)
        train_steps(model, warm, task.new_train, state=state, max_epochs=cfg.warmup_epochs, **loop)
        del warm
    if not state.diverged:
        train_steps(model, opt, task.new_train, state=state, max_main_steps=cfg.steps, max_epochs=cfg.epochs,
                    **loop)
    if use_profit:
        opt.finish()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_mem = torch.cuda.max_memory_allocated(device)
    else:
        peak_mem = max(_peak_rss_bytes() - mem0, 0)

    old_metric, old_loss = evaluate(model, task, "old")
    new_metric, new_loss = evaluate(model, task, "new")
    diverged = state.diverged or not all(math.isfinite(v) for v in (old_loss, new_loss))
    sign = 1.0 if task.higher_is_better else -1.0  # positive forgetting = worse on the old task
    config = asdict(cfg)
    config["step_unit"] = ("main steps: a PROFIT main step = n_ref reference + 1 main batch; scheduler, steps "
                           "and eval_every count main steps")
    result = dict(
        status="diverged" if diverged else "ok",
        old_metric=old_metric, new_metric=new_metric, old_loss=old_loss, new_loss=new_loss,
        old_before=old_before, new_before=new_before, forgetting=sign * (old_before - old_metric),
        metric=task.metric, higher_is_better=task.higher_is_better,
        peak_mem_bytes=int(peak_mem),
        step_time_median_s=statistics.median(state.step_times) if state.step_times else float("nan"),
        wall_time_s=time.perf_counter() - t_start,
        n_trainable=n_trainable, profit_state_bytes=opt.extra_state_bytes() if use_profit else 0,
        main_steps=state.main_steps, batches=state.batches, epochs_done=state.epoch,
        profit=use_profit, device=str(device), history=history, config=config,
    )
    return (result, model) if return_model else result


# ---------------------------------------------------------------------------------------------- CLI
def _arg_type(hint):
    """argparse type for a dataclass field annotation (X | None → X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is dict:
        return json.loads
    return base


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m profit_bench.trial", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(TrialConfig)
    for f in fields(TrialConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default)
        else:
            p.add_argument(flag, dest=f.name, type=_arg_type(hints[f.name]), default=default,
                           help=f"default: {default!r} (None = task default)" if default is None else
                           f"default: {default!r}")
    p.add_argument("--history", action="store_true", help="include the per-evaluation history in the JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrialConfig(**{f.name: getattr(args, f.name) for f in fields(TrialConfig)})

    def progress(rec):
        if not args.quiet:
            print(f"epoch {rec['epoch']} main_step {rec['main_steps']}: old {rec['old_metric']:.4g} "
                  f"new {rec['new_metric']:.4g} train_loss {rec['train_loss']:.4g}", file=sys.stderr, flush=True)

    try:
        result = run_trial(cfg, report=progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.history:
        result.pop("history")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
