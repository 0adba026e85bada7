"""One fine-tuning trial: pretrained model → method → (PROFIT-wrapped) optimizer → train → evaluate.

    python -m profit_bench.trial --task toy --method profit            # prints the result as JSON

`run_trial(cfg, report)` is what the sweep calls; the training loop itself is `loop.train_steps`.

Budgets and schedules count *main* steps. A PROFIT main step closes a cycle of n_ref reference steps + 1 main
step, i.e. it consumes n_ref + 1 batches; the paper counts one such cycle as one "step", so the toy budget
(1500 steps), `eval_every` and the StepLR period are in main steps and the scheduler steps once per main step.
For image tasks the budget is in epochs, an epoch being one pass over the new-train batches (whatever the
optimizer does with them).

Evaluations during training read the validation splits only; the test splits are evaluated once, at the end
(and on the pretrained model, for the "before" numbers).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import numbers
import resource
import statistics
import sys
import time
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Callable

import torch

from profit_bench import UserError, protocol
from profit_bench.loop import LoopState, make_lr_factor, train_steps
from profit_bench.methods import (LOOKAHEAD_BASES, METHODS, OPTIMIZERS, MethodContext, default_weight_decay, get_method,
                                  make_optimizer)
from profit_bench.models import MLP_ACTIVATIONS, MLP_DEFAULTS, MLP_LAYERNORMS, MODELS, uses_channels_last
from profit_bench.optim import DELTA_MODES, MEMORY_MODES, PROFIT, REF_OPTIMIZERS
from profit_bench.pretrain import (before_metrics, cache_key, cache_path, default_cache_dir, load_or_pretrain,
                                   local_cache, old_stat, pretrain_config_for)
from profit_bench.tasks import TASKS, TOY_VARIANTS, ensure_task_data, evaluate, get_task, task_spec

DTYPES = ("fp32", "bf16")
SCHEDULERS = ("none", "step", "cosine")
SCHEDULE_UNITS = ("main", "batch")
LOW_MEMORY_OPTIMIZERS = ("sgd", "adam", "adamw", "adan")  # those with a first-moment buffer (optim.LowMemRef)


@dataclass
class TrialConfig:
    task: str = "toy"
    model: str | None = None            # None → the task's default model
    seed: int = 0
    method: str = "full"                # a name of methods.METHODS
    optimizer: str | None = None        # main optimizer: a name of methods.OPTIMIZERS
    lr: float | None = None
    weight_decay: float | None = None   # None → methods.default_weight_decay (adamw: 1e-2, else 0)
    scheduler: str | None = None        # none | step | cosine; steps once per *main* step
    step_size: int | None = None        # StepLR period in main steps
    gamma: float | None = None          # StepLR decay factor
    lr_schedule_unit: str | None = None  # "main" (default): step_size counts main steps; "batch": every batch
    steps: int | None = None            # budget in main steps (toy default) ...
    epochs: int | None = None           # ... or in epochs of new-train (image default)
    batch_size: int | None = None
    toy_variant: str | None = None      # a named reading of C.1 (tasks.TOY_VARIANTS): fills the knobs it names
    activation: str | None = None       # mlp: relu | tanh | gelu (default relu)
    layernorm: str | None = None        # mlp: before_act | after_act | none (default before_act)
    pretrain_batch_size: int | None = None  # override the task's pretraining batch (changes the cache key)
    eval_every: int | None = None       # evaluate + report every N main steps; None → after every epoch
    profit: bool = False                # train through PROFIT(main optimizer); method "profit" forces it
    ratio: float = 100.0                # PROFIT λ_main / λ_ref
    n_ref: int = 1                      # PROFIT reference steps per cycle
    ref_optimizer: str = "sgd"          # PROFIT O_ref (the paper's recommendation: plain SGD)
    ref_kwargs: dict = field(default_factory=dict)  # O_ref keyword arguments, e.g. {"momentum": 0.9}
    profit_memory: str = "full"         # PROFIT θ_ref: "full" | "compact" (both exact) | "low" (approximate; optim.py)
    profit_delta: str = "exact"         # PROFIT Δ: "exact" (as O_ref intended) | "weights" (θ − θ_ref, rounded)
    warmup_epochs: int = 0              # paper Table 13: first epochs with AdamW, then the configured optimizer
    lookahead_alpha: float = 0.5        # C.2.5; with k=1 this is the base optimizer at half step size
    lookahead_k: int = 1
    lookahead_base: str = "adam"
    method_args: dict = field(default_factory=dict)  # the method's knobs, e.g. {"lora_r": 8}; see Method.args
    pretrain_steps: int | None = None   # override the task's pretraining budget (changes the cache key)
    pretrain_epochs: int | None = None
    pretrain_lr: float | None = None    # override the task's pretraining lr (changes the cache key)
    pretrain_scheduler: str | None = None  # override the task's pretraining schedule: none | step | cosine
    pretrain_if_missing: bool = True    # False: a missing checkpoint is an error (the sweep pretrains up front)
    device: str = "auto"                # cpu | cuda | auto
    dtype: str = "fp32"                 # fp32 | bf16 (autocast)
    compile: bool = False               # torch.compile the model (CUDA; the first epoch pays for compilation)
    data_dir: str | None = None
    cache_dir: str | None = None        # None → $PROFIT_BENCH_CACHE or ~/.cache/profit_bench; or a pyarrow.fs URI
    limit: int | None = None            # subsample every split to this many examples (smoke tests)


# (low, high, low inclusive) of the numeric fields; None = unbounded. Checked after the defaults are filled in.
RANGES = {
    "seed": (0, None, True), "lr": (0, None, True), "weight_decay": (0, None, True), "step_size": (1, None, True),
    "gamma": (0, None, False), "steps": (1, None, True), "epochs": (1, None, True), "batch_size": (1, None, True),
    "eval_every": (1, None, True), "ratio": (0, None, False), "n_ref": (1, None, True),
    "warmup_epochs": (0, None, True), "lookahead_alpha": (0, 1, False), "lookahead_k": (1, None, True),
    "pretrain_steps": (1, None, True), "pretrain_batch_size": (1, None, True), "pretrain_epochs": (1, None, True),
    "pretrain_lr": (0, None, False),
    "limit": (1, None, True),
}
FIELD_VALUES = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "pretrain_scheduler": SCHEDULERS, "dtype": DTYPES,
           "profit_memory": MEMORY_MODES, "profit_delta": DELTA_MODES, "toy_variant": tuple(TOY_VARIANTS),
           "activation": tuple(MLP_ACTIVATIONS), "layernorm": MLP_LAYERNORMS, "lr_schedule_unit": SCHEDULE_UNITS,
           "ref_optimizer": REF_OPTIMIZERS, "lookahead_base": LOOKAHEAD_BASES, "model": MODELS}


def check_value(name: str, value, hint):
    """One field's value as a plain Python value, after checking its type (strict: 1.5 is not an int, True is not
    a number, nan/inf are not values; numpy scalars from a searcher are fine) and range."""
    if value is None:
        return None
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise UserError(f"{name} must be a whole number (got {value!r})")
        value = int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise UserError(f"{name} must be a finite number (got {value!r})")
        value = float(value)
    if base in (str, bool, dict) and not isinstance(value, base):
        raise UserError(f"{name} must be a {base.__name__} (got {value!r})")
    if name in RANGES:
        low, high, incl = RANGES[name]
        if value < low or (value == low and not incl) or (high is not None and value > high):
            bound = f"{'>=' if incl else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise UserError(f"{name} must be {bound} (got {value!r})")
    if name in FIELD_VALUES and value not in FIELD_VALUES[name]:
        raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(FIELD_VALUES[name])}")
    return value


def resolve(cfg: TrialConfig) -> TrialConfig:
    """Fill the None fields with the task's defaults and check every value a user can get wrong (before any data
    loads or anything trains)."""
    spec = task_spec(cfg.task)
    if cfg.steps is not None and cfg.epochs is not None:
        raise UserError("set either steps or epochs, not both")
    budget_given = cfg.steps is not None or cfg.epochs is not None
    if cfg.toy_variant is not None:  # the variant's values, where the config leaves the knob unset
        if cfg.task != "toy":
            raise UserError(f"toy_variant is a reading of the toy task's recipe (C.1), not of {cfg.task!r}")
        check_value("toy_variant", cfg.toy_variant, str)
        cfg = replace(cfg, **{k: v for k, v in TOY_VARIANTS[cfg.toy_variant].items() if getattr(cfg, k) is None})
    d = {**spec.finetune, "model": spec.default_model, **MLP_DEFAULTS, "lr_schedule_unit": "main"}
    filled = {k: v for k, v in d.items()
              if getattr(cfg, k) is None and not (k in ("steps", "epochs") and budget_given)}
    cfg = replace(cfg, **filled)
    if cfg.weight_decay is None:
        cfg = replace(cfg, weight_decay=default_weight_decay(cfg.optimizer))
    cfg = replace(cfg, step_size=cfg.step_size or 1, gamma=1.0 if cfg.gamma is None else cfg.gamma)
    hints = typing.get_type_hints(TrialConfig)
    cfg = replace(cfg, **{f.name: check_value(f.name, getattr(cfg, f.name), hints[f.name]) for f in fields(cfg)})
    if cfg.model != "mlp" and any(getattr(cfg, k) != v for k, v in MLP_DEFAULTS.items()):
        raise UserError(f"activation / layernorm are knobs of the mlp model only, not of {cfg.model!r}")
    method = get_method(cfg.method, cfg.model)
    method.resolve_args(cfg.method_args)  # unknown knobs fail here, not after pretraining
    cfg = replace(cfg, profit=cfg.profit or method.profit)  # the recorded config says what actually runs
    if cfg.profit and cfg.profit_memory == "low":
        if cfg.optimizer not in LOW_MEMORY_OPTIMIZERS:
            raise UserError(f"profit_memory 'low' needs a main optimizer with a first moment "
                            f"({', '.join(LOW_MEMORY_OPTIMIZERS)}), not {cfg.optimizer!r}; use profit_memory "
                            f"'full' or 'compact'")
        if cfg.ref_optimizer != "sgd" or cfg.ref_kwargs:
            raise UserError("profit_memory 'low' follows plain-SGD reference steps only; use ref_optimizer 'sgd' "
                            "without ref_kwargs, or profit_memory 'full'/'compact'")
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


def _mean_diagnostics(history: list[dict]) -> dict:
    """Each profit_* diagnostic averaged over the evaluation windows (each record holds one window's mean)."""
    keys = sorted({k for rec in history for k in rec if k.startswith("profit_")})
    return {k: statistics.fmean(v) if (v := [rec[k] for rec in history if k in rec]) else float("nan")
            for k in keys}


def _as_config(cfg: TrialConfig | dict) -> TrialConfig:
    if isinstance(cfg, TrialConfig):
        return cfg
    unknown = set(cfg) - {f.name for f in fields(TrialConfig)}
    if unknown:
        raise UserError(f"unknown trial config keys {sorted(unknown)}; valid keys: "
                        f"{', '.join(f.name for f in fields(TrialConfig))}")
    return TrialConfig(**cfg)


def run_trial(cfg: TrialConfig | dict, report: Callable[[dict], None] | None = None, *, return_model=False,
              progress=True):
    """Fine-tune a pretrained model per `cfg` and return the result dict (its keys: docs/architecture.md).

    `report(dict)` is called at every evaluation (after each epoch, or every `eval_every` main steps) with
    epoch, step (batches), main_steps, old_val, new_val, old_val_loss, new_val_loss, train_loss, and for
    PROFIT runs its diagnostics (profit_*, means over the steps since the last evaluation). A PROFIT model is
    evaluated at θ_ref (`anchored()`) and left there at the end (`finish()`).

    Final metrics are measured on validation and, once, on test; the "before" numbers are the pretrained model's.
    `forgetting_*` is signed so that positive always means worse on the old task: before − after for accuracy,
    after − before for MSE.

    `peak_mem_bytes`: CUDA max_memory_allocated during fine-tuning; on CPU the growth of the process's peak RSS
    over fine-tuning (VmHWM, reset at the start of the trial through /proc/self/clear_refs, so a reused worker
    measures each trial afresh; where that file is missing it falls back to ru_maxrss, which cannot be reset).

    A non-finite loss or metric stops training and returns status "diverged" (metrics as last evaluated).
    `return_model=True` returns (result, fine-tuned model) instead, for tests and notebooks.
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cfg = resolve(_as_config(cfg))
    device = pick_device(cfg.device)
    method = get_method(cfg.method, cfg.model)
    margs = method.resolve_args(cfg.method_args)
    task = get_task(cfg.task, data_dir=cfg.data_dir, device=device, seed=cfg.seed, limit=cfg.limit)
    model, old_stats, before = _pretrained(cfg, task, method.old_task_request(margs), progress)

    # Reseed: fine-tuning must not depend on whether pretraining ran in this process or came from the cache.
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    mem0 = _start_memory_count(device)
    prepared = method.prepare(model, margs, MethodContext(task, old_stats))
    model = _placed(prepared.model, cfg, device)
    params = list({id(p): p for p in prepared.params}.values())
    opt = _optimizer(cfg, params)
    history: list[dict] = []
    on_eval = _evaluator(model, task, history, report)
    state = _train(model, opt, params, task, cfg, gen, prepared.penalty, on_eval)
    peak_mem = _peak_memory(device, mem0)

    final = {}
    for s in ("old_val", "new_val", "old_test", "new_test"):  # the only test evaluation of the trial
        final[s], final[f"{s}_loss"] = evaluate(model, task, s)
    result = _result(cfg, task, state, final, before, history, device, peak_mem, t_start, cpu_start,
                     n_trainable=sum(p.numel() for p in params),
                     profit_bytes=opt.extra_state_bytes() if cfg.profit else 0,
                     method_bytes=prepared.extra_state_bytes)
    return (result, model) if return_model else result


def _pretrained(cfg: TrialConfig, task, old_stat_request, progress: bool):
    """(pretrained model, the old-task statistic its method declared or None, the pretrained model's metrics),
    from the cache (or pretrained now unless cfg.pretrain_if_missing is False)."""
    pcfg = pretrain_config_for(cfg)
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else default_cache_dir()
    with local_cache(cache_dir, cache_key(task.name, cfg.model, cfg.seed, pcfg)) as local:
        model = load_or_pretrain(task, cfg.model, cfg.seed, pcfg, local, progress=progress,
                                 build=cfg.pretrain_if_missing)
        ckpt = cache_path(task.name, cfg.model, cfg.seed, pcfg, local)
        # The statistic is cached beside the checkpoint, or rebuilt from it on old-train data only.
        stats = old_stat(model, task, ckpt, *old_stat_request, cfg.seed) if old_stat_request else None
        return model, stats, before_metrics(model, task, ckpt)


def _start_memory_count(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    _reset_peak_rss()
    return _peak_rss_bytes()


def _peak_memory(device: torch.device, mem0: int) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return int(max(_peak_rss_bytes() - mem0, 0))


def _placed(model, cfg: TrialConfig, device: torch.device):
    if uses_channels_last(cfg.model, device):
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.backbone.compile()  # in place: parameters and state_dict keys stay as they are
    return model


def _optimizer(cfg: TrialConfig, params):
    """The main optimizer, wrapped in PROFIT when the config trains through it."""
    main_opt = make_optimizer(cfg.optimizer, params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              lookahead_alpha=cfg.lookahead_alpha, lookahead_k=cfg.lookahead_k,
                              lookahead_base=cfg.lookahead_base)
    if not cfg.profit:
        return main_opt
    return PROFIT(main_opt, ratio=cfg.ratio, n_ref=cfg.n_ref, ref=cfg.ref_optimizer, ref_kwargs=cfg.ref_kwargs,
                  memory=cfg.profit_memory, delta=cfg.profit_delta, diagnostics=True)


def _evaluator(model, task, history: list, report):
    """The loop's on_eval: validation metrics at θ_ref (PROFIT's anchored()), its diagnostics, into `history` and
    `report`; False (stop) when a loss is not finite."""
    def on_eval(active_opt, state, train_loss):
        with getattr(active_opt, "anchored", contextlib.nullcontext)():
            old_val, old_val_loss = evaluate(model, task, "old_val")
            new_val, new_val_loss = evaluate(model, task, "new_val")
        rec = dict(epoch=state.epoch, step=state.batches, main_steps=state.main_steps, old_val=old_val,
                   new_val=new_val, old_val_loss=old_val_loss, new_val_loss=new_val_loss, train_loss=train_loss)
        if hasattr(active_opt, "diagnostics"):
            rec.update(active_opt.diagnostics())
        history.append(rec)
        if report is not None:
            report(rec)
        return all(math.isfinite(v) for v in (old_val_loss, new_val_loss, train_loss))
    return on_eval


def _lr_factor(cfg: TrialConfig, task) -> Callable:
    """The schedule over the run's length in main steps (or, lr_schedule_unit batch, in batches)."""
    batches_per_epoch = -(-len(task.new_train) // cfg.batch_size)
    per_main = cfg.n_ref + 1 if cfg.profit else 1
    if cfg.steps is not None:
        total_main = cfg.steps
    else:  # warmup batches are main steps of AdamW; the rest run at per_main batches per main step
        total_main = cfg.warmup_epochs * batches_per_epoch + \
            (cfg.epochs - cfg.warmup_epochs) * batches_per_epoch // per_main
    per_batch = cfg.lr_schedule_unit == "batch"  # then step_size (and cosine's length) count batches
    return make_lr_factor(cfg.scheduler, cfg.step_size, cfg.gamma, total_main * per_main if per_batch else total_main)


def _train(model, opt, params, task, cfg: TrialConfig, gen, penalty, on_eval) -> LoopState:
    """AdamW warm-up epochs (if any), then the configured optimizer; PROFIT ends at θ_ref."""
    loop = dict(head="new", loss_fn=task.loss, batch_size=cfg.batch_size, generator=gen, augment=task.augment,
                lr_factor=_lr_factor(cfg, task), lr_per_batch=cfg.lr_schedule_unit == "batch",
                eval_every=cfg.eval_every, on_eval=on_eval, dtype=cfg.dtype,
                channels_last=uses_channels_last(cfg.model, task.device), penalty=penalty)
    state = LoopState()
    if cfg.warmup_epochs:
        # the run's weight decay when the main optimizer is AdamW too, else AdamW's default
        warm = make_optimizer("adamw", params, lr=cfg.lr,
                              weight_decay=cfg.weight_decay if cfg.optimizer == "adamw" else None)
        train_steps(model, warm, task.new_train, state=state, max_epochs=cfg.warmup_epochs, **loop)
        del warm
    if not state.diverged:
        train_steps(model, opt, task.new_train, state=state, max_main_steps=cfg.steps, max_epochs=cfg.epochs,
                    **loop)
    if cfg.profit:
        opt.finish()
    return state


def _result(cfg: TrialConfig, task, state: LoopState, final: dict, before: dict, history: list, device,
            peak_mem: int, t_start: float, cpu_start: float, *, n_trainable: int, profit_bytes: int,
            method_bytes: int) -> dict:
    # protocol.TRIAL_DIVERGENCE_RULE: non-finite anywhere, or the new-task validation loss exploded from where
    # the pretrained model started (independent of any sweep; the sweep's relative rule adds to it).
    diverged_reason = ("a loss turned non-finite during training" if state.diverged else
                       next((f"{k} is not finite" for k, v in final.items() if not math.isfinite(v)), None) or
                       protocol.trial_divergence_reason(final["new_val_loss"], before.get("new_val_loss_before")))
    sign = 1.0 if task.higher_is_better else -1.0  # positive forgetting = worse on the old task
    config = asdict(cfg)
    config["step_unit"] = ("main steps: a PROFIT main step = n_ref reference + 1 main batch; steps and "
                           "eval_every count main steps, the scheduler " +
                           ("batches" if cfg.lr_schedule_unit == "batch" else "main steps"))
    return dict(
        status="diverged" if diverged_reason is not None else "ok", diverged_reason=diverged_reason or "",
        **final, **before,
        forgetting_val=sign * (before["old_val_before"] - final["old_val"]),
        forgetting_test=sign * (before["old_test_before"] - final["old_test"]),
        metric=task.metric, higher_is_better=task.higher_is_better,
        chance_old=task.chance("old"), chance_new=task.chance("new"),
        peak_mem_bytes=int(peak_mem),
        step_time_median_s=statistics.median(state.step_times) if state.step_times else float("nan"),
        wall_time_s=time.perf_counter() - t_start,
        cpu_time_s=time.process_time() - cpu_start,  # this process's CPU seconds (all threads): compute under load
        train_time_s=float(sum(state.step_times)),  # training batches only (no evaluation): cost per main step
        n_trainable=n_trainable, profit_state_bytes=profit_bytes,
        extra_state_bytes=profit_bytes + method_bytes,
        main_steps=state.main_steps, batches=state.batches, epochs_done=state.epoch,
        profit=cfg.profit, device=str(device), **_mean_diagnostics(history), history=history, config=config,
    )


def to_json(obj, **kw) -> str:
    """JSON with null for NaN/±inf (bare NaN tokens are not JSON; a diverged trial has them)."""
    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return json.dumps(clean(obj), allow_nan=False, **kw)


# ---------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every UserError
        self.exit(2, f"error: {message} (see --help)\n")


HELP = {
    "task": "data set pair (old → new task)",
    "model": "backbone",
    "method": "which parameters train and how (full, head, adapters, regularisers); 'profit' = full + --profit",
    "optimizer": "main optimizer",
    "profit": "train the method's parameters through PROFIT(main optimizer), e.g. --method lora --profit; "
              "--method profit is the same as --method full --profit",
    "ref_optimizer": "PROFIT's reference optimizer O_ref",
    "ref_kwargs": "O_ref keyword arguments as JSON, e.g. '{\"momentum\": 0.9}'",
    "method_args": "the method's knobs as JSON, e.g. '{\"lora_r\": 4}'; each method accepts only its own",
    "profit_memory": "how PROFIT keeps θ_ref: full, compact (both exact) or low (approximate)",
    "profit_delta": "PROFIT's Δ: exact (as O_ref intended it) or weights (θ − θ_ref from the rounded weights, "
                    "as before this option existed)",
    "steps": "budget in main steps (a PROFIT cycle of n_ref + 1 batches is one step)",
    "epochs": "budget in passes over new-train",
    "eval_every": "evaluate on validation every N main steps; default: after every epoch",
    "ratio": "PROFIT λ_main / λ_ref",
    "n_ref": "PROFIT reference steps per cycle",
    "toy_variant": "toy: a named reading of C.1's unstated choices (activation, layernorm, batch sizes, lr "
                   "schedule unit); knobs set explicitly win",
    "activation": "mlp activation",
    "layernorm": "mlp LayerNorm placement: before or after the activation, or none",
    "lr_schedule_unit": "what the lr schedule's step_size counts: main steps or every batch (PROFIT: reference "
                        "batches too)",
    "pretrain_batch_size": "pretraining batch size (default: the task's)",
    "limit": "subsample every split to this many examples (smoke tests)",
    "pretrain_if_missing": "pretrain when the cache has no checkpoint (else: error)",
}
CHOICE_LISTS = {"task": lambda: TASKS, "method": lambda: sorted(METHODS), **{k: (lambda v=v: v) for k, v in
                                                                           FIELD_VALUES.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m profit_bench.trial", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(TrialConfig)
    for f in fields(TrialConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        text = HELP.get(f.name, "")
        if f.name in CHOICE_LISTS:
            text += (": " if text else "") + "{" + ", ".join(CHOICE_LISTS[f.name]()) + "}"
        text += f" (default: {'task default' if default is None else repr(default)})"
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, dest=f.name, type=_arg_type(hints[f.name]), default=default, help=text,
                           metavar=f.name.upper())
    p.add_argument("--history", action="store_true", help="include the per-evaluation history in the JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _arg_type(hint):
    """argparse type for a dataclass field annotation (X | None → X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is dict:
        def parse(text):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
        parse.__name__ = "JSON object"
        return parse
    return base


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrialConfig(**{f.name: getattr(args, f.name) for f in fields(TrialConfig)})

    def show(rec):
        print(f"epoch {rec['epoch']} main_step {rec['main_steps']}: old_val {rec['old_val']:.4g} "
              f"new_val {rec['new_val']:.4g} train_loss {rec['train_loss']:.4g}", file=sys.stderr, flush=True)

    try:
        ensure_task_data(cfg.task, cfg.data_dir)  # CIFAR on demand
        result = run_trial(cfg, report=None if args.quiet else show, progress=not args.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.history:
        result.pop("history")
    print(to_json(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
