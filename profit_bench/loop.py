"""The project's one training loop, used by pretraining, fine-tuning trials and the epoch benchmark.

Budgets count *main* steps: a PROFIT main step closes a cycle of n_ref reference steps + 1 main step (n_ref + 1
batches); a plain optimizer's every step is a main step. The lr schedule advances once per main step (or, with
lr_per_batch, once per batch: PROFIT's reference batches count too).
No Ray, no MLflow, no knowledge of tasks beyond a `Split` (x, y tensors on the device).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


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
                augment, state: LoopState, lr_factor, lr_per_batch=False, max_main_steps=None, max_epochs=None,
                eval_every=None, on_eval=None, dtype="fp32", channels_last=False, penalty=None,
                on_main_step=None) -> LoopState:
    """Train `model(x, task=head)` on `split` until `state` reaches max_main_steps or max_epochs (absolute counts).

    Each epoch draws a fresh permutation from `generator` (on the data's device) and slices batches from the
    device tensors; `augment(x, generator)` runs batched on the device. The loss of a batch is
    `loss_fn(out, y)`, plus `penalty(x, out, y)` when a method gives one (L2-SP, EWC, LwF). After a main step
    (any step of a plain optimizer; PROFIT's `is_main_step`), the lr of every group becomes
    initial_lr × lr_factor(main_steps); with lr_per_batch, after every batch, initial_lr × lr_factor(batches).
    `on_eval(opt, state, mean_train_loss) -> bool` runs every `eval_every`
    main steps, or after each epoch when eval_every is None; returning False (e.g. non-finite metrics) stops the
    loop with state.diverged set. `on_main_step(state)`, when given, runs after every main step (a progress bar).

    On CUDA the loop never waits for the GPU: batch times come from CUDA events read at evaluation time, the
    training loss is summed on the device, and divergence is checked at each evaluation.
    """
    if len(split) == 0:  # an empty split would make every epoch a no-op: the loop would never end
        raise ValueError("train_steps needs a non-empty training split")
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
        f = lr_factor(state.batches if lr_per_batch else state.main_steps)
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
                out = model(x, task=head).float()
                loss = loss_fn(out, y)
                if penalty is not None:
                    loss = loss + penalty(x, out, y)
            loss.backward()
            main = getattr(opt, "is_main_step", True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.batches += 1
            if lr_per_batch:
                set_lr()
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
                if not lr_per_batch:
                    set_lr()
                if on_main_step is not None:
                    on_main_step(state)
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
