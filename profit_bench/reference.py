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
                     main: torch.optim.Optimizer, lr_ref: Callable[[], float], n_ref: int, n_steps: int,
                     ) -> list[float]:
    """Run ``n_steps`` PROFIT steps on ``model``; return ω of every step (tests check both branches occur).

    ``main`` is the standard optimizer O over ``model``'s trainable parameters; the reference optimizer O^(ref)
    is plain SGD with step size ``lr_ref()`` (a callable so it can follow the main LR schedule).
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        loss_fn(model, next(batches)).backward()  # lines 8 and 13: a new batch each time
        return [p.grad.detach().clone() for p in params]

    omegas = []
    for _ in range(n_steps):                                            # line 5
        theta_ref = [p.detach().clone() for p in params]                # line 6
        for _ in range(n_ref):                                          # line 7
            g = gradient()                                              # line 8
            with torch.no_grad():                                       # line 9: SGD reference step
                for p, gi in zip(params, g):
                    p.sub_(lr_ref() * gi)
        delta = flat(p.detach() for p in params) - flat(theta_ref)      # line 12
        g = flat(gradient())                                            # line 13
        omega = torch.dot(delta, g)                                     # line 14
        omegas.append(omega.item())
        if omega < 0:                                                   # line 15
            g = g - (omega / torch.dot(delta, delta)) * delta           # line 16: g ⟂ Δ
        with torch.no_grad():
            for p, r in zip(params, theta_ref):                         # line 18: restore
                p.copy_(r)
        offset = 0
        for p in params:                                                # line 19: main step with g
            p.grad = g[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        main.step()
    return omegas
