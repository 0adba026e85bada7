"""Registries of fine-tuning methods and main optimizers.

A method decides *which* parameters train (and may wrap the model, e.g. LoRA); an optimizer decides *how*.
`profit` is not an optimizer here: any method can be trained through `PROFIT(main)` with `cfg.profit=True`,
and the method named "profit" is just `full` with that flag forced on.

Adding a method is one call (the baselines package does this on import):

    @register_method("lora", supports=lambda model_name: model_name.startswith("vit"))
    def prepare_lora(model, cfg):            # -> (model, trainable parameters)
        ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from profit_bench import UserError
from profit_bench.models import freeze_batchnorm_stats


# ---------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    name: str
    # prepare(model, cfg) -> (model, trainable params): sets requires_grad, may replace/wrap the model.
    # The returned model must still take `model(x, task="old"|"new")` and keep `.heads`.
    prepare: Callable
    supports: Callable[[str], bool] = lambda model_name: True
    profit: bool = False  # True → always trained through PROFIT (the built-in "profit" method)


METHODS: dict[str, Method] = {}


def register_method(name: str, prepare: Callable | None = None, supports: Callable[[str], bool] | None = None,
                    *, profit: bool = False):
    """Register `prepare` under `name`; usable as a plain call or as a decorator (prepare omitted)."""
    def add(fn):
        METHODS[name] = Method(name, fn, supports or (lambda model_name: True), profit)
        return fn
    return add(prepare) if prepare is not None else add


def _freeze_all(model: nn.Module):
    for p in model.parameters():
        p.requires_grad_(False)


def _old_head_params(model) -> set[int]:
    # Regression tasks share one head between old and new ("new" is "old"): there the head is the model's
    # only output and fine-tuning trains it. For classification the old head stays frozen (task-incremental).
    if model.heads["old"] is model.heads["new"]:
        return set()
    return {id(p) for p in model.heads["old"].parameters()}


def prepare_full(model, cfg):
    frozen = _old_head_params(model)
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
        if id(p) not in frozen:
            params.append(p)
    return model, params


def prepare_head(model, cfg):
    _freeze_all(model)
    freeze_batchnorm_stats(model.backbone)  # a frozen backbone keeps its BatchNorm statistics too
    params = list(model.heads["new"].parameters())
    for p in params:
        p.requires_grad_(True)
    return model, params


register_method("full", prepare_full)
register_method("head", prepare_head)
register_method("profit", prepare_full, profit=True)


def _load_plugins():
    # baselines/ registers lora, vpt, convadapter on import; it is optional.
    try:
        import baselines.methods  # noqa: F401
    except ImportError as e:
        if getattr(e, "name", None) not in ("baselines", "baselines.methods"):
            raise  # a real bug inside baselines, not its absence


def get_method(name: str, model_name: str | None = None) -> Method:
    _load_plugins()
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    m = METHODS[name]
    if model_name is not None and not m.supports(model_name):
        ok = [k for k in ("mlp", "resnet18", "vit_tiny", "vit_small") if m.supports(k)]
        raise UserError(f"method {name!r} does not support model {model_name!r}; use one of {ok}")
    return m


# ------------------------------------------------------------------------------------------- optimizers
def _wd(cfg) -> float:
    return float(getattr(cfg, "weight_decay", 0.0) or 0.0)


def _sgd(params, cfg):
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=_wd(cfg))


def _adam(params, cfg):
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=_wd(cfg))


def _adamw(params, cfg):
    # AdamW's own default decay (1e-2) when the config does not set one.
    wd = getattr(cfg, "weight_decay", None)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2 if wd is None else wd)


def _rmsprop(params, cfg):
    # PyTorch defaults (alpha=0.99, eps=1e-8), as the paper states for C.1.
    return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=_wd(cfg))


def _lookahead(params, cfg):
    from timm.optim import Lookahead
    base_name = getattr(cfg, "lookahead_base", "adam") or "adam"
    if base_name == "lookahead":
        raise UserError("lookahead_base cannot be 'lookahead'; use adam, adamw, sgd, rmsprop or adan")
    base = make_optimizer(base_name, params, cfg)
    # C.2.5 uses alpha=0.5, k=1 to match PROFIT's n_ref=1. Note: with k=1 the slow weights are pulled
    # halfway to the fast ones after every step, i.e. the base optimizer at half its step size (from the
    # second step on: timm initialises the slow weights from the already-stepped fast ones).
    return Lookahead(base, alpha=getattr(cfg, "lookahead_alpha", 0.5), k=getattr(cfg, "lookahead_k", 1))


def _adan(params, cfg):
    from timm.optim import Adan
    return Adan(params, lr=cfg.lr, weight_decay=_wd(cfg))


OPTIMIZERS: dict[str, Callable] = {
    "sgd": _sgd, "adam": _adam, "adamw": _adamw, "rmsprop": _rmsprop, "lookahead": _lookahead, "adan": _adan,
}


def make_optimizer(name: str, params, cfg) -> torch.optim.Optimizer:
    """Build the main optimizer `name` over `params`; reads cfg.lr, cfg.weight_decay (+ lookahead_* fields)."""
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(params), cfg)
