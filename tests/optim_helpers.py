"""Shared by the PROFIT optimizer tests: small models and batches, every main optimizer and O_ref
built both through PROFIT and by hand for reference.py, and the runs they compare."""

import io

import pytest
import torch
from torch import nn

from profit_bench.optim import PROFIT, REF_OPTIMIZERS
from profit_bench.reference import profit_reference


# ---------------------------------------------------------------------------------------------- helpers
def small_mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16),
                         nn.ReLU(), nn.Linear(16, 1)).to(dtype)


def make_batches(n: int, seed: int = 1, bs: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 3, generator=g).to(dtype)
        out.append((x, torch.sin(3 * x.norm(dim=1, keepdim=True))))
    return out


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def run_fast(model, opt, batches, loss_fn=mse):
    for b in batches:
        opt.zero_grad()
        loss_fn(model, b).backward()
        opt.step()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same_bits(xs, ys) -> bool:
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


def _adan(params, **kw):
    from timm.optim import Adan  # imported on use: timm costs ~2 s, and only the slow battery needs it
    return Adan(params, **kw)


MAINS = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-3)),
    "adan": (_adan, dict(lr=1e-3, weight_decay=0.02)),
}
# Every main optimizer; Adan (timm) only in the slow run.
ALL_MAINS = [*(m for m in MAINS if m != "adan"), pytest.param("adan", marks=pytest.mark.slow)]


def make_main(name, model, groups=2, **extra):
    """The main optimizer `name` over `model`; groups=2 splits the parameters into two groups, the second at 0.3×
    the lr, so every comparison also checks per-group reference step sizes."""
    cls, kw = MAINS[name]
    kw = {**kw, **extra}
    ps = list(model.parameters())
    if groups == 1:
        return cls(ps, **kw)
    return cls([{"params": ps[:4]}, {"params": ps[4:], "lr": kw["lr"] * 0.3}], **kw)


# O_ref choices: PROFIT(ref=..., ref_kwargs=...) and the same optimizer built by hand for reference.py.
def _factory(groups):
    return torch.optim.Adam(groups, betas=(0.8, 0.99))


REFS = {
    "sgd_momentum": ("sgd", {"momentum": 0.9}),
    "rmsprop": ("rmsprop", {}),
    "adam": ("adam", {}),
    "adamw": ("adamw", {"weight_decay": 0.1}),
    "factory": (_factory, None),
}


def reference_ref_optimizer(name, main):
    ref, kwargs = REFS[name]
    groups = [{"params": g["params"], "lr": 1.0} for g in main.param_groups]  # lr is set before every step
    return ref(groups) if callable(ref) else REF_OPTIMIZERS[ref](groups, **kwargs)


def reference_ref_factory(name):
    ref, kwargs = REFS[name]
    return ref if callable(ref) else (lambda groups: REF_OPTIMIZERS[ref](groups, **kwargs))


def run_reference(main_name, n_ref, cycles, batches, *, ratio=10.0, dtype=torch.float32, ref=None, loss_fn=mse,
                  delta="weights", model=None, **main_extra):
    model = small_mlp(dtype=dtype) if model is None else model
    main = make_main(main_name, model, **main_extra)
    ref_opt = (reference_ref_factory(ref) if delta == "exact" else reference_ref_optimizer(ref, main)) if ref else None
    omegas = profit_reference(model, iter(batches), loss_fn, main, ratio=ratio, n_ref=n_ref, n_steps=cycles,
                              ref=ref_opt, delta=delta)
    return model, omegas


def run_compact_vs_full_model(memory, device="cpu", steps=13):
    """A channels_last conv net with a zero bias (sign changes) and a mix of small and large steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(64, 1))
    nn.init.zeros_(model[4].bias)
    model = model.to(device=device, memory_format=torch.channels_last)
    opt = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-2), ratio=1.0, n_ref=2, memory=memory)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 3, 6, 6, generator=g).to(device=device, memory_format=torch.channels_last)
        opt.zero_grad()
        (model(x) ** 2).mean().backward()
        opt.step()
    return model, opt


class TwoScalars(nn.Module):
    """θ = (a, b) as two separate tensors, loss ½‖θ − t‖², so g = θ − t (exact in binary for the values used)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(1.0))

    def loss(self, t):
        return 0.5 * ((self.a - t[0]) ** 2 + (self.b - t[1]) ** 2)


def save_and_load(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
