"""θ_ref strategies of PROFIT (``profit_bench/optim.py``): how θ_ref is kept between a cycle's first call and
its main step, and how Δ is formed. PROFIT holds one ``ThetaRef`` and, for ``delta="exact"``, one
``IntendedDelta``; nothing here knows the cycle, the projection or the checkpoint layout.

Three ways to keep θ_ref (``memory=``), each a ``ThetaRef`` strategy:

* ``"full"`` (default, exact): ``FullRef``, a copy of the trainable parameters. Δ is formed in place in θ (θ is
  overwritten by θ_ref right after), so no second parameter-sized buffer exists; the restore is a copy.
* ``"compact"`` (exact, bit-identical to ``"full"``): ``CompactRef``, θ_ref as an 8- or 16-bit offset from the
  current θ in units in the last place, plus the true value wherever the offset does not fit. A quarter to a
  half of the extra memory of ``"full"`` in fp32; one host sync per reference step.
* ``"low"`` (approximate, no parameter-sized buffer): ``LowMemRef``, the paper's §3.4 momentum idea.

Two ways to form Δ (``delta=``):

* ``"exact"`` (default): ``IntendedDelta``, the displacement O_ref *intended*, kept apart from the rounded
  weights. At λ_ref = lr/ratio ≈ 1e-9…1e-6 most of a reference step is below the resolution of fp32 (bf16: of
  every realistic) weights, so θ − θ_ref read back from the weights is mostly rounding noise. Plain SGD
  accumulates −Σλ_ref·g in a buffer (fp32 for fp32/bf16/fp16 weights, fp64 for fp64); any other O_ref runs on a
  float64 shadow of θ, θ being the shadow rounded after each reference step, and Δ = shadow − θ_ref. Forward
  passes still run at the stored weights and the restore to θ_ref is still bit-exact.
* ``"weights"``: Δ = θ − θ_ref from the stored weights, what a literal implementation of Algorithm 1 computes
  (the code before ``delta`` existed, bit for bit).
"""


from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from profit_bench import UserError

__all__ = ["ProfitConfigError", "Displacement", "ThetaRef", "FullRef", "CompactRef", "LowMemRef", "IntendedDelta"]


class ProfitConfigError(UserError, ValueError):
    """A PROFIT argument or checkpoint that cannot work (a ValueError for library users, a UserError for CLIs).
    Defined here, below ``optim.py``, because the strategies raise it too; ``profit_bench.optim`` re-exports it."""


# ---------------------------------------------------------------------------------------------- θ_ref strategies
@dataclass
class Displacement:
    """Δ = scale·d over `params` (scale None means 1); `scratch`: the d tensors may be overwritten."""
    params: list[torch.Tensor]
    directions: list[torch.Tensor]
    scale: torch.Tensor | None
    scratch: bool


class ThetaRef:
    """How PROFIT keeps θ_ref from a cycle's first call to its main step.

    save(params) → the parameters taking part; reference_step(step) runs O_ref's step (``step()`` returns the
    plain-SGD moves (params, grads, alpha), or [] for any other O_ref); displacement() → Δ just before the
    projection; restore() puts θ_ref back (main step, ``finish()``); at_reference() is ``anchored()``;
    state_dict/load for checkpoints; nbytes() for the memory accounting.
    """

    any_ref = True  # works with any O_ref, not only plain SGD

    def __init__(self, main: Optimizer, process_group):
        self.params: list[torch.Tensor] = []  # the parameters of the current cycle

    def reference_step(self, step: Callable[[], list]) -> None:
        step()


class _ExactRef(ThetaRef):
    """θ_ref is stored; subclasses say how (refs(): θ_ref as tensors shaped like self.params)."""

    _pending = None  # θ_ref as returned by refs() at displacement(), reused by restore()

    def refs(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def displacement(self) -> Displacement:
        self._pending = refs = self.refs()
        if self.params:  # Δ is built in place in θ, which restore() overwrites right after: no buffer of its own
            torch._foreach_sub_(self.params, refs)
        return Displacement(self.params, self.params, None, scratch=True)

    def restore(self) -> None:
        refs, self._pending = self._pending or self.refs(), None
        if self.params:
            torch._foreach_copy_(self.params, refs)  # by copy: bit-exact

    @contextlib.contextmanager
    def at_reference(self) -> Iterator[None]:
        refs = self.refs()
        _swap(self.params, refs)
        try:
            yield
        finally:
            _swap(self.params, refs)

    @torch.no_grad()
    def state_dict(self, index) -> dict:
        order = sorted(range(len(self.params)), key=lambda k: index[self.params[k]])
        refs = self.refs()
        return {"in_cycle": [index[self.params[k]] for k in order],
                "refs": {index[self.params[k]]: refs[k].detach().clone() for k in order}}


class FullRef(_ExactRef):
    """memory="full": a copy of the trainable parameters (buffers kept across cycles)."""

    def __init__(self, main, process_group):
        super().__init__(main, process_group)
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}

    def save(self, params):
        self.params = params
        for p in params:
            if p not in self.buffers:
                self.buffers[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        if params:
            torch._foreach_copy_(self.refs(), params)
        return params

    def refs(self):
        return [self.buffers[p] for p in self.params]

    def load(self, params, refs, saved):
        self.params = params
        self.buffers = {p: refs[p].clone() for p in params}
        return params

    def nbytes(self) -> int:
        return _nbytes(self.buffers.values())


class CompactRef(_ExactRef):
    """memory="compact": θ_ref as ulp offsets from θ, one ``_CompactBucket`` per (device, dtype).

    Each reference step decodes θ_ref against θ, lets O_ref move θ and encodes θ_ref against the new θ.
    """

    def __init__(self, main, process_group):
        super().__init__(main, process_group)
        self.buckets: list[_CompactBucket] = []
        self._encoded = False  # False from save() to the first encode: θ_ref is θ itself

    def save(self, params):
        self.buckets = _CompactBucket.for_params(params, self.buckets)
        self.params = [p for b in self.buckets for p in b.params]
        self._encoded = False
        return self.params

    def reference_step(self, step):
        flat_refs = [b.decode() if self._encoded else b.flat_params() for b in self.buckets]
        step()
        for b, ref in zip(self.buckets, flat_refs):
            b.encode(ref)
        self._encoded = True

    @torch.no_grad()
    def refs(self):
        return [v for b in self.buckets for v in b.views(b.decode())]

    @torch.no_grad()
    def load(self, params, refs, saved):
        self.save(params)
        for b in self.buckets:
            b.encode(b.flatten([refs[p] for p in b.params]))
        self._encoded = True
        return self.params

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.buckets)


class LowMemRef(ThetaRef):
    """memory="low" (approximate, no parameter-sized buffer): the paper's §3.4 idea made concrete.

    Δ is replaced by its best approximation a·m in the span of the main optimizer's first-moment buffer m (SGD
    ``momentum_buffer``, Adam/AdamW/Adan ``exp_avg``), with a = ⟨m, Δ⟩/‖m‖² accumulated *exactly* during the
    plain-SGD reference steps (⟨m, Δ⟩ = −Σ λ_ref⟨m, g_i⟩, m being constant within a cycle). The projection
    then uses a·m for Δ and the restore is θ ← θ − a·m, so the part of Δ orthogonal to m stays in the weights (a
    drift of at most ‖Δ‖ per cycle). The first cycle, before the main optimizer has a buffer, takes no reference
    step. A stateful O_ref is refused: its step is not −λ_ref·g, so ⟨m, Δ⟩ could not be followed without a buffer.
    """

    any_ref = False
    MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")

    def __init__(self, main, process_group):
        super().__init__(main, process_group)
        self.main, self.process_group = main, process_group
        self.moments: dict[torch.Tensor, torch.Tensor] = {}
        self.m_dot_delta = torch.zeros(())
        self._a = None  # a of the main step, from displacement() to restore()

    def _first_moment(self, p: torch.Tensor) -> torch.Tensor | None:
        state = self.main.state.get(p, {})
        for key in self.MOMENTUM_KEYS:
            if torch.is_tensor(state.get(key)):
                return state[key]
        if state:
            raise ProfitConfigError(
                f"PROFIT(memory='low') needs a main optimizer with a first-moment buffer "
                f"({' or '.join(self.MOMENTUM_KEYS)}: SGD with momentum, Adam, AdamW, Adan); "
                f"{type(self.main).__name__} keeps {sorted(state)}; use memory='full' or 'compact'")
        return None

    def save(self, params):
        """Keep the parameters with a momentum buffer; ⟨m, Δ⟩ starts at 0."""
        self.moments = {p: m for p in params if (m := self._first_moment(p)) is not None}
        self.params = list(self.moments)
        first = self.params[0] if self.params else None
        dtype = torch.promote_types(first.dtype, torch.float32) if first is not None else torch.float32
        self.m_dot_delta = torch.zeros((), device=first.device if first is not None else "cpu", dtype=dtype)
        return self.params

    def reference_step(self, step):
        for params, grads, alpha in step():  # ⟨m, Δ⟩ grows by ⟨m, step⟩; m is constant within the cycle
            ms = [self.moments[p] for p in params]
            self.m_dot_delta += alpha * _sum_dots(ms, grads, self.m_dot_delta.device)

    def _coefficient(self) -> torch.Tensor:
        """a = ⟨m, Δ⟩/‖m‖², global over shards when a process group is set."""
        ms = list(self.moments.values())
        both = torch.stack([_sum_dots(ms, ms, self.m_dot_delta.device), self.m_dot_delta])
        if self.process_group is not None:
            dist.all_reduce(both, group=self.process_group)
        m_sq, m_dot_delta = both
        return torch.where(m_sq > 0, m_dot_delta / torch.where(m_sq > 0, m_sq, torch.ones_like(m_sq)), 0.0)

    def displacement(self) -> Displacement:
        self._a = self._coefficient() if self.params else None
        return Displacement(self.params, list(self.moments.values()), self._a, scratch=False)

    def restore(self) -> None:
        a, self._a = self._a, None
        self._shift(-1.0, a)

    @torch.no_grad()
    def _shift(self, sign: float, a=None) -> None:
        """θ ← θ + sign·a·m: sign = −1 moves to the approximate θ_ref."""
        if not self.params:
            return
        a = self._coefficient() if a is None else a
        for p, m in self.moments.items():
            p.addcmul_(m, (sign * a).to(p.device, p.dtype))

    @contextlib.contextmanager
    def at_reference(self) -> Iterator[None]:
        self._shift(-1.0)  # approximate θ_ref; the displaced weights come back up to rounding
        try:
            yield
        finally:
            self._shift(+1.0)

    def state_dict(self, index) -> dict:
        return {"in_cycle": sorted(index[p] for p in self.params), "m_dot_delta": self.m_dot_delta.clone()}

    def load(self, params, refs, saved):
        self.moments = {p: m for p in params if (m := self._first_moment(p)) is not None}
        self.params = list(self.moments)
        if saved.get("m_dot_delta") is not None:
            self.m_dot_delta = saved["m_dot_delta"].detach().clone()
        return self.params

    def nbytes(self) -> int:
        return 0  # m belongs to the main optimizer


# ---------------------------------------------------------------------------------------------- delta="exact"
class IntendedDelta:
    """Δ as O_ref intended it, kept beside the rounded weights (delta="exact"), one tensor per parameter, kept
    across cycles.

    Plain SGD (``shadow=False``): a buffer accumulating the moves −λ_ref·g of the reference steps, in
    ``promote(p.dtype, float32)``. The buffer holds Δ itself, not θ, so its relative error is that of a few
    additions of that dtype (~1e-7 in fp32) whatever the ratio: fp32 suffices for fp32, bf16 and fp16 weights.

    Any other O_ref (``shadow=True``): O_ref runs on a float64 shadow of θ (its state is float64 too), copied from
    θ at the cycle's start, and θ becomes the shadow rounded after each reference step; Δ = shadow − θ_ref is then
    exact to fp64's 2^-53·|θ| (relative 1e-16/λ_ref), which covers O_ref's weight decay and its state as well as
    the step. Any optimizer works that accepts float64 tensors: a device without float64 (MPS) is refused.
    """

    def __init__(self, shadow: bool):
        self.shadow = shadow
        self.tensors: dict[torch.Tensor, torch.Tensor] = {}
        self.params: list[torch.Tensor] = []

    def tensor_for(self, p: torch.Tensor) -> torch.Tensor:
        t = self.tensors.get(p)
        if t is None:
            if self.shadow and p.device.type == "mps":
                raise ProfitConfigError("PROFIT(delta='exact') runs a stateful O_ref on a float64 shadow, which "
                                        "MPS cannot hold; use ref='sgd' (a float32 Δ buffer) or delta='weights'")
            dtype = torch.float64 if self.shadow else torch.promote_types(p.dtype, torch.float32)
            t = self.tensors[p] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return t

    def save(self, params: list[torch.Tensor]) -> None:
        """Δ = 0 at θ_ref: the buffer is zeroed, the shadow copied from θ (exactly: float64 holds every value)."""
        self.params = params
        if params:
            ts = [self.tensor_for(p) for p in params]
            if self.shadow:
                torch._foreach_copy_(ts, params)
            else:
                torch._foreach_zero_(ts)

    def add(self, moved) -> None:
        """Accumulate plain-SGD moves (params, grads, alpha) of ``PROFIT._sgd_step``: Δ += alpha·g."""
        for params, grads, alpha in moved:
            bufs = [self.tensors[p] for p in params]
            grads = [g if g.dtype == b.dtype else g.to(b.dtype) for g, b in zip(grads, bufs)]
            if torch.is_tensor(alpha):
                torch._foreach_add_(bufs, torch._foreach_mul(grads, alpha.to(bufs[0].dtype)))
            else:
                torch._foreach_add_(bufs, grads, alpha=alpha)

    @torch.no_grad()
    def shadow_step(self, ref_opt: Optimizer, params: list[torch.Tensor]) -> None:
        """One O_ref step on the shadows of `params` (those with a gradient; the other shadows have none, so O_ref
        leaves them), then θ ← shadow, rounded once."""
        shadows = [self.tensors[p] for p in params]
        for p, s in zip(params, shadows):
            s.grad = p.grad.to(s.dtype)
        try:
            ref_opt.step()
        finally:
            for s in shadows:
                s.grad = None
        if params:
            torch._foreach_copy_(params, shadows)

    @torch.no_grad()
    def displacement(self, theta_ref: ThetaRef) -> Displacement:
        """Δ_exact over the cycle's parameters (free to overwrite: rebuilt at the next cycle's start)."""
        if not self.shadow:
            return Displacement(self.params, [self.tensors[p] for p in self.params], None, scratch=True)
        acc = [torch.promote_types(p.dtype, torch.float32) for p in self.params]
        deltas = [(self.tensors[p] - r).to(a) for p, r, a in zip(self.params, theta_ref.refs(), acc)]
        return Displacement(self.params, deltas, None, scratch=True)

    def state_dict(self, index) -> dict:
        return {index[p]: self.tensors[p].detach().clone() for p in self.params}

    @torch.no_grad()
    def load(self, params: list[torch.Tensor], saved: dict[torch.Tensor, torch.Tensor]) -> None:
        self.params = params
        for p in params:
            t = self.tensor_for(p)
            if p in saved:
                t.copy_(saved[p])
            elif self.shadow:  # a parameter that had no gradient yet: its shadow is θ
                t.copy_(p)
            else:
                t.zero_()

    def nbytes(self) -> int:
        return _nbytes(self.tensors.values())


# ---------------------------------------------------------------------------------------------- helpers
def _all_params(param_groups) -> list[torch.Tensor]:
    return [p for g in param_groups for p in g["params"]]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Accumulate in fp32 at least, whatever the parameter dtype.
    acc = torch.promote_types(a.dtype, torch.float32)
    return torch.dot(a.reshape(-1).to(acc), b.reshape(-1).to(acc))


def _sum_dots(xs, ys, device) -> torch.Tensor:
    return torch.stack([_dot(x, y).to(device) for x, y in zip(xs, ys)]).sum()


def _sum_sq(xs, device) -> torch.Tensor:
    """Σ‖x‖² from one multi-tensor norm kernel: cheaper than _sum_dots, for the diagnostics only (ω and ‖Δ‖² keep
    the dot products, whose rounding the exactness tests pin down)."""
    acc = torch.promote_types(xs[0].dtype, torch.float32)
    return torch.stack([n.to(device) for n in torch._foreach_norm(xs, 2, dtype=acc)]).square().sum()


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den, and 0 where den is 0 (an undefined cosine or ratio reads as 0)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _by_device(pairs):
    groups: dict[torch.device, list] = {}
    for d, g in pairs:
        groups.setdefault(d.device, []).append((d, g))
    return groups.values()


@torch.no_grad()
def _swap(params: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
    # One parameter at a time, so the swap needs at most one tensor-sized temporary.
    for p, r in zip(params, refs):
        tmp = p.detach().clone()
        p.copy_(r)
        r.copy_(tmp)


# ---------------------------------------------------------------------------------------------- memory="compact"
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


class _CompactBucket:
    """θ_ref of parameters that share a device and a dtype, kept as θ_ref = θ + an offset counted in ulps.

    Read as integers, the bits of same-signed floats are ordered and consecutive integers are consecutive floats,
    so bits(θ_ref) − bits(θ) counts the representable numbers between θ and θ_ref. A fine-tuning reference step
    (λ_ref = lr/ratio) moves most weights by a few to a few thousand ulps, so the offset fits an int8 or an int16
    for almost all of them. The rest — an offset out of range, a sign change (weights near 0), ±0 — are
    "escapes": their exact θ_ref value is kept beside their flat index (8 bytes each for fp32). Each encoding
    picks the narrower offset type when that costs fewer bytes in all. Decoding is an integer addition, so θ_ref
    comes back bit for bit whatever the offsets are; only the memory depends on them.

    Everything runs on one flat concatenation of the parameters (in their memory order, so channels_last costs
    no transpose): a few elementwise passes per cycle step and one host sync (the escape counts).
    The flat temporaries live only inside ``step()``, when the backward pass's activations are already freed.
    """

    WIDTHS = ((torch.int8, 2 ** 7 - 1), (torch.int16, 2 ** 15 - 1))

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.perms = [_memory_order(p) for p in params]
        self.sizes = [p.numel() for p in params]
        self.int_dtype = _BITS[params[0].dtype]
        dev = params[0].device
        n = sum(self.sizes)
        self.offsets = torch.zeros(0, dtype=torch.int8, device=dev)  # sized by the first encode()
        self.esc_idx = torch.zeros(0, dtype=torch.int32 if n < 2 ** 31 else torch.long, device=dev)
        self.esc_val = torch.zeros(0, dtype=params[0].dtype, device=dev)

    @classmethod
    def for_params(cls, params: list[torch.Tensor], previous=()) -> list[_CompactBucket]:
        """One per (device, dtype), in parameter order; buffers of an identical previous set are reused."""
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.dtype not in _BITS:
                raise ProfitConfigError(f"PROFIT(memory='compact') supports {', '.join(map(str, _BITS))} "
                                        f"parameters, got {p.dtype}; use memory='full'")
            buckets.setdefault((p.device, p.dtype), []).append(p)
        old = {tuple(map(id, c.params)): c for c in previous}
        return [old.get(tuple(map(id, ps))) or cls(ps) for ps in buckets.values()]

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A flat copy of tensors shaped like self.params, each in its parameter's memory order."""
        return torch.cat([t.permute(perm).reshape(-1) for t, perm in zip(tensors, self.perms)])

    def flat_params(self) -> torch.Tensor:
        return self.flatten(self.params)

    def encode(self, ref: torch.Tensor) -> None:
        """Store the flat θ_ref `ref` relative to the current parameters."""
        ref_bits, cur_bits = ref.view(self.int_dtype), self.flat_params().view(self.int_dtype)
        k = ref_bits - cur_bits  # wraps around only where the signs differ, and those escape anyway
        sign_change = (ref_bits ^ cur_bits) < 0
        escapes = [(k < -limit) | (k > limit) | sign_change for _, limit in self.WIDTHS]
        counts = torch.stack([e.sum() for e in escapes]).tolist()
        per_escape = self.esc_idx.element_size() + ref.element_size()
        cost = [k.numel() * dt.itemsize + per_escape * c for (dt, _), c in zip(self.WIDTHS, counts)]
        best = cost.index(min(cost))
        dtype, escape = self.WIDTHS[best][0], escapes[best]
        if self.offsets.dtype != dtype or self.offsets.numel() != k.numel():
            self.offsets = torch.empty(k.numel(), dtype=dtype, device=k.device)
        self.offsets.copy_(k.masked_fill_(escape, 0))
        # The count is known, so no second sync is needed to size the index list.
        self.esc_idx = torch.nonzero_static(escape, size=counts[best]).squeeze(1).to(self.esc_idx.dtype)
        self.esc_val = ref[self.esc_idx.long()]

    def decode(self) -> torch.Tensor:
        """The flat θ_ref, bit for bit (a temporary)."""
        flat = self.flat_params()
        flat.view(self.int_dtype).add_(self.offsets)
        flat[self.esc_idx.long()] = self.esc_val
        return flat

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat tensor with the shapes and strides of self.params."""
        out = []
        for chunk, p, perm in zip(flat.split(self.sizes), self.params, self.perms):
            inverse = sorted(range(len(perm)), key=perm.__getitem__)
            out.append(chunk.view([p.shape[d] for d in perm]).permute(inverse))
        return out

    @property
    def n_escapes(self) -> int:
        return self.esc_idx.numel()

    def nbytes(self) -> int:
        return _nbytes((self.offsets, self.esc_idx, self.esc_val))


def _memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions from the largest stride to the smallest: t.permute(order) is contiguous for a dense t (e.g.
    channels_last), so flattening it is a view. Any order would be correct; this one avoids a transpose."""
    return tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
