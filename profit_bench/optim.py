"""PROFIT: PROximally FIne-Tuning optimizer (Algorithm 1 of the paper), as a wrapper around any torch optimizer.

One ``step()`` per batch, like any optimizer. A cycle spans ``n_ref + 1`` calls:

* call 1 saves θ_ref ← θ, then every reference call takes a plain SGD step θ ← θ − λ_ref·g with
  λ_ref = group["lr"] / ratio read at that call (so it follows any LR schedule);
* the last call computes Δ = θ − θ_ref and ω = ⟨Δ, g⟩ over *all* parameters (one global dot product),
  projects g ← g − (ω/‖Δ‖²)·Δ when ω < 0, restores θ ← θ_ref by copy (bit-exact) and lets the main optimizer
  step with the projected gradient, so its momentum and weight decay act at θ_ref.

The fast path never syncs with the host: the ω < 0 decision is a ``torch.where`` on the device and all
per-parameter work uses ``torch._foreach_*`` kernels. θ_ref is the only extra copy of the parameters: Δ is
formed in place in θ (θ is overwritten by θ_ref right after), so no second parameter-sized buffer exists.

``profit_bench/reference.py`` holds a literal transcription of Algorithm 1; ``tests/test_optim.py`` checks that
this class agrees with it.

Three ways to keep θ_ref (``memory=``):

* ``"full"`` (default, exact): a copy of the trainable parameters.
* ``"compact"`` (exact, bit-identical to ``"full"``): θ_ref as an 8- or 16-bit offset from the current θ in units
  in the last place, plus the true value wherever the offset does not fit. A quarter to a half of the extra
  memory of ``"full"`` in fp32.
* ``"low"`` (approximate, no parameter-sized buffer): the paper's §3.4 momentum idea; see ``PROFIT.__init__``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.optim import Optimizer

__all__ = ["PROFIT", "MEMORY_MODES"]

MEMORY_MODES = ("full", "compact", "low")


class PROFIT(Optimizer):
    """Wrap ``main`` so that it fine-tunes proximally.

    Args:
        main: the main optimizer O (any ``torch.optim.Optimizer``). PROFIT shares its ``param_groups``, so an LR
            scheduler attached to either one drives both.
        ratio: λ_main / λ_ref. The reference (SGD) step size of a group is ``group["lr"] / ratio``.
        n_ref: reference steps per cycle (each consumes one batch). One main step per ``n_ref + 1`` calls.
        memory: ``"full"`` (exact Algorithm 1; one extra copy of the trainable parameters), ``"compact"``
            (exact and bit-identical to ``"full"``; 1 or 2 bytes per weight plus 8 per "escape", see
            ``_CompactRef``; it costs a few extra elementwise passes and one host sync per cycle step) or
            ``"low"`` (approximate, no extra parameter-sized buffer). ``"low"`` is the paper's §3.4 idea made concrete:
            Δ is replaced by its best approximation a·m in the span of the main optimizer's first-moment buffer m
            (SGD ``momentum_buffer``, Adam/AdamW/Adan ``exp_avg``), with a = ⟨m, Δ⟩/‖m‖² accumulated *exactly*
            during the reference steps (⟨m, Δ⟩ = −Σ λ_ref⟨m, g_i⟩, m being constant within a cycle). The
            projection then uses a·m for Δ and the restore is θ ← θ − a·m, so the part of Δ orthogonal to m
            stays in the weights (a drift of at most ‖Δ‖ per cycle). The first cycle, before the main optimizer
            has a buffer, takes no reference step. See docs/performance.md for its measured deviation.
        process_group: set when parameters are *sharded* across ranks (FSDP, ZeRO): ω and ‖Δ‖² are then
            all-reduced over it (two scalars per main step). Leave ``None`` for replicated parameters (DDP),
            whose gradients are already identical on every rank.
    """

    def __init__(self, main: Optimizer, *, ratio: float = 100.0, n_ref: int = 1, memory: str = "full",
                 process_group: dist.ProcessGroup | None = None):
        if not isinstance(main, Optimizer):
            raise TypeError(f"PROFIT wraps a torch.optim.Optimizer, got {type(main).__name__}")
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0, got {ratio}")
        if int(n_ref) != n_ref or n_ref < 1:
            raise ValueError(f"n_ref must be an integer >= 1, got {n_ref}")
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORY_MODES))}, got {memory!r}")
        self.main = main
        self.memory = memory
        self.ratio = float(ratio)
        self.n_ref = int(n_ref)
        self.process_group = process_group
        self.phase = 0  # calls already made in the current cycle; the call with phase == n_ref is the main step
        self.main_steps = 0
        self._compact: list[_CompactRef] = []  # memory="compact": θ_ref of the cycle, one per (device, dtype)
        super().__init__(main.param_groups, main.defaults)
        # Share the very list, not only its dicts, so groups added to `main` later are seen here too.
        self.param_groups = main.param_groups

    # ------------------------------------------------------------------ public helpers
    @property
    def is_main_step(self) -> bool:
        """True when the next ``step()`` is the main step of the cycle."""
        return self.phase == self.n_ref

    @property
    def mid_cycle(self) -> bool:
        """True between the first reference step and the main step: θ is displaced from θ_ref."""
        return self.phase > 0

    @contextlib.contextmanager
    def anchored(self) -> Iterator[None]:
        """Evaluate at θ_ref: mid-cycle, swap θ_ref in and put the displaced weights back afterwards."""
        if not self.mid_cycle:
            yield
            return
        if self.memory == "low":  # approximate θ_ref; the displaced weights come back up to rounding
            self._shift_low(-1.0)
            try:
                yield
            finally:
                self._shift_low(+1.0)
            return
        params, refs = self._saved()
        self._swap(params, refs)
        try:
            yield
        finally:
            self._swap(params, refs)

    @torch.no_grad()
    def finish(self) -> None:
        """End training at θ_ref: abandon a cycle in progress (its reference steps are undone exactly)."""
        if self.mid_cycle and self.memory == "low":
            self._shift_low(-1.0)
        elif self.mid_cycle:
            params, refs = self._saved()
            torch._foreach_copy_(params, refs)
        self.phase = 0

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.phase < self.n_ref:
            if self.memory == "compact":
                self._compact_reference_step()
            else:
                if self.phase == 0:
                    self._start_low_memory_cycle() if self.memory == "low" else self._save_reference()
                self._reference_step()
            self.phase += 1
        else:
            if self.memory == "low":
                self._project_and_restore_low()
            else:
                self._project_and_restore(*self._saved())  # compact: the decoded θ_ref is freed on return
            self.main.step()
            self.phase = 0
            self.main_steps += 1
        return loss

    def _mark_cycle(self, keep_copy: bool) -> list[torch.Tensor]:
        """The parameters with a gradient now take part in this cycle; the others are never moved in it."""
        params = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["in_cycle"] = p.grad is not None
                if p.grad is None:
                    continue
                params.append(p)
                if keep_copy and "ref" not in state:
                    state["ref"] = torch.empty_like(p, memory_format=torch.preserve_format)
        return params

    def _save_reference(self) -> None:
        """θ_ref ← θ (memory="full")."""
        self._mark_cycle(keep_copy=True)
        params, refs = self._saved()
        if params:
            torch._foreach_copy_(refs, params)

    def _compact_reference_step(self) -> None:
        """A reference step with θ_ref held as ulp offsets: decode θ_ref, move θ, encode θ_ref against the new θ."""
        if self.phase == 0:
            self._compact = _CompactRef.for_params(self._mark_cycle(keep_copy=False), self._compact)
            refs = [c.flat_params() for c in self._compact]  # θ is θ_ref at the start of a cycle
        else:
            refs = [c.decode() for c in self._compact]
        self._reference_step()
        for c, ref in zip(self._compact, refs):
            c.encode(ref)

    def _reference_step(self) -> None:
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is not None and self.state[p].get("in_cycle", False):
                    params.append(p)
                    grads.append(p.grad)
            if not params:
                continue
            lr = group["lr"]
            lr_ref = (lr.item() if torch.is_tensor(lr) else lr) / self.ratio
            sign = 1.0 if group.get("maximize", False) else -1.0
            if self.memory == "low":  # ⟨m, Δ⟩ grows by ⟨m, step⟩; m is constant within the cycle
                ms = [self.state[p]["m"] for p in params]
                self._m_dot_delta += sign * lr_ref * _sum_dots(ms, grads, self._m_dot_delta.device)
            torch._foreach_add_(params, grads, alpha=sign * lr_ref)

    def _project_and_restore(self, params: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
        if not params:
            return
        # Δ is built in place in θ: θ is about to be overwritten by θ_ref, so Δ needs no buffer of its own.
        torch._foreach_sub_(params, refs)
        deltas = params
        pairs = [(d, p.grad) for d, p in zip(deltas, params) if p.grad is not None]
        if pairs:
            d_g = [d for d, _ in pairs]
            g_g = [g for _, g in pairs]
            omega, delta_sq = self._global_dots(d_g, g_g)
            # Projection coefficient ω/‖Δ‖² where ω < 0, else 0 — decided on the device, no host sync.
            # ‖Δ‖ = 0 gives 0 (no projection) without any epsilon that would bias small Δ.
            safe_sq = torch.where(delta_sq > 0, delta_sq, torch.ones_like(delta_sq))
            coef = torch.where((omega < 0) & (delta_sq > 0), omega / safe_sq, torch.zeros_like(omega))
            for device_pairs in _by_device(pairs):
                d_dev = [d for d, _ in device_pairs]
                g_dev = [g for _, g in device_pairs]
                c = coef.to(d_dev[0].device)
                torch._foreach_mul_(d_dev, -c)  # the Δ buffers (= θ) are scratch from here on
                torch._foreach_add_(g_dev, d_dev)
        torch._foreach_copy_(params, refs)  # restore θ ← θ_ref by copy: bit-exact

    def _global_dots(self, deltas, grads):
        """ω = ⟨Δ, g⟩ and ‖Δ‖² summed over every parameter of every group, as 0-d device tensors.

        Both run over the parameters that have a gradient now, so the projected g is orthogonal to the Δ of
        exactly the parameters the main step will move.
        """
        dev = deltas[0].device
        omega = torch.stack([_dot(d, g).to(dev) for d, g in zip(deltas, grads)]).sum()
        delta_sq = torch.stack([_dot(d, d).to(dev) for d in deltas]).sum()
        if self.process_group is not None:
            both = torch.stack([omega, delta_sq])
            dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.process_group)
            omega, delta_sq = both[0], both[1]
        return omega, delta_sq


    # ------------------------------------------------------------------ memory="low"
    _MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")

    def _first_moment(self, p: torch.Tensor) -> torch.Tensor | None:
        state = self.main.state.get(p, {})
        for key in self._MOMENTUM_KEYS:
            if torch.is_tensor(state.get(key)):
                return state[key]
        if state:
            raise ValueError(f"PROFIT(memory='low') needs a main optimizer with a first-moment buffer "
                             f"({' or '.join(self._MOMENTUM_KEYS)}: SGD with momentum, Adam, AdamW, Adan); "
                             f"{type(self.main).__name__} keeps {sorted(state)}")
        return None

    def _start_low_memory_cycle(self) -> None:
        """Pick the parameters with a gradient and a momentum buffer; ⟨m, Δ⟩ starts at 0."""
        first = None
        for group in self.param_groups:
            for p in group["params"]:
                m = self._first_moment(p) if p.grad is not None else None
                self.state[p]["in_cycle"] = m is not None
                if m is not None:
                    self.state[p]["m"] = m
                    first = first if first is not None else p
                else:
                    self.state[p].pop("m", None)
        dtype = torch.promote_types(first.dtype, torch.float32) if first is not None else torch.float32
        self._m_dot_delta = torch.zeros((), device=first.device if first is not None else "cpu", dtype=dtype)

    def _low_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self._cycle_buffers("m")

    def _m_sq(self, ms) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖m‖², ⟨m, Δ⟩), global over shards when a process group is set."""
        m_sq = _sum_dots(ms, ms, self._m_dot_delta.device)
        if self.process_group is not None:
            both = torch.stack([m_sq, self._m_dot_delta])
            dist.all_reduce(both, group=self.process_group)
            return both[0], both[1]
        return m_sq, self._m_dot_delta

    @torch.no_grad()
    def _shift_low(self, sign: float) -> None:
        """θ ← θ + sign·a·m with a = ⟨m, Δ⟩/‖m‖²: sign = −1 moves to the approximate θ_ref."""
        params, ms = self._low_pairs()
        if not params:
            return
        m_sq, m_dot_delta = self._m_sq(ms)
        a = torch.where(m_sq > 0, m_dot_delta / torch.where(m_sq > 0, m_sq, torch.ones_like(m_sq)), 0.0)
        for p, m in zip(params, ms):
            p.addcmul_(m, (sign * a).to(p.device, p.dtype))

    def _project_and_restore_low(self) -> None:
        params, ms = self._low_pairs()
        if not params:
            return
        m_sq, m_dot_delta = self._m_sq(ms)
        with_grad = [(p, m) for p, m in zip(params, ms) if p.grad is not None]
        if with_grad:
            grads = [p.grad for p, _ in with_grad]
            m_g = [m for _, m in with_grad]
            m_dot_g = _sum_dots(m_g, grads, m_sq.device)
            if self.process_group is not None:
                dist.all_reduce(m_dot_g, group=self.process_group)
            # Δ ≈ a·m, so ω = a⟨m, g⟩ and the projection of g off Δ is the projection off m.
            omega = m_dot_delta * m_dot_g
            safe = torch.where(m_sq > 0, m_sq, torch.ones_like(m_sq))
            coef = torch.where((omega < 0) & (m_sq > 0), m_dot_g / safe, torch.zeros_like(m_sq))
            for g, m in zip(grads, m_g):
                g.addcmul_(m, (-coef).to(g.device, g.dtype))
        self._shift_low(-1.0)

    # ------------------------------------------------------------------ state
    def _saved(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The parameters of the current cycle and their θ_ref (memory="compact": decoded, a temporary)."""
        if self.memory == "compact":
            params, refs = [], []
            for c in self._compact:
                params += c.params
                refs += c.views(c.decode())
            return params, refs
        return self._cycle_buffers("ref")

    def extra_state_bytes(self) -> int:
        """Bytes PROFIT keeps between steps on top of the main optimizer: θ_ref, or its compact form."""
        if self.memory == "compact":
            return sum(c.nbytes() for c in self._compact)
        return sum(s["ref"].numel() * s["ref"].element_size() for s in self.state.values() if "ref" in s)

    def _cycle_buffers(self, key: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Parameters taking part in the current cycle and their state[key] (θ_ref, or the first moment m)."""
        params, bufs = [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and state.get("in_cycle", False) and key in state:
                    params.append(p)
                    bufs.append(state[key])
        return params, bufs

    @staticmethod
    @torch.no_grad()
    def _swap(params: list[torch.Tensor], refs: list[torch.Tensor]) -> None:
        # One parameter at a time, so the swap needs at most one tensor-sized temporary.
        for p, r in zip(params, refs):
            tmp = p.detach().clone()
            p.copy_(r)
            r.copy_(tmp)

    def state_dict(self) -> dict:
        """The main optimizer's state plus PROFIT's cycle position and θ_ref (by parameter index)."""
        params = _all_params(self.param_groups)
        refs, in_cycle = {}, []
        if self.mid_cycle:
            in_cycle = [i for i, p in enumerate(params) if self.state.get(p, {}).get("in_cycle", False)]
            if self.memory != "low":
                by_param = dict(zip(*self._saved()))
                refs = {i: by_param[params[i]].clone() if self.memory == "compact" else by_param[params[i]]
                        for i in in_cycle}
        return {
            "main": self.main.state_dict(),
            "profit": {"ratio": self.ratio, "n_ref": self.n_ref, "memory": self.memory, "phase": self.phase,
                       "main_steps": self.main_steps, "refs": refs, "in_cycle": in_cycle,
                       "m_dot_delta": getattr(self, "_m_dot_delta", None)},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.main.load_state_dict(state_dict["main"])
        self.param_groups = self.main.param_groups  # load_state_dict rebuilt the group dicts
        saved = state_dict["profit"]
        self.ratio, self.n_ref = float(saved["ratio"]), int(saved["n_ref"])
        self.phase, self.main_steps = int(saved["phase"]), int(saved["main_steps"])
        exact = ("full", "compact")
        if not (self.memory in exact and saved.get("memory", "full") in exact):  # exact modes read each other
            self.memory = saved.get("memory", "full")
        params = _all_params(self.param_groups)
        self.state.clear()
        self._compact = []
        cycle = [params[int(i)] for i in saved.get("in_cycle", saved["refs"].keys())]
        refs = {}
        for i, r in saved["refs"].items():
            p = params[int(i)]
            refs[p] = r.detach().to(device=p.device, dtype=p.dtype)
        for p in cycle:
            self.state[p]["in_cycle"] = True
            if self.memory == "low":
                self.state[p]["m"] = self._first_moment(p)
            elif self.memory == "full":
                self.state[p]["ref"] = refs[p].clone()
        if self.memory == "compact" and cycle:
            self._compact = _CompactRef.for_params(cycle)
            for c in self._compact:
                c.encode(c.flatten([refs[p] for p in c.params]))
        if saved.get("m_dot_delta") is not None:
            self._m_dot_delta = saved["m_dot_delta"].detach().clone()

    def __repr__(self) -> str:
        mem = "" if self.memory == "full" else f", memory={self.memory!r}"
        return f"PROFIT(ratio={self.ratio:g}, n_ref={self.n_ref}{mem}, main={self.main!r})"


def _all_params(param_groups) -> list[torch.Tensor]:
    return [p for g in param_groups for p in g["params"]]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Accumulate in fp32 at least, whatever the parameter dtype.
    acc = torch.promote_types(a.dtype, torch.float32)
    return torch.dot(a.reshape(-1).to(acc), b.reshape(-1).to(acc))


def _sum_dots(xs, ys, device) -> torch.Tensor:
    return torch.stack([_dot(x, y).to(device) for x, y in zip(xs, ys)]).sum()


def _by_device(pairs):
    groups: dict[torch.device, list] = {}
    for d, g in pairs:
        groups.setdefault(d.device, []).append((d, g))
    return groups.values()


# ---------------------------------------------------------------------------------------------- memory="compact"
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


class _CompactRef:
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
    def for_params(cls, params: list[torch.Tensor], previous: list[_CompactRef] = ()) -> list[_CompactRef]:
        """One per (device, dtype), in parameter order; buffers of an identical previous set are reused."""
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.dtype not in _BITS:
                raise ValueError(f"PROFIT(memory='compact') supports {', '.join(map(str, _BITS))} parameters, "
                                 f"got {p.dtype}")
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
        return sum(t.numel() * t.element_size() for t in (self.offsets, self.esc_idx, self.esc_val))


def _memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions from the largest stride to the smallest: t.permute(order) is contiguous for a dense t (e.g.
    channels_last), so flattening it is a view. Any order would be correct; this one avoids a transpose."""
    return tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
