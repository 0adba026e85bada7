"""Speed and memory benchmarks, measured side by side in one process. Never imported by tests for timing.

    python -m profit_bench.bench step --model resnet18 --batch-size 512 --dtype bf16 --device cuda
    python -m profit_bench.bench step --model resnet18 --methods l2sp ewc mas lwf  (or --methods all)
    python -m profit_bench.bench epoch --model resnet18 --dtype bf16 --device cuda [--compile]
    python -m profit_bench.bench memory --model resnet18 --batch-size 512 --dtype bf16 --memory all
    python -m profit_bench.bench deviation --tasks toy digits --seeds 0 1 2
    python -m profit_bench.bench trials --sweep fmnist --concurrent 1 2 4 --num-samples 8

``step`` times one training batch (forward, backward, optimizer step) for AdamW and for PROFIT(AdamW) on the
same model, data and settings, alternating the variants in rounds so that drift (thermals, other processes) hits
all alike, and prints the mean time per batch over whole PROFIT cycles (n_ref + 1 batches, so that the cheap
reference batches and the dearer main batch weigh as they occur in training) and its ratio to AdamW. PROFIT runs
with each ``--delta`` (default: the exact Δ, the library default, beside Δ read from the weights) and, with
``--diagnostics both``, also without its diagnostics. Peak memory is, on a GPU, CUDA ``max_memory_allocated`` during
the variant's warm-up minus what was allocated before the variant was built;
on the CPU it is the exact byte count of what the optimizer keeps alive (parameters, gradients, optimizer
state, θ_ref), since the process RSS high-water mark cannot be reset between variants.

``step --methods NAME ...`` adds one row per fine-tuning method of the registry (``methods.METHODS``): the method
prepares a fresh model exactly as a trial does (``METHODS[name].prepare``, its default ``method_args``), AdamW
trains its parameters and its loss term (``Prepared.penalty``: L2-SP, EWC, LwF) is added to every batch's loss as
in ``loop.train_steps``; these rows run in the same alternating rounds. Their CPU bytes add the method's own state
(``Prepared.extra_state_bytes``: anchors, Fisher, teacher). The old-task statistic a method declares (EWC's Fisher,
MAS's importance: ``methods.OLD_TASK_STATS``) is computed once, before any variant is built and charged to none, on
``--stat-samples`` examples of the synthetic task's old split (its cost per step does not depend on the count).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from profit_bench import UserError
from profit_bench.loop import LoopState, train_steps
from profit_bench.methods import METHODS, OLD_TASK_STATS, MethodContext, get_method
from profit_bench.models import MODELS, build_model, uses_channels_last
from profit_bench.optim import DELTA_MODES, MEMORY_MODES, PROFIT
from profit_bench.tasks import Split, TaskData


def synthetic_task(model: str, n: int, device: str) -> TaskData:
    """CIFAR-shaped (3×32×32, 10 → 100 classes) random data, or the toy's 2-D regression for the MLP."""
    if model == "mlp":
        x, y = torch.rand(n, 2, device=device) * 2 - 1, torch.randn(n, 1, device=device)
        s = Split(x, y)
        return TaskData("synthetic-toy", "regression", s, s, s, s, s, s, (2,), 1, 1, "mse", False, False)
    x = torch.randn(n, 3, 32, 32, device=device)
    s = Split(x, torch.randint(0, 100, (n,), device=device))
    return TaskData("synthetic-cifar", "classification", s, s, s, s, s, s, (3, 32, 32), 10, 100, "accuracy", True,
                    True)


# The AdamW and PROFIT(AdamW) rows train the `full` method; a method that is `full` through PROFIT (the registry's
# `base`, e.g. the built-in `profit`) is that same PROFIT row.
BASE_METHODS = tuple(m for m, spec in METHODS.items() if spec.base == "full")


@dataclass
class Variant:
    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    penalty: Callable | None = None  # the method's loss term, added to every batch's loss (as in loop.train_steps)
    extra_state_bytes: int = 0       # the method's own kept state (anchors, Fisher, teacher); PROFIT's is in opt


def variant_memories(args) -> list[str | None]:
    """The variants to run: None is the AdamW baseline, then each PROFIT memory mode asked for (in order)."""
    return [None, *(MEMORY_MODES if "all" in args.memory else dict.fromkeys(args.memory))]


def bench_methods(args) -> list[str]:
    """The registry methods asked for with --methods (all: every one the model supports, but `full`/`profit`,
    which are the AdamW and PROFIT rows)."""
    asked = list(dict.fromkeys(getattr(args, "methods", None) or []))
    if "all" in asked:
        return [m for m in METHODS if m not in BASE_METHODS and METHODS[m].supports(args.model)]
    for name in asked:
        if name in BASE_METHODS:
            raise UserError(f"--methods {name}: that is the AdamW / PROFIT(AdamW) row already")
        get_method(name, args.model)  # unknown or unsupported by the model: a UserError
    return asked


def method_contexts(task: TaskData, args, methods) -> dict[str, MethodContext]:
    """Each method's context: the task, and the old-task statistic it declared, of the (seed-0) model, from
    --stat-samples examples of the old split, as pretraining would cache it (each statistic computed once)."""
    stats = {}
    for name in {METHODS[m].old_task_stat for m in methods} - {None}:
        model = build_model(args.model, task, seed=0)
        gen = torch.Generator(device=task.old_train.x.device).manual_seed(0)
        stats[name] = OLD_TASK_STATS[name](model, task.old_train, head="old", n_samples=args.stat_samples,
                                           generator=gen)
        del model
    return {m: MethodContext(task, stats.get(METHODS[m].old_task_stat)) for m in methods}


def variant_name(memory: str | None, args, method: str = "full", delta: str = "exact",
                 diagnostics: bool = True) -> str:
    if method != "full":
        return f"{method}(AdamW)"
    if memory is None:
        return "AdamW"
    label = {"full": "", "compact": " compact", "low": " low-mem"}[memory]
    label += "" if delta == "exact" else f" Δ={delta}"
    label += "" if diagnostics else " no-diag"
    return f"PROFIT(AdamW){label} ratio={args.ratio:g} n_ref={args.n_ref}"


def step_variants(args) -> list[tuple[str | None, str, bool]]:
    """(memory, delta, diagnostics) of each `step` row: AdamW, then each memory mode × --delta, and with
    --diagnostics both, each of those without diagnostics too."""
    deltas = list(dict.fromkeys(getattr(args, "delta", None) or ["exact"]))
    diags = {"on": [True], "off": [False], "both": [True, False]}[getattr(args, "diagnostics", "on")]
    rows = [(None, "exact", True)]
    for memory in variant_memories(args)[1:]:
        rows += [(memory, d, diag) for d in deltas for diag in diags]
    return rows


def make_variant(memory: str | None, args, task: TaskData, method: str = "full",
                 ctx: MethodContext | None = None, delta: str = "exact", diagnostics: bool = False) -> Variant:
    """AdamW (memory=None) or PROFIT(AdamW, memory=memory) on a fresh model prepared by the registry's `method`
    (default `full`: all but the old head trains) with its default method_args, in the order a trial uses
    (prepare, then channels_last)."""
    m = METHODS[method]
    prepared = m.prepare(build_model(args.model, task, seed=0), m.resolve_args({}), ctx or MethodContext(task))
    model = prepared.model
    if uses_channels_last(args.model, args.device):
        model = model.to(memory_format=torch.channels_last)  # in place: the method's parameter lists stay valid
    params = list({id(p): p for p in prepared.params}.values())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, foreach=True)
    if memory is not None:
        opt = PROFIT(opt, ratio=args.ratio, n_ref=args.n_ref, memory=memory, delta=delta, diagnostics=diagnostics)
    return Variant(variant_name(memory, args, method, delta, diagnostics), model, opt, prepared.penalty,
                   prepared.extra_state_bytes)


def check_device(args) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is visible; use --device cpu")



def autocast(args):
    if args.dtype == "bf16":
        return torch.autocast(args.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_block(v: Variant, task: TaskData, args, n_batches: int) -> float:
    """Run n_batches training steps; return seconds (synchronised at both ends)."""
    x, y = task.new_train.x, task.new_train.y
    # --clock cpu: this thread's CPU time, for --threads 1 on a shared machine (other processes' load does not
    # count, while the wall clock charges their time slices to whichever variant was running)
    clock = time.thread_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    sync(args.device)
    t0 = clock()
    for _ in range(n_batches):
        with autocast(args):
            out = v.model(x, task="new").float()
            loss = task.loss(out, y)
            if v.penalty is not None:
                loss = loss + v.penalty(x, out, y)
        loss.backward()
        v.opt.step()
        v.opt.zero_grad(set_to_none=True)
    sync(args.device)
    return clock() - t0


def kept_bytes(v: Variant) -> int:
    """Bytes the training state keeps between steps: parameters, gradients, optimizer state, θ_ref (or its
    compact form) and the method's own state (L2-SP/EWC anchors, EWC's Fisher, LwF's teacher)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in v.model.parameters():
        add(p)
        if p.requires_grad:  # gradients are freed by zero_grad but live during every step
            total += p.numel() * p.element_size()
    main = v.opt.main if isinstance(v.opt, PROFIT) else v.opt
    for s in main.state.values():
        for t in s.values():
            add(t)
    return total + (v.opt.extra_state_bytes() if isinstance(v.opt, PROFIT) else 0) + v.extra_state_bytes


def bench_step(args) -> list[dict]:
    check_device(args)
    torch.manual_seed(0)
    task = synthetic_task(args.model, args.batch_size, args.device)
    methods = bench_methods(args)
    ctxs = method_contexts(task, args, methods)  # old-task statistics: built before any variant, charged to none
    factories = [lambda m=m, d=d, diag=diag: make_variant(m, args, task, delta=d, diagnostics=diag)
                 for m, d, diag in step_variants(args)]
    factories += [lambda method=method: make_variant(None, args, task, method, ctxs[method]) for method in methods]
    return measure_step(factories, task, args)


def measure_step(factories: list[Callable[[], Variant]], task: TaskData, args) -> list[dict]:
    """Build and warm up each variant in turn (measuring its memory), then time them all in alternating rounds;
    the first factory is the baseline the ratios refer to."""
    block = args.n_ref + 1  # whole PROFIT cycles, so reference and main steps are weighed as they occur
    variants, peak = [], {}
    if args.device == "cuda":  # one-time allocations (cuBLAS/cuDNN workspaces) must not be charged to variant 1
        primer = make_variant(None, args, task)
        train_block(primer, task, args, 2)
        del primer
    for factory in factories:  # build + warm up (allocations, cudnn autotune, optimizer state), one by one
        if args.device == "cuda":
            # A variant's peak is counted above what is alive before it is built (the batch, earlier variants,
            # idle with their gradients freed), so every variant is charged for its own memory only.
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        v = factory()
        train_block(v, task, args, max(args.warmup, 2 * block))
        peak[v.name] = torch.cuda.max_memory_allocated() - base if args.device == "cuda" else kept_bytes(v)
        variants.append(v)
    times = {v.name: [] for v in variants}
    blocks = max(1, -(-args.steps // block))
    rounds = 5
    per_round = max(1, -(-blocks // rounds))
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):  # alternate the order to cancel drift
            for _ in range(per_round):
                times[v.name].append(train_block(v, task, args, block) / block)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    # Each entry is one whole cycle's time per batch; the mean of equal-length cycles is the mean per batch.
    return [{"variant": v.name, "mean_batch_s": statistics.fmean(times[v.name]),
             "se_batch_s": statistics.stdev(times[v.name]) / len(times[v.name]) ** 0.5 if len(times[v.name]) > 1
             else float("nan"),
             "median_batch_s": statistics.median(times[v.name]),
             "n_batches": len(times[v.name]) * block, "peak_bytes": peak[v.name]} for v in variants]


def saved_activation_bytes(v: Variant, task: TaskData, args) -> int:
    """Bytes autograd saves for the backward pass of one training forward at args.batch_size (what sits on top of
    the training state at the start of backward), counted once per storage; parameters are not included."""
    params = {p.untyped_storage().data_ptr() for p in v.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x, y = task.new_train.x[:args.batch_size], task.new_train.y[:args.batch_size]
    if uses_channels_last(args.model, args.device):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(args):
        loss = task.loss(v.model(x, task="new").float(), y)
    del loss
    return sum(seen.values())


def bench_memory(args) -> list[dict]:
    """Tensor accounting, no timing: training state of each variant (params, grads, optimizer state, PROFIT's
    θ_ref or its compact form, after two cycles and one reference step at a small batch) plus the activations
    one forward at the full batch saves for backward. A model of the GPU peak that runs anywhere; `step` on
    CUDA measures the real one."""
    check_device(args)
    torch.manual_seed(0)
    task = synthetic_task(args.model, args.batch_size, args.device)
    small = SimpleNamespace(**{**vars(args), "batch_size": min(args.batch_size, 8)})
    small_task = synthetic_task(args.model, small.batch_size, args.device)
    rows, act = [], None
    for memory in variant_memories(args):
        v = make_variant(memory, args, task)
        train_block(v, small_task, small, 2 * (args.n_ref + 1) + 1)  # mid-cycle: θ_ref (or its encoding) is live
        act = saved_activation_bytes(v, task, args) if act is None else act  # the same for every variant
        rows.append({"variant": v.name, "state_bytes": kept_bytes(v), "act_bytes": act})
        del v
    return rows


def print_memory(rows: list[dict], args) -> None:
    base = rows[0]
    total = lambda r: r["state_bytes"] + r["act_bytes"]  # noqa: E731
    print(f"model={args.model} batch={args.batch_size} dtype={args.dtype} (tensor accounting, not an allocator peak)")
    print(f"{'variant':<44} {'state MiB':>10} {'state ×':>8} {'+ act MiB':>10} {'total ×':>8}")
    for r in rows:
        print(f"{r['variant']:<44} {r['state_bytes'] / 2**20:>10.1f} {r['state_bytes'] / base['state_bytes']:>8.3f} "
              f"{total(r) / 2**20:>10.1f} {total(r) / total(base):>8.3f}")
    print(f"(state = params + grads + optimizer state + PROFIT's θ_ref; act = {base['act_bytes'] / 2**20:.1f} MiB "
          f"saved for backward by one forward at batch {args.batch_size})")


def bench_epoch(args) -> list[dict]:
    """Whole fine-tune epochs through the training loop every trial runs (loop.train_steps): on-device data,
    batched augmentation, bf16 autocast, channels_last for ResNet on CUDA, optional torch.compile."""
    check_device(args)
    torch.manual_seed(0)
    task = synthetic_task(args.model, args.n_images, args.device)
    rows = []
    for memory in variant_memories(args):
        base = torch.cuda.memory_allocated() if args.device == "cuda" else 0  # the data set; charged to no one
        v = make_variant(memory, args, task)  # already channels_last where that applies
        if args.compile:
            v.model.backbone.compile()
        gen = torch.Generator(device=args.device).manual_seed(0)
        times = []
        for epoch in range(args.epochs + 1):  # epoch 0 warms up (compilation, cudnn autotuning, allocator)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            state = LoopState()
            sync(args.device)
            t0 = time.perf_counter()
            train_steps(v.model, v.opt, task.new_train, head="new", loss_fn=task.loss, batch_size=args.batch_size,
                        generator=gen, augment=task.augment, state=state, lr_factor=lambda s: 1.0, max_epochs=1,
                        on_eval=lambda *a: True, dtype=args.dtype,
                        channels_last=uses_channels_last(args.model, args.device))
            sync(args.device)
            if epoch:
                times.append(time.perf_counter() - t0)
            print(f"  {v.name}: epoch {epoch} {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
        peak = torch.cuda.max_memory_allocated() - base if args.device == "cuda" else kept_bytes(v)
        rows.append({"variant": v.name, "epoch_s": statistics.median(times), "peak_bytes": peak})
        del v
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_epochs(rows: list[dict], args) -> None:
    base = rows[0]
    print(f"model={args.model} images={args.n_images} batch={args.batch_size} dtype={args.dtype} "
          f"device={args.device} compile={args.compile}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" (threads={torch.get_num_threads()})"))
    print(f"{'variant':<44} {'s/epoch':>9} {'images/s':>10} {'time ×':>8} {'peak MiB':>10} {'mem ×':>7}")
    for r in rows:
        print(f"{r['variant']:<44} {r['epoch_s']:>9.2f} {args.n_images / r['epoch_s']:>10.0f} "
              f"{r['epoch_s'] / base['epoch_s']:>8.3f} {r['peak_bytes'] / 2**20:>10.1f} "
              f"{r['peak_bytes'] / base['peak_bytes']:>7.3f}")
    print(f"(median of {args.epochs} epochs after one warm-up epoch; fine-tune of a new head on random "
          f"CIFAR-shaped data, augmentation included; peak MiB: on CUDA the peak above the resident data set, "
          f"on the CPU params+grads+optimizer state)")


def bench_deviation(args) -> None:
    """How far PROFIT(memory=args.memory) lands from exact PROFIT: same trial, same seed, both variants."""
    import numpy as np
    from profit_bench.trial import run_trial
    alt = args.memory
    print(f"main optimizer {args.optimizer}, PROFIT ratio 100, n_ref 1, task-default lr and budget; "
          f"memory='{alt}' vs 'full'")
    print(f"{'task':<8} {'seed':>4} {'old exact':>10} {'old ' + alt:>11} {'new exact':>10} {'new ' + alt:>11} "
          f"{'θ_ref B/weight':>15}")
    for task in args.tasks:
        d_old, d_new = [], []
        for seed in args.seeds:
            res = {}
            for memory in ("full", alt):
                cfg = dict(task=task, method="full", profit=True, seed=seed, profit_memory=memory, device=args.device,
                           optimizer=args.optimizer, model=args.model)
                if args.steps:
                    cfg["steps"] = args.steps
                res[memory] = run_trial(cfg)
            e, lo = res["full"], res[alt]
            d_old.append(lo["old_test"] - e["old_test"])
            d_new.append(lo["new_test"] - e["new_test"])
            per_weight = [r["profit_state_bytes"] / r["n_trainable"] for r in (e, lo)]
            print(f"{task:<8} {seed:>4} {e['old_test']:>10.4f} {lo['old_test']:>11.4f} "
                  f"{e['new_test']:>10.4f} {lo['new_test']:>11.4f} {per_weight[0]:>6.3f} → {per_weight[1]:.3f}",
                  flush=True)
        se = lambda x: np.std(x, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")  # noqa: E731
        print(f"{task:<8} {alt} − exact: old {np.mean(d_old):+.4f} ± {se(d_old):.4f}, "
              f"new {np.mean(d_new):+.4f} ± {se(d_new):.4f} (mean ± s.e., {len(d_old)} seeds; metric "
              f"{res['full']['metric']})", flush=True)


def bench_trials(args) -> None:
    """Trials/hour of a real sweep with k trials sharing the machine (on a GPU: 1/k of it each, Ray fractional GPUs)."""
    import tempfile

    import torch as _torch
    from profit_bench.sweep import Options, run_sweep
    gpu = _torch.cuda.is_available() and not args.cpu
    rows = []
    for k in args.concurrent:
        with tempfile.TemporaryDirectory() as tmp:
            opts = Options(num_samples=args.num_samples, max_concurrent=k, verbose=0,
                           gpus_per_trial=(1.0 / k) if gpu else 0.0,
                           cpus_per_trial=max(1.0, (os.cpu_count() or 1) / k),
                           storage_path=f"{tmp}/ray", tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                           experiment=f"bench_trials_{k}", overrides=list(args.set or []))
            run_sweep(args.sweep, opts)  # pretraining is cached by the first run, so k=1 is measured warm too
            t0 = time.perf_counter()
            run_sweep(args.sweep, opts)
            wall = time.perf_counter() - t0
        rows.append((k, wall, 3600 * args.num_samples / wall))
        print(f"  {k} concurrent: {wall:.1f} s for {args.num_samples} trials", file=sys.stderr, flush=True)
    dev = _torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"sweep={args.sweep} trials={args.num_samples} on {dev}")
    print(f"{'concurrent':>10} {'per trial':>14} {'wall s':>8} {'trials/hour':>12} {'speed-up':>9}")
    for k, wall, tph in rows:
        share = f"{1 / k:.2f} GPU" if gpu else f"{max(1.0, (os.cpu_count() or 1) / k):.0f} CPU"
        print(f"{k:>10} {share:>14} {wall:>8.1f} {tph:>12.1f} {tph / rows[0][2]:>9.2f}")


def print_side_by_side(rows: list[dict], args) -> None:
    base = rows[0]
    what = ("CUDA peak allocated by the variant: params, grads, state, activations" if args.device == "cuda"
            else "params+grads+optimizer state")
    print(f"model={args.model} batch={args.batch_size} dtype={args.dtype} device={args.device} "
          f"clock={getattr(args, 'clock', 'wall')}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" (threads={torch.get_num_threads()})"))
    print(f"{'variant':<52} {'ms/batch':>10} {'± s.e.':>7} {'time ×':>8} {'peak MiB':>10} {'mem ×':>8}   [{what}]")
    for r in rows:
        print(f"{r['variant']:<52} {1e3 * r['mean_batch_s']:>10.3f} {1e3 * r['se_batch_s']:>7.3f}"
              f" {r['mean_batch_s'] / base['mean_batch_s']:>8.3f}"
              f" {r['peak_bytes'] / 2**20:>10.1f} {r['peak_bytes'] / base['peak_bytes']:>8.3f}")
    print(f"(mean over {rows[0]['n_batches']} batches each, timed in whole PROFIT cycles of n_ref + 1 batches, "
          f"alternating variants; s.e. over cycles)")
    if bench_methods(args):
        print("(method(AdamW) rows: AdamW on the parameters the method trains, its loss term on every batch; "
              + ("its peak includes its state: " if args.device == "cuda" else "bytes add its state: ")
              + "L2-SP/EWC anchors, EWC's λ·Fisher, LwF's frozen teacher)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profit_bench.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("step", help="per-batch time and peak memory: AdamW vs PROFIT(AdamW)")
    st.add_argument("--model", choices=MODELS, default="resnet18")
    st.add_argument("--batch-size", type=int, default=None, help="default: 512 on cuda, 32 on cpu")
    st.add_argument("--steps", type=int, default=60, help="measured batches per variant (>= 50 recommended)")
    st.add_argument("--warmup", type=int, default=10)
    st.add_argument("--methods", nargs="+", default=[],
                    choices=[*(m for m in METHODS if m not in BASE_METHODS), "all"],
                    help="fine-tuning methods of the registry to add as rows, each trained by AdamW with its loss "
                         "term (l2sp ewc mas lwf; all: every method the model supports)")
    st.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this thread's CPU time (CPU with --threads 1 on a shared machine)")
    st.add_argument("--delta", nargs="+", choices=DELTA_MODES, default=list(DELTA_MODES),
                    help="PROFIT's Δ in the PROFIT rows: exact (the library default) and/or weights")
    st.add_argument("--diagnostics", choices=["on", "off", "both"], default="off",
                    help="PROFIT's diagnostics in the PROFIT rows (off: the library default; on: as trials run; both)")
    st.add_argument("--stat-samples", type=int, default=32,
                    help="old-split examples for the old-task statistic a method declares (EWC's Fisher, MAS's "
                         "importance; computed once, before timing)")
    ep = sub.add_parser("epoch", help="fine-tune epoch time (images/s): AdamW vs PROFIT(AdamW)")
    ep.add_argument("--model", choices=[m for m in MODELS if m != "mlp"], default="resnet18")
    ep.add_argument("--n-images", type=int, default=None, help="default: 50000 on cuda (CIFAR-size), 1024 on cpu")
    ep.add_argument("--batch-size", type=int, default=None, help="default: 512 on cuda, 128 on cpu")
    ep.add_argument("--epochs", type=int, default=3, help="measured epochs (after one warm-up epoch)")
    ep.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    mm = sub.add_parser("memory", help="tensor accounting of state + saved activations (a model of the GPU peak; "
                                       "runs on the CPU)")
    mm.add_argument("--model", choices=MODELS, default="resnet18")
    mm.add_argument("--batch-size", type=int, default=512)
    dv = sub.add_parser("deviation", help="PROFIT memory='low' (or 'compact') vs exact PROFIT: old/new metric "
                                          "over seeds")
    dv.add_argument("--memory", choices=[m for m in MEMORY_MODES if m != "full"], default="low")
    dv.add_argument("--tasks", nargs="+", default=["toy", "digits"])
    dv.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    dv.add_argument("--steps", type=int, default=None, help="main-step budget (default: the task's)")
    dv.add_argument("--model", choices=MODELS, default=None, help="default: the task's")
    dv.add_argument("--optimizer", default="adam",
                    help="main optimizer for both variants; needs a first moment (adam, adamw, sgd, adan): the "
                         "toy's RMSProp keeps none, so memory='low' cannot run on it")
    dv.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    tr = sub.add_parser("trials", help="sweep throughput (trials/hour) with 1, 2, 4 trials sharing the GPU")
    tr.add_argument("--sweep", default="toy", help="sweep name or YAML (run as a real Ray Tune sweep)")
    tr.add_argument("--concurrent", nargs="+", type=int, default=[1, 2, 4])
    tr.add_argument("--num-samples", type=int, default=8)
    tr.add_argument("--set", action="append", help="spec override, as in the sweep CLI (e.g. budget.epochs=1)")
    tr.add_argument("--cpu", action="store_true", help="ignore GPUs")
    for p, dtype in ((st, "fp32"), (ep, "bf16"), (mm, "bf16")):
        p.add_argument("--dtype", choices=["fp32", "bf16"], default=dtype)
        p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--ratio", type=float, default=100.0)
        p.add_argument("--n-ref", type=int, default=1)
        p.add_argument("--memory", nargs="+", choices=[*MEMORY_MODES, "all"], default=["full"],
                       help="PROFIT variant(s) to run beside AdamW: full (exact θ_ref copy), compact (exact, "
                            "θ_ref as 8/16-bit ulp offsets), low (approximate, no copy), or all")
        p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args(argv)
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        if args.cmd == "deviation":
            bench_deviation(args)
            return 0
        if args.cmd == "trials":
            bench_trials(args)
            return 0
        if args.cmd == "memory":
            print_memory(bench_memory(args), args)
            return 0
        if args.batch_size is None:
            args.batch_size = (512 if args.device == "cuda" else (32 if args.cmd == "step" else 128))
        if args.cmd == "epoch":
            if args.n_images is None:
                args.n_images = 50_000 if args.device == "cuda" else 1024
            print_epochs(bench_epoch(args), args)
        else:
            print_side_by_side(bench_step(args), args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
