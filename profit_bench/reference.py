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
                     ref: torch.optim.Optimizer | None = None) -> list[float]:
    """Run ``n_steps`` PROFIT steps on ``model``; return ω of every step (tests check both branches occur).

    ``main`` is the standard optimizer O; the trained parameters are those of its groups. The reference optimizer
    O^(ref) is ``ref`` (one group per main group) or, when None, plain SGD. Either way the reference step size of a
    group is the main group's lr / ``ratio``, read before every reference step (so it follows an LR schedule).
    """
    params = [p for g in main.param_groups for p in g["params"]]

    def gradient() -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        loss_fn(model, next(batches)).backward()  # lines 8 and 13: a new batch each time
        return [p.grad.detach().clone() for p in params]

    def reference_step() -> None:                                       # line 9: θ ← O^(ref)(θ, g)
        if ref is not None:
            for group, ref_group in zip(main.param_groups, ref.param_groups):
                ref_group["lr"] = float(group["lr"]) / ratio
            ref.step()
            return
        with torch.no_grad():
            for group in main.param_groups:
                lr_ref = float(group["lr"]) / ratio
                for p in group["params"]:
                    p.add_(lr_ref * p.grad if group.get("maximize", False) else -lr_ref * p.grad)

    omegas = []
    for _ in range(n_steps):                                            # line 5
        theta_ref = [p.detach().clone() for p in params]                # line 6
        for _ in range(n_ref):                                          # line 7
            gradient()                                                  # line 8
            reference_step()                                            # line 9
        delta = flat(p.detach() for p in params) - flat(theta_ref)      # line 12
        # line 13: g = ∇L; a maximizing main optimizer is handed ∇(objective) = −∇L, so flip it for the algorithm
        sign = -1.0 if main.param_groups[0].get("maximize", False) else 1.0
        g = sign * flat(gradient())
        omega = torch.dot(delta, g)                                     # line 14
        omegas.append(omega.item())
        if omega < 0:                                                   # line 15
            g = g - (omega / torch.dot(delta, delta)) * delta           # line 16: g ⟂ Δ
        with torch.no_grad():
            for p, r in zip(params, theta_ref):                         # line 18: restore
                p.copy_(r)
        offset = 0
        for p in params:                                                # line 19: main step with g
            p.grad = sign * g[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        main.step()
    return omegas
