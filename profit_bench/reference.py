"""Algorithm 1 of the PROFIT paper, transcribed literally. For tests only: training code uses ``optim.PROFIT``.

Line numbers in the comments are those of Algorithm 1.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def profit_reference(model: nn.Module, batches: Iterator, loss_fn: Callable[[nn.Module, object], torch.Tensor],
                     main: torch.optim.Optimizer, *, ratio: float, n_ref: int, n_steps: int,
                     ref: torch.optim.Optimizer | Callable | None = None, delta: str = "weights") -> list[float]:
    """Run ``n_steps`` PROFIT steps on ``model``; return ω of every step (tests check both branches occur).

    ``main`` is the standard optimizer O; the trained parameters are those of its groups. The reference optimizer
    O^(ref) is ``ref`` (one group per main group) or, when None, plain SGD. Either way the reference step size of a
    group is the main group's lr / ``ratio``, read before every reference step (so it follows an LR schedule).
    ``ref`` is an optimizer over the model's parameters, or a factory ``param_groups -> Optimizer``.

    ``delta="weights"``: line 12 as written, Δ = θ − θ_ref from the weights (in the model's dtype, so a reference
    step below the weights' resolution is lost). ``delta="exact"``: Δ is what the reference steps intended, kept in
    float64 beside the weights: plain SGD adds −λ_ref·g to Δ (the weights take the same step, rounded); any other
    O^(ref) (a factory) runs on a float64 copy θ̃ of θ, the weights are θ̃ rounded and Δ = θ̃ − θ_ref.
    """
    if delta not in ("weights", "exact"):
        raise ValueError(f"delta must be 'weights' or 'exact', got {delta!r}")
    params = [p for g in main.param_groups for p in g["params"]]
    exact = delta == "exact"
    shadow = [p.detach().to(torch.float64) for p in params] if exact else None
    if ref is not None and not isinstance(ref, torch.optim.Optimizer):  # a factory: over θ̃ when exact
        index = {id(p): i for i, p in enumerate(params)}
        ref = ref([{"params": [shadow[index[id(p)]] if exact else p for p in g["params"]], "lr": 1.0}
                   for g in main.param_groups])
    elif ref is not None and exact:
        raise ValueError("delta='exact' with a stateful O_ref needs a factory, to build it over the float64 copy")
    moved = []  # delta="exact", plain SGD: the intended moves −λ_ref·g of the current cycle (float64)

    def gradient() -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        loss_fn(model, next(batches)).backward()  # lines 8 and 13: a new batch each time
        return [p.grad.detach().clone() for p in params]

    def reference_step() -> None:                                       # line 9: θ ← O^(ref)(θ, g)
        if ref is not None:
            for group, ref_group in zip(main.param_groups, ref.param_groups):
                ref_group["lr"] = float(group["lr"]) / ratio
                ref_group["maximize"] = group.get("maximize", False)
            if exact:
                for p, s in zip(params, shadow):
                    s.grad = p.grad.to(torch.float64)
            ref.step()
            if exact:
                with torch.no_grad():
                    for p, s in zip(params, shadow):
                        p.copy_(s)                                      # the weights: θ̃ rounded
            return
        with torch.no_grad():
            step = []
            for group in main.param_groups:
                lr_ref = float(group["lr"]) / ratio
                for p in group["params"]:
                    p.add_(lr_ref * p.grad if group.get("maximize", False) else -lr_ref * p.grad)
                    if exact:  # the intended move, in float64
                        g64 = p.grad.to(torch.float64)
                        step.append(lr_ref * g64 if group.get("maximize", False) else -lr_ref * g64)
            moved.append(flat(step) if exact else None)

    omegas = []
    for _ in range(n_steps):                                            # line 5
        theta_ref = [p.detach().clone() for p in params]                # line 6
        moved.clear()
        if exact:
            with torch.no_grad():
                for p, s in zip(params, shadow):
                    s.copy_(p)
        for _ in range(n_ref):                                          # line 7
            gradient()                                                  # line 8
            reference_step()                                            # line 9
        if not exact:                                                   # line 12, from the weights
            delta = flat(p.detach() for p in params) - flat(theta_ref)
        elif ref is None:                                               # line 12, the intended moves
            delta = torch.stack(moved).sum(0)
        else:
            delta = flat(shadow) - flat(r.to(torch.float64) for r in theta_ref)
        # line 13: g = ∇L; a maximizing main optimizer is handed ∇(objective) = −∇L, so flip it for the algorithm
        sign = -1.0 if main.param_groups[0].get("maximize", False) else 1.0
        g = sign * flat(gradient())
        g = g.to(delta.dtype)
        omega = torch.dot(delta, g)                                     # line 14
        omegas.append(omega.item())
        if omega < 0:                                                   # line 15
            g = g - (omega / torch.dot(delta, delta)) * delta           # line 16: g ⟂ Δ
        with torch.no_grad():
            for p, r in zip(params, theta_ref):                         # line 18: restore
                p.copy_(r)
        offset = 0
        for p in params:                                                # line 19: main step with g
            p.grad = (sign * g[offset:offset + p.numel()]).to(p.dtype).view_as(p)
            offset += p.numel()
        main.step()
    return omegas
