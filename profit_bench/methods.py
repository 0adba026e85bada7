"""Registries of fine-tuning methods and main optimizers; every entry is present on import.

A method decides *which* parameters train (and may wrap the model, e.g. LoRA, or add a loss term, e.g. EWC); an
optimizer decides *how*. `profit` is not an optimizer here: any method can be trained through `PROFIT(main)` with
`cfg.profit=True`, and the method named "profit" is just `full` with that flag forced on.

A method is one `Method` entry: `prepare(model, args, ctx) -> Prepared`, where `args` is the method's own
defaults (`Method.args`) updated by the trial's `method_args` (keys the method does not read are rejected).
Adapter and regulariser implementations live in baselines/; this module imports them (one direction).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from baselines import regularizers
from baselines.adapters import add_convadapter, add_lora, add_vpt, lora_parameters
from profit_bench import UserError
from profit_bench.models import CONV_MODELS, MODELS, VIT_MODELS, freeze_batchnorm_stats
from profit_bench.tasks import TaskData


# ---------------------------------------------------------------------------------------------- interfaces
@dataclass(frozen=True)
class MethodContext:
    """What a method may read besides the model: the task (kind, heads) and the old-task statistic it declared
    (`Method.old_task_stat`: EWC's Fisher, MAS's importance), {parameter name: tensor}, computed at pretraining."""
    task: TaskData
    old_stats: dict[str, Tensor] | None = None


@dataclass
class Prepared:
    """A prepared model: its trainable parameters, an optional loss term the loop adds on every batch
    (`penalty(x, out, y)` with `out` the new head's output), and the bytes of state the method keeps on top of
    parameters, gradients and the optimizer (anchors, Fisher, teacher)."""
    model: nn.Module
    params: list[Tensor]
    penalty: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    extra_state_bytes: int = 0


@dataclass(frozen=True)
class Method:
    name: str
    # prepare(model, args, ctx) -> Prepared: sets requires_grad, may replace/wrap the model. The returned model
    # must still take `model(x, task="old"|"new")` and keep `.heads`.
    prepare: Callable[[nn.Module, dict, MethodContext], Prepared]
    supports: Callable[[str], bool] = lambda model_name: True
    profit: bool = False        # True → always trained through PROFIT (the built-in "profit" method)
    args: dict = field(default_factory=dict)  # the method_args it reads, with their defaults
    base: str = ""              # the method it is without `profit` ("profit" → "full"); "" = itself
    # A key of OLD_TASK_STATS: computed once from the pretrained model on `args[stat_samples_arg]` old-train examples,
    # cached beside the checkpoint, handed to prepare as ctx.old_stats.
    old_task_stat: str | None = None
    stat_samples_arg: str | None = None

    def resolve_args(self, given: dict | None) -> dict:
        """The defaults updated by `given`; a key this method does not read is a UserError (a typo would
        otherwise silently run the default)."""
        given = dict(given or {})
        unknown = set(given) - set(self.args)
        if unknown:
            known = ", ".join(sorted(self.args)) or "none"
            raise UserError(f"method {self.name!r} takes no method_args {sorted(unknown)}; it reads: {known}")
        return {k: type(v)(given[k]) if k in given else v for k, v in self.args.items()}

    def old_task_request(self, method_args: dict | None) -> tuple[str, int] | None:
        """(statistic, old-train examples) this method needs from pretraining, or None."""
        if self.old_task_stat is None:
            return None
        return self.old_task_stat, int(self.resolve_args(method_args)[self.stat_samples_arg])


METHODS: dict[str, Method] = {}


def register_method(name: str, prepare: Callable, supports: Callable[[str], bool] | None = None, *,
                    profit: bool = False, args: dict | None = None, base: str | None = None,
                    old_task_stat: tuple[str, str] | None = None) -> Method:
    """`old_task_stat`: (a key of OLD_TASK_STATS, the method arg holding its number of old-train examples)."""
    stat, samples_arg = old_task_stat or (None, None)
    if stat is not None and (stat not in OLD_TASK_STATS or samples_arg not in (args or {})):
        raise ValueError(f"method {name!r}: old_task_stat {old_task_stat!r} needs a registered statistic "
                         f"({', '.join(OLD_TASK_STATS)}) and a method arg holding its sample count")
    METHODS[name] = Method(name, prepare, supports or (lambda model_name: True), profit, dict(args or {}),
                           base or name, stat, samples_arg)
    return METHODS[name]


# Old-task statistics a method can declare: name → compute(model, old_train split, *, head, n_samples, generator)
# → {parameter name: tensor}. pretrain.py computes the declared one after pretraining and caches it beside the
# checkpoint as <stem>.<name>-n<N>.pt; it knows statistics by these names only, never by method.
OLD_TASK_STATS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "fisher": regularizers.diagonal_fisher,
    "mas": regularizers.mas_importance,
}


def canonical(method: str, profit: bool) -> tuple[str, bool]:
    """(the method's parameters and loss, through PROFIT or not) of a run: a method registered with `profit=True`
    is its `base` with the flag on, so the analysis and the benchmark compare "profit" and "full + profit" as one.
    A name the registry does not know (an older run) is returned as it is."""
    m = METHODS.get(method)
    return (m.base, bool(profit) or m.profit) if m is not None else (method, bool(profit))


def get_method(name: str, model_name: str | None = None) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    m = METHODS[name]
    if model_name is not None and not m.supports(model_name):
        raise UserError(f"method {name!r} does not support model {model_name!r}; use one of "
                        f"{[k for k in MODELS if m.supports(k)]}")
    return m


# ---------------------------------------------------------------------------------------------- built-ins
def _old_head_params(model) -> set[int]:
    # Regression tasks share one head between old and new ("new" is "old"): there the head is the model's
    # only output and fine-tuning trains it. For classification the old head stays frozen (task-incremental).
    if model.heads["old"] is model.heads["new"]:
        return set()
    return {id(p) for p in model.heads["old"].parameters()}


def prepare_full(model, args: dict, ctx: MethodContext) -> Prepared:
    frozen = _old_head_params(model)
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        if id(p) not in frozen:
            params.append(p)
    return Prepared(model, params)


def _train_new_head(model, adapter_params) -> Prepared:
    """Adapters and head-only: the given parameters + the new head train; frozen BatchNorm keeps its statistics."""
    head = list(model.heads["new"].parameters())
    for p in [*adapter_params, *head]:
        p.requires_grad_(True)
    freeze_batchnorm_stats(model.backbone)
    return Prepared(model, list(adapter_params) + head)


def prepare_head(model, args: dict, ctx: MethodContext) -> Prepared:
    model.requires_grad_(False)
    return _train_new_head(model, [])


# Adapters of paper Table 7. Each freezes the pretrained model, adds its adapter inside the backbone (so both heads
# read the adapted backbone at evaluation) and trains adapter + new head; `profit=True` trains exactly these
# parameters through PROFIT(main), so "LoRA + PROFIT" needs nothing here.
def prepare_lora(model, args: dict, ctx: MethodContext) -> Prepared:
    add_lora(model, r=args["lora_r"], alpha=args["lora_alpha"], dropout=args["lora_dropout"])
    return _train_new_head(model, lora_parameters(model))


def prepare_vpt(model, args: dict, ctx: MethodContext) -> Prepared:
    prompted = add_vpt(model, length=args["vpt_length"], deep=args["vpt_deep"])
    return _train_new_head(model, [prompted.prompts])


def prepare_convadapter(model, args: dict, ctx: MethodContext) -> Prepared:
    adapters = add_convadapter(model, reduction=args["adapter_reduction"], scale_init=args["adapter_scale_init"])
    return _train_new_head(model, [p for ad in adapters for p in (*ad.down.parameters(), *ad.up.parameters(),
                                                                   ad.scale)])


register_method("full", prepare_full)
register_method("head", prepare_head)
register_method("profit", prepare_full, profit=True, base="full")
register_method("lora", prepare_lora, args=dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.0))  # Linear + Conv2d
register_method("vpt", prepare_vpt, lambda model_name: model_name in VIT_MODELS,
                args=dict(vpt_length=10, vpt_deep=False))
register_method("convadapter", prepare_convadapter, lambda model_name: model_name in CONV_MODELS,
                args=dict(adapter_reduction=4, adapter_scale_init=1.0))
def _on_full(add_penalty: Callable) -> Callable:
    """A regulariser trains what `full` trains and adds its loss term (baselines/regularizers.py)."""
    return lambda model, args, ctx: add_penalty(prepare_full(model, {}, ctx), args, ctx)


register_method("l2sp", _on_full(regularizers.prepare_l2sp), args=regularizers.DEFAULTS["l2sp"])
register_method("ewc", _on_full(regularizers.prepare_ewc), args=regularizers.DEFAULTS["ewc"],
                old_task_stat=("fisher", "ewc_fisher_samples"))
register_method("mas", _on_full(regularizers.prepare_mas), args=regularizers.DEFAULTS["mas"],
                old_task_stat=("mas", "mas_samples"))
register_method("lwf", _on_full(regularizers.prepare_lwf), args=regularizers.DEFAULTS["lwf"])


# ------------------------------------------------------------------------------------------- optimizers
def _sgd(params, lr, wd):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)


def _adam(params, lr, wd):
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def _adamw(params, lr, wd):
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _rmsprop(params, lr, wd):
    # PyTorch defaults (alpha=0.99, eps=1e-8), as the paper states for C.1.
    return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)


def _adan(params, lr, wd):
    from timm.optim import Adan
    return Adan(params, lr=lr, weight_decay=wd)


def _lookahead(params, lr, wd, *, lookahead_alpha=0.5, lookahead_k=1, lookahead_base="adam"):
    from timm.optim import Lookahead
    if lookahead_base not in LOOKAHEAD_BASES:
        raise UserError(f"unknown lookahead_base {lookahead_base!r}; choose one of {', '.join(LOOKAHEAD_BASES)}")
    base = make_optimizer(lookahead_base, params, lr=lr, weight_decay=wd)
    # C.2.5 uses alpha=0.5, k=1 to match PROFIT's n_ref=1. Note: with k=1 the slow weights are pulled
    # halfway to the fast ones after every step, i.e. the base optimizer at half its step size (from the
    # second step on: timm initialises the slow weights from the already-stepped fast ones).
    return Lookahead(base, alpha=lookahead_alpha, k=lookahead_k)


OPTIMIZERS: dict[str, Callable] = {
    "sgd": _sgd, "adam": _adam, "adamw": _adamw, "rmsprop": _rmsprop, "lookahead": _lookahead, "adan": _adan,
}
LOOKAHEAD_OPTS = ("lookahead_alpha", "lookahead_k", "lookahead_base")
LOOKAHEAD_BASES = tuple(k for k in OPTIMIZERS if k != "lookahead")  # what Lookahead may wrap
# The weight decay an optimizer gets when the config leaves it unset (None); the only place it is decided.
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2}


def default_weight_decay(name: str) -> float:
    return DEFAULT_WEIGHT_DECAY.get(name, 0.0)


def make_optimizer(name: str, params, *, lr: float, weight_decay: float | None = None, **opts):
    """The main optimizer `name` over `params`. weight_decay None → default_weight_decay(name) (adamw 1e-2, else 0).
    `opts` are lookahead_alpha / lookahead_k / lookahead_base (read by lookahead only)."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    unknown = set(opts) - set(LOOKAHEAD_OPTS)
    if unknown:
        raise TypeError(f"make_optimizer got unknown options {sorted(unknown)}")
    wd = default_weight_decay(name) if weight_decay is None else float(weight_decay)
    if name == "lookahead":
        return _lookahead(list(params), lr, wd, **opts)
    return OPTIMIZERS[name](list(params), lr, wd)
