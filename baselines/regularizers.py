"""Anti-forgetting regularisers (issue 18): L2-SP, EWC, MAS and LwF as methods of the one training loop.

Each `prepare_<name>(prepared, args, ctx) -> Prepared` takes `full`'s Prepared (everything but the old head trains;
for regression the shared head too; methods.py builds it, so this module never imports the registry) and adds a
penalty that the loop adds to the task loss on every batch:

    l2sp: α/2·‖θ_shared − θ_pre‖² + β/2·‖θ_new-head‖²        (Li, Grandvalet, Davoine 2018)
    ewc:  λ/2·Σ_i F_i (θ_i − θ*_i)²  over the shared params     (Kirkpatrick et al. 2017)
    mas:  λ/2·Σ_i Ω_i (θ_i − θ*_i)², Ω_i = E_x|∂‖f(x)‖²/∂θ_i|  (Aljundi et al. 2018)
    lwf:  λ·T²·KL(p_pre(x)/T ‖ p(x)/T) of the old head on new-task inputs; regression: λ·MSE (Li & Hoiem 2017)

"shared" = every trained parameter that existed in the pretrained model, i.e. all but the new head (which is
the old head itself for regression, so there β has nothing to act on). None of them reads old data while
fine-tuning: EWC's Fisher and MAS's importance come from the old task at pretraining time (`diagonal_fisher`,
`mas_importance`: the old-task statistics methods.py registers, cached by profit_bench.pretrain beside the
checkpoint) and reach `prepare` as `ctx.old_stats`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from profit_bench import UserError

DEFAULTS = {
    "l2sp": dict(l2sp_alpha=0.1, l2sp_beta=0.01),
    "ewc": dict(ewc_lambda=1000.0, ewc_fisher_samples=1024),
    "lwf": dict(lwf_lambda=1.0, lwf_temperature=2.0),
    "mas": dict(mas_lambda=1.0, mas_samples=1024),
}


# ---------------------------------------------------------------------------------------------- Fisher
def _scores(out: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(per-output scores s_k, weights w_k) with Fisher = Σ_k w_k (∇s_k)², for outputs [B, K].

    Classification: the exact expectation over the model's own predictive distribution,
    Σ_c p_c (∇ log p_c)² (no label sampling, no true labels). Regression: the Gaussian likelihood with unit
    variance (the toy's label noise), whose expected squared gradient of ½(y − f)² under y ~ N(f, 1) is (∇f_k)².
    """
    if kind == "classification":
        logp = out.log_softmax(-1)
        return logp, logp.detach().exp()
    return out, torch.ones_like(out)


def _examples(split, n_samples: int, generator: torch.Generator) -> Tensor:
    """`n_samples` inputs of `split` drawn without replacement by `generator` (all of them if fewer), in order."""
    n = min(n_samples, len(split))
    idx = torch.randperm(len(split), generator=generator, device=generator.device)[:n].sort().values
    return split.x[idx.to(split.x.device)]


def _per_example_grads(model: nn.Module, head: str, scalar: Callable, *extra_dims):
    """vmap(grad(scalar)) over examples of `model(x, task=head)` as a function of its parameters, and the map from
    the function's parameter names to the model's. `scalar(out[1, K], *extra)` → one example's scalar."""
    # functional_call restores a module registered under two names (regression: heads.old IS heads.new)
    # wrongly, leaving plain tensors in place of the parameters; this path holds each module once.
    net = nn.Sequential(model.backbone, model.heads[head])
    name_of = {id(p): k for k, p in model.named_parameters()}
    model_name = {k: name_of[id(p)] for k, p in net.named_parameters()}
    params = {k: p.detach() for k, p in net.named_parameters()}
    buffers = {k: b.detach() for k, b in net.named_buffers()}

    def one(p, x, *extra):
        return scalar(functional_call(net, (p, buffers), (x[None],)).float(), *extra)

    per_example = vmap(grad(one), in_dims=(None, 0, *extra_dims))
    return (lambda x, *extra: per_example(params, x, *extra)), model_name


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    """The pretrained function: eval mode (no dropout, BatchNorm's running statistics), every flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def diagonal_fisher(model: nn.Module, split, *, head: str = "old", n_samples: int, batch_size: int = 64,
                    generator: torch.Generator) -> dict[str, Tensor]:
    """Diagonal Fisher of `model(x, task=head)`'s likelihood, averaged over `n_samples` examples of `split`.

    Call it with the OLD task's training split at pretraining time. The examples are drawn without
    replacement by `generator`; the model runs in eval mode on un-augmented inputs (the pretrained function)
    and every module's train/eval flag is restored afterwards. Returns {parameter name: F} for every parameter
    of `model` (zeros for those the head does not read, e.g. the new head), on the model's device.
    """
    kind = "classification" if split.y.dtype == torch.int64 else "regression"
    x_all = _examples(split, n_samples, generator)
    grads, model_name = _per_example_grads(model, head, lambda out, k: _scores(out, kind)[0][0, k], None)
    fisher = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    with _evaluating(model):
        for i in range(0, len(x_all), batch_size):
            x = x_all[i:i + batch_size]
            with torch.no_grad():
                weights = _scores(model(x, task=head).float(), kind)[1]  # [B, K]
            for k in range(weights.shape[1]):
                for name, gk in grads(x, k).items():
                    fisher[model_name[name]] += torch.einsum("b,b...->...", weights[:, k], gk.square())
    return {k: f / len(x_all) for k, f in fisher.items()}


def mas_importance(model: nn.Module, split, *, head: str = "old", n_samples: int, batch_size: int = 64,
                   generator: torch.Generator) -> dict[str, Tensor]:
    """MAS's importance (Aljundi et al. 2018, eq. 2-4): Ω = mean over examples x of |∂‖f(x)‖²/∂θ|, with f the
    output of `model(x, task=head)` (logits; the regression value). No labels: the sensitivity of the learned
    function itself. Examples, eval mode and the result's keys as `diagonal_fisher`."""
    x_all = _examples(split, n_samples, generator)
    grads, model_name = _per_example_grads(model, head, lambda out: out.square().sum())
    omega = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    with _evaluating(model):
        for i in range(0, len(x_all), batch_size):
            for name, g in grads(x_all[i:i + batch_size]).items():
                omega[model_name[name]] += g.abs().sum(0)
    return {k: o / len(x_all) for k, o in omega.items()}


# ---------------------------------------------------------------------------------------------- penalties
def _displacement(params, anchors) -> list[Tensor]:
    """θ − a per parameter (θ itself where a is None), as new tensors; one foreach kernel for the anchored ones."""
    pairs = [(p, a) for p, a in zip(params, anchors) if a is not None]
    anchored = iter(torch._foreach_sub([p for p, _ in pairs], [a for _, a in pairs]) if pairs else [])
    return [p.clone() if a is None else next(anchored) for p, a in zip(params, anchors)]


class _Quadratic(torch.autograd.Function):
    """½ Σ_i w_i ⊙ (θ_i − a_i)², with gradient w_i ⊙ (θ_i − a_i); a_i None means 0.

    Written by hand so that nothing parameter-sized is saved for backward (it recomputes θ − a): the penalty
    keeps only its anchors and weights (what extra_state_bytes reports). Foreach kernels: a handful of launches
    per step whatever the number of parameter tensors.
    """

    @staticmethod
    def forward(ctx, weights, anchors, *params):
        ctx.weights, ctx.anchors = weights, anchors
        ctx.save_for_backward(*params)
        d = _displacement(params, anchors)
        torch._foreach_mul_(d, d)
        torch._foreach_mul_(d, weights)  # w (θ − a)² ≥ 0: the strengths are checked to be ≥ 0
        return torch.stack(torch._foreach_norm(d, 1)).sum() / 2  # the 1-norm of a non-negative tensor is its sum

    @staticmethod
    def backward(ctx, g):
        d = _displacement(ctx.saved_tensors, ctx.anchors)
        torch._foreach_mul_(d, ctx.weights)
        torch._foreach_mul_(d, g)
        return (None, None, *d)


def quadratic_penalty(params: list[Tensor], weights: list, anchors: list):
    """A penalty(x, out, y) for the loop: ½ Σ w (θ − a)² over `params` (weights: floats or tensors)."""
    return lambda x, out, y: _Quadratic.apply(weights, anchors, *params)


def _strengths(args: dict, *names: str) -> list[float]:
    values = [float(args[k]) for k in names]
    bad = [k for k, v in zip(names, values) if not v >= 0]
    if bad:
        raise UserError(f"method_args {bad} must be >= 0 (0 switches the term off)")
    return values


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _split(prepared):
    """`full`'s Prepared and its parameters split into (shared, new head)."""
    heads = prepared.model.heads
    new_head = set() if heads["old"] is heads["new"] else {id(p) for p in heads["new"].parameters()}
    shared = [p for p in prepared.params if id(p) not in new_head]
    return prepared, shared, [p for p in prepared.params if id(p) in new_head]


def prepare_l2sp(prepared, args: dict, ctx):
    prepared, shared, head = _split(prepared)
    anchors = [p.detach().clone() for p in shared]
    alpha, beta = _strengths(args, "l2sp_alpha", "l2sp_beta")
    params = shared + head
    weights = [alpha] * len(shared) + [beta] * len(head)
    return dataclasses.replace(prepared, penalty=quadratic_penalty(params, weights, anchors + [None] * len(head)),
                               extra_state_bytes=_nbytes(anchors))


def _importance_penalty(prepared, args: dict, ctx, strength: str, what: str):
    """λ/2·Σ_i Ω_i (θ_i − θ*_i)² over the shared parameters, Ω = the old-task statistic the method declared
    (`ctx.old_stats`, {parameter name: tensor}), λ = args[strength]."""
    if ctx.old_stats is None:
        raise UserError(f"this method needs the old task's {what} (MethodContext.old_stats is None): build it with "
                        f"pretrain.ensure_pretrained(..., old_stats=[(name, n)]), as run_trial does")
    prepared, shared, _ = _split(prepared)
    names = {id(p): k for k, p in prepared.model.named_parameters()}
    missing = [names[id(p)] for p in shared if names[id(p)] not in ctx.old_stats]
    if missing:
        raise UserError(f"the cached {what} lacks parameters {missing[:3]}...; delete its file beside the "
                        f"checkpoint to rebuild it")
    lam, = _strengths(args, strength)
    omega = [ctx.old_stats[names[id(p)]].to(p.device, p.dtype) for p in shared]
    anchors = [p.detach().clone() for p in shared]
    # λ is folded into the stored weights: one tensor per parameter, as the statistic itself.
    weights = [lam * w for w in omega]
    return dataclasses.replace(prepared, penalty=quadratic_penalty(shared, weights, anchors),
                               extra_state_bytes=_nbytes(anchors) + _nbytes(weights))


def prepare_ewc(prepared, args: dict, ctx):
    return _importance_penalty(prepared, args, ctx, "ewc_lambda", "Fisher")


def prepare_mas(prepared, args: dict, ctx):
    return _importance_penalty(prepared, args, ctx, "mas_lambda", "MAS importance")


def distillation_loss(student: Tensor, teacher: Tensor, kind: str, temperature: float) -> Tensor:
    """LwF's old-task term: T²·KL(softmax(teacher/T) ‖ softmax(student/T)) (batch mean), or MSE for regression.

    The T² keeps the gradient's scale independent of T (Hinton et al. 2015), so λ means the same at every T.
    """
    if kind == "regression":
        return F.mse_loss(student, teacher)
    t = temperature
    return F.kl_div((student / t).log_softmax(-1), (teacher / t).log_softmax(-1), log_target=True,
                    reduction="batchmean") * t * t


def prepare_lwf(prepared, args: dict, ctx):
    prepared, _, _ = _split(prepared)
    model = prepared.model
    teacher = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen pretrained model, outside `model`
    lam, temp = _strengths(args, "lwf_lambda", "lwf_temperature")
    if temp == 0:
        raise UserError("method_args lwf_temperature must be > 0 (LwF uses 2)")
    kind = ctx.task.kind
    # The loop gives the penalty the new head's output; the old head reads the same backbone features, which a
    # hook keeps from that forward pass (a second backbone pass would double the cost and the BN updates).
    feats = {}
    model.backbone.register_forward_hook(lambda module, inp, out: feats.__setitem__("f", out))

    def penalty(x, out, y):
        student = model.heads["old"](feats.pop("f")).float()
        with torch.no_grad():
            target = teacher(x, task="old").float()
        return lam * distillation_loss(student, target, kind, temp)

    penalty.teacher = teacher  # tests read the targets' source
    return dataclasses.replace(prepared, penalty=penalty,
                               extra_state_bytes=_nbytes([*teacher.parameters(), *teacher.buffers()]))
