"""PROFIT: PROximally FIne-Tuning optimizer (Algorithm 1 of the paper), as a wrapper around any torch optimizer.

One ``step()`` per batch, like any optimizer. A cycle spans ``n_ref + 1`` calls:

* call 1 saves θ_ref ← θ; every reference call takes one step of the reference optimizer O_ref at
  λ_ref = group["lr"] / ratio, read at that call (so it follows any LR schedule);
* the last call computes Δ = θ − θ_ref and ω = ⟨Δ, g⟩ over *all* parameters (one global dot product),
  projects g ← g − (ω/‖Δ‖²)·Δ when ω < 0, restores θ ← θ_ref and lets the main optimizer step with the
  projected gradient, so its momentum and weight decay act at θ_ref.

O_ref defaults to plain SGD (the paper's recommendation), which runs as fused ``torch._foreach_*`` kernels and
never syncs with the host, even with a tensor ``lr``: the ω < 0 decision is a ``torch.where`` on the device.
Any other O_ref (``ref="adam"``, a factory ...) is a real torch optimizer over the same parameters, with its
own state, kept across cycles.

``profit_bench/reference.py`` holds a literal transcription of Algorithm 1; ``tests/test_optim.py`` checks that
this class agrees with it.

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

__all__ = ["PROFIT", "MEMORY_MODES", "DELTA_MODES", "REF_OPTIMIZERS", "DIAGNOSTICS", "ProfitConfigError",
           "ThetaRef", "FullRef", "CompactRef", "LowMemRef", "IntendedDelta", "MainStepScheduler"]

MEMORY_MODES = ("full", "compact", "low")
DELTA_MODES = ("exact", "weights")
REF_OPTIMIZERS = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam,
                  "adamw": torch.optim.AdamW}
# Means over the main steps since the last diagnostics() call (a "window"). cos_g_delta is cos(g, Δ) before the
# projection, with g the gradient of the minimised loss; perp_ratio is ‖g_projected‖/‖g‖ = √(1 − cos²) on
# projected steps and 1 on the others; delta_rel is ‖Δ‖/‖θ_ref‖ (memory="low": its approximate Δ), with ‖θ_ref‖
# taken at the window's first cycle: θ moves little within a window, and this saves a pass over the weights per
# cycle. delta_lost is ‖Δ_weights − Δ_exact‖/‖Δ_exact‖, the fraction of the intended displacement that rounding
# of the stored weights erased (0: the ratio is real; ~1: Δ read from the weights is noise); it is reported
# only where Δ_exact is known (memory "full"/"compact" with delta="exact", or delta="weights" with plain-SGD O_ref).
DIAGNOSTICS = ("profit_projected_frac", "profit_cos_g_delta", "profit_perp_ratio", "profit_delta_rel",
               "profit_delta_lost")


class ProfitConfigError(UserError, ValueError):
    """A PROFIT argument or checkpoint that cannot work (a ValueError for library users, a UserError for CLIs)."""


class PROFIT(Optimizer):
    """Wrap ``main`` so that it fine-tunes proximally.

    Args:
        main: the main optimizer O (any ``torch.optim.Optimizer``). PROFIT shares its ``param_groups``, so an LR
            scheduler attached to either one drives both.
        ratio: λ_main / λ_ref. The reference step size of a group is ``group["lr"] / ratio``.
        n_ref: reference steps per cycle (each consumes one batch). One main step per ``n_ref + 1`` calls.
        ref: O_ref: a name of ``REF_OPTIMIZERS`` or a factory ``param_groups -> Optimizer``. ``"sgd"`` without
            ``ref_kwargs`` is plain SGD on the fused path; anything else is a torch optimizer with one group per
            main group (its lr is set before every reference step; a tensor lr is read as a float there).
        ref_kwargs: keyword arguments of a named O_ref (``momentum=0.9``, ``betas=...``).
        memory: how θ_ref is kept, see the module docstring and the ``ThetaRef`` classes.
        delta: ``"exact"`` (Δ as O_ref intended it, ``IntendedDelta``) or ``"weights"`` (θ − θ_ref read back from
            the rounded weights, as the paper's Algorithm 1 literally computes). ``memory="low"`` follows its Δ
            from the updates in either mode.
        diagnostics: keep the per-main-step terms of ``DIAGNOSTICS`` for ``diagnostics()`` (off by default: a norm
            of the gradients and, for ``profit_delta_lost``, three passes over the weights per main step, ~7 % of a
            toy-MLP batch on a CPU; the harness, ``trial.py``, turns them on). With ``delta="weights"`` and plain
            SGD they also keep a Δ_exact buffer, for ``profit_delta_lost`` only.
        process_group: set when parameters are *sharded* across ranks (FSDP, ZeRO): the global dot products are
            then all-reduced over it (one 4-scalar all-reduce per main step). Leave ``None`` for replicated
            parameters (DDP), whose gradients are already identical on every rank.
    """

    def __init__(self, main: Optimizer, *, ratio: float = 100.0, n_ref: int = 1, ref: str | Callable = "sgd",
                 ref_kwargs: dict | None = None, memory: str = "full", delta: str = "exact",
                 diagnostics: bool = False, process_group: dist.ProcessGroup | None = None):
        if not isinstance(main, Optimizer) or isinstance(main, PROFIT):
            raise TypeError(f"PROFIT wraps a plain torch.optim.Optimizer, got {type(main).__name__}")
        if not ratio > 0:
            raise ProfitConfigError(f"ratio must be > 0, got {ratio}")
        if int(n_ref) != n_ref or n_ref < 1:
            raise ProfitConfigError(f"n_ref must be an integer >= 1, got {n_ref}")
        if memory not in MEMORY_MODES:
            raise ProfitConfigError(f"memory must be one of {', '.join(map(repr, MEMORY_MODES))}, got {memory!r}")
        if delta not in DELTA_MODES:
            raise ProfitConfigError(f"delta must be one of {', '.join(map(repr, DELTA_MODES))}, got {delta!r}")
        self.main, self.memory, self.process_group = main, memory, process_group
        self.delta, self.diagnose = delta, bool(diagnostics)
        self.ratio, self.n_ref = float(ratio), int(n_ref)
        self.phase = 0  # calls already made in the current cycle; the call with phase == n_ref is the main step
        self.main_steps = 0
        self.theta_ref = {"full": FullRef, "compact": CompactRef, "low": LowMemRef}[memory](main, process_group)
        stateful_ref = not (ref == "sgd" and not ref_kwargs)
        if stateful_ref and not self.theta_ref.any_ref:
            raise ProfitConfigError(f"memory={memory!r} follows Δ through plain-SGD reference steps only; use "
                                    f"ref='sgd' without ref_kwargs, or memory='full'/'compact'")
        # Δ_exact is kept for delta="exact", and for the delta_lost diagnostic of plain SGD with delta="weights"
        # (a shadow would change a weights run's trajectory); "low" keeps no θ_ref to compare with.
        wanted = delta == "exact" or (self.diagnose and not stateful_ref)
        self.intended = IntendedDelta(shadow=stateful_ref) if wanted and memory != "low" else None
        self.ref_name, self.ref_opt = _build_ref(ref, dict(ref_kwargs or {}), main.param_groups, self.ratio,
                                                 self._ref_tensor)
        self._cycle: set[torch.Tensor] = set()
        self._intended_live = False  # the intended Δ of the current cycle is known (not after a foreign load)
        self._ref_sq = None  # ‖θ_ref‖² at the first cycle of the diagnostics window (a device scalar)
        self._in_anchored = False
        self._diag_raw, self._diag_sum, self._diag_n = [], None, 0
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
        if self._in_anchored:
            raise RuntimeError("PROFIT.anchored() is already active; it does not nest")
        self._in_anchored = True
        try:
            with self.theta_ref.at_reference() if self.mid_cycle and not self._eval_mode else contextlib.nullcontext():
                yield
        finally:
            self._in_anchored = False

    @torch.no_grad()
    def finish(self) -> None:
        """End training at θ_ref: abandon a cycle in progress (its reference steps are undone)."""
        self._close_eval_swap()  # in eval mode θ_ref is in already; the set-aside training weights are dropped
        if self.mid_cycle:
            self.theta_ref.restore()
        self.phase = 0

    def extra_state_bytes(self) -> int:
        """Bytes PROFIT keeps between steps on top of the main optimizer: θ_ref (or its compact form), the intended
        Δ (buffer or shadow) and O_ref's state."""
        ref_state = self.ref_opt.state.values() if self.ref_opt is not None else ()
        intended = self.intended.nbytes() if self.intended is not None else 0
        return self.theta_ref.nbytes() + intended + sum(_nbytes(s.values()) for s in ref_state)

    def diagnostics(self) -> dict[str, float]:
        """Means of ``DIAGNOSTICS`` over the main steps since the last call (then reset); {} if there were none.
        The only host sync of the diagnostics."""
        if not self._diag_n:
            return {}
        self._fold_diagnostics()
        sums, (lost_sum, lost_n) = self._diag_sum[:-2], self._diag_sum[-2:]
        out = dict(zip(DIAGNOSTICS, (sums / self._diag_n).tolist()))
        if lost_n > 0:  # steps whose Δ_exact was known
            out["profit_delta_lost"] = (lost_sum / lost_n).item()
        self._diag_sum, self._diag_n = None, 0
        return out

    def _fold_diagnostics(self) -> None:
        """Turn the kept raw terms into the running sums of DIAGNOSTICS (device ops only)."""
        if not self._diag_raw:
            return
        omega, delta_sq, g_sq, ref_sq, projected, lost_sq, exact_sq, known = torch.stack(self._diag_raw).unbind(1)
        values = _diagnostic_values(omega, delta_sq, g_sq, ref_sq, projected.bool())
        lost = torch.where(known > 0, _safe_div(lost_sq.sqrt(), exact_sq.sqrt()), torch.zeros_like(lost_sq))
        values = torch.cat([values, lost[None], known[None]]).sum(dim=1)
        self._diag_sum = values if self._diag_sum is None else self._diag_sum + values
        self._diag_raw = []

    # ------------------------------------------------------------------ framework hooks
    # The schedule-free optimizers' convention, which Hugging Face Trainer (and accelerate's wrapped optimizer) call
    # when an optimizer has them: eval() before evaluating or saving, train() before training again.
    _eval_mode = False
    _eval_swap: contextlib.ExitStack | None = None  # open while θ_ref is swapped in and the training weights out

    @property
    def evaluating(self) -> bool:
        """True between eval() and train()."""
        return self._eval_mode

    def eval(self) -> None:
        """Weights ← θ_ref for evaluation or saving. Mid-cycle the displaced training weights are set aside (the
        θ_ref strategy's ``at_reference()``, as in ``anchored()``) until ``train()``. Idempotent; ``step()``
        raises in eval mode."""
        if self._eval_mode:
            return
        if self._in_anchored:
            raise RuntimeError("PROFIT.eval() inside anchored(): the weights are θ_ref already")
        if self.mid_cycle:
            swap = contextlib.ExitStack()
            swap.enter_context(self.theta_ref.at_reference())
            self._eval_swap = swap
        self._eval_mode = True

    def train(self) -> None:
        """Back to the training weights after ``eval()`` (the cycle goes on where it was). Idempotent."""
        if not self._eval_mode:
            return
        if self._in_anchored:
            raise RuntimeError("PROFIT.train() inside anchored(): leave anchored() first")
        self._close_eval_swap()
        self._eval_mode = False

    def _close_eval_swap(self) -> None:
        swap, self._eval_swap = self._eval_swap, None
        if swap is not None:
            swap.close()  # at_reference() swaps the training weights back

    def _eval_state_dict(self) -> dict:
        """state_dict() in eval mode mid-cycle. Checkpoints taken now (Trainer saves right after evaluating) hold
        the model at θ_ref, so the optimizer's part records the cycle as abandoned, as ``finish()`` would: resuming
        starts a fresh cycle at θ_ref (up to n_ref reference steps are redone). The live optimizer keeps its cycle."""
        phase, swap = self.phase, self._eval_swap
        self.phase, self._eval_swap = 0, None
        try:
            return self.state_dict()
        finally:
            self.phase, self._eval_swap = phase, swap

    # ------------------------------------------------------------------ Algorithm 1
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        if self._in_anchored:
            raise RuntimeError("PROFIT.step() inside anchored(): the weights are θ_ref, not the training weights")
        if self._eval_mode:
            raise RuntimeError("PROFIT.step() in eval mode: the weights are θ_ref; call optimizer.train() before "
                               "training again")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.phase < self.n_ref:
            if self.phase == 0:
                self._save_reference()                                  # line 6: θ_ref ← θ
            self.theta_ref.reference_step(self._reference_step)         # line 9: θ ← O_ref(θ, g)
            self.phase += 1
        else:
            self._project()                                             # lines 12-17: g ← g ⟂ Δ if ω < 0
            self.theta_ref.restore()                                    # line 18: θ ← θ_ref
            self.main.step()                                            # line 19: θ ← O(θ, g)
            self.phase = 0
            self.main_steps += 1
        return loss

    def _save_reference(self) -> None:
        """The parameters with a gradient now take part in this cycle; the others are never moved in it."""
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        cycle = self.theta_ref.save(with_grad)
        self._cycle = set(cycle)
        if self.intended is not None:
            self.intended.save(cycle)
            self._intended_live = True
        if self.diagnose and cycle and (self._ref_sq is None or self._diag_n == 0):  # once per window
            self._ref_sq = _sum_sq(cycle, cycle[0].device)

    def _reference_step(self):
        if self.ref_opt is None:
            moved = self._sgd_step()
            if self.intended is not None:
                self.intended.add(moved)
            return moved
        for group, ref_group in zip(self.param_groups, self._ref_groups()):
            ref_group["lr"] = float(group["lr"]) / self.ratio
        if self.intended is not None:  # O_ref runs on the shadow; θ becomes the shadow rounded
            self.intended.shadow_step(self.ref_opt, [p for p in self.theta_ref.params if p.grad is not None])
            return []
        # Parameters outside the cycle have no saved θ_ref: O_ref must not move them.
        with _hidden_grads([p for g in self.param_groups for p in g["params"] if p not in self._cycle]):
            self.ref_opt.step()
        return []

    def _ref_tensor(self, p: torch.Tensor) -> torch.Tensor:
        """What O_ref steps for parameter p: p itself, or its high-precision shadow (delta="exact")."""
        return p if self.intended is None else self.intended.tensor_for(p)

    def _sgd_step(self) -> list[tuple[list, list, float | torch.Tensor]]:
        """θ ← θ ∓ λ_ref·g per group; returns (params, grads, ∓λ_ref) of each group for the θ_ref strategy."""
        moved = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p in self._cycle]
            if not params:
                continue
            grads = [p.grad for p in params]
            sign = 1.0 if group.get("maximize", False) else -1.0
            if torch.is_tensor(group["lr"]):  # a device scalar: multiply on the device rather than read it
                alpha = group["lr"] * (sign / self.ratio)
                torch._foreach_add_(params, torch._foreach_mul(grads, alpha))
            else:
                alpha = sign * (group["lr"] / self.ratio)
                torch._foreach_add_(params, grads, alpha=alpha)
            moved.append((params, grads, alpha))
        return moved

    def _ref_groups(self) -> list[dict]:
        """O_ref's groups, one per main group (groups added to main since are added here too)."""
        for group in self.param_groups[len(self.ref_opt.param_groups):]:
            self.ref_opt.add_param_group(_ref_group(group, self.ratio, self._ref_tensor))
        return self.ref_opt.param_groups

    def _project(self) -> None:
        """g ← g − (ω/‖Δ‖²)·Δ where ω = ⟨Δ, g⟩ < 0, global over all parameters, decided on the device."""
        # ω is taken with the gradient of the loss, −g when maximizing: maximize = minimise −objective.
        loss_sign = -1.0 if _maximizing(self.param_groups) else 1.0  # (checked before θ is touched)
        # Δ_exact first: the shadow's Δ needs θ_ref, which "compact" decodes against θ before θ turns into Δ_weights.
        exact = self.intended.displacement(self.theta_ref) if self.intended and self._intended_live else None
        use_exact = self.delta == "exact" and exact is not None
        track = self.diagnose and exact is not None  # the delta_lost diagnostic
        disp = self.theta_ref.displacement() if not use_exact or track else None
        lost = _lost_terms(disp, exact, scratch=use_exact) if track else None
        if use_exact:
            disp = exact
        pairs = [(d, p.grad) for p, d in zip(disp.params, disp.directions) if p.grad is not None]
        if not pairs:
            return
        ds, gs = [d for d, _ in pairs], [g for _, g in pairs]
        dev = ds[0].device
        terms = [_sum_dots(ds, gs, dev), _sum_dots(ds, ds, dev)]
        if self.diagnose:
            zero = torch.zeros((), device=dev, dtype=terms[0].dtype)
            lost_sq, exact_sq = lost or (zero, zero)
            terms += [_sum_sq(gs, dev), self._ref_sq.to(dev), lost_sq.to(dev),
                      terms[1] if exact_sq is None else exact_sq.to(dev)]
        sums = torch.stack(terms)
        if self.process_group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.process_group)
        d_g, d_sq = sums[0], sums[1]
        s = disp.scale  # Δ = s·d
        omega, delta_sq = (d_g, d_sq) if s is None else (s * d_g, s * s * d_sq)
        if loss_sign < 0:
            omega = -omega
        # ‖Δ‖ = 0 gives no projection without any epsilon that would bias small Δ.
        projected = (omega < 0) & (d_sq > 0)
        coef = torch.where(projected, d_g / torch.where(d_sq > 0, d_sq, torch.ones_like(d_sq)),
                           torch.zeros_like(d_g))
        for device_pairs in _by_device(pairs):
            d_dev, g_dev = [d for d, _ in device_pairs], [g for _, g in device_pairs]
            c = coef.to(d_dev[0].device)
            if disp.scratch:  # the directions are free to overwrite (Δ built in θ, restored right after)
                torch._foreach_mul_(d_dev, -c)
                torch._foreach_add_(g_dev, d_dev)
            else:
                for g, d in zip(g_dev, d_dev):
                    g.addcmul_(d, (-c).to(g.dtype))
        if self.diagnose:
            self._record(omega, delta_sq, *sums[2:], projected, known=lost is not None)

    def _record(self, omega, delta_sq, g_sq, ref_sq, lost_sq, exact_sq, projected, known: bool) -> None:
        """Keep this main step's raw terms on the device (no host sync); diagnostics() derives the ratios of a
        whole window at once, so a step pays one stack instead of a dozen scalar kernels."""
        self._diag_raw.append(torch.stack([omega, delta_sq, g_sq, ref_sq, projected.to(omega.dtype), lost_sq,
                                           exact_sq, torch.full_like(omega, float(known))]))
        self._diag_n += 1
        if len(self._diag_raw) >= 256:  # bounded memory when diagnostics() is never called
            self._fold_diagnostics()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The main optimizer's state, O_ref's, and PROFIT's cycle position and θ_ref (by parameter index)."""
        if self._eval_swap is not None:
            return self._eval_state_dict()
        index = {p: i for i, p in enumerate(_all_params(self.param_groups))}
        profit = {"ratio": self.ratio, "n_ref": self.n_ref, "memory": self.memory, "ref": self.ref_name,
                  "delta": self.delta, "phase": self.phase, "main_steps": self.main_steps, "in_cycle": [],
                  "refs": {}, "ref_sq": self._ref_sq}
        if self.mid_cycle:
            profit.update(self.theta_ref.state_dict(index))
            if self.intended is not None and self._intended_live:
                profit["intended"] = self.intended.state_dict(index)
        if self.ref_opt is not None:
            profit["ref_optimizer"] = self.ref_opt.state_dict()
        return {"main": self.main.state_dict(), "profit": profit}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the memory mode this optimizer was built with (the exact modes convert into each other)."""
        _check_is_profit_checkpoint(state_dict, self.main)
        if self._eval_mode:  # load in train mode, then swap the loaded cycle's θ_ref in
            self.train()
            self.load_state_dict(state_dict)
            return self.eval()
        saved = state_dict["profit"]
        saved_memory, saved_ref = saved.get("memory", "full"), saved.get("ref", "sgd")
        if (saved_memory == "low") != (self.memory == "low"):
            raise ProfitConfigError(f"checkpoint of PROFIT(memory={saved_memory!r}) cannot be loaded into "
                                    f"memory={self.memory!r}: 'low' keeps no θ_ref; build the optimizer with "
                                    f"memory={saved_memory!r}")
        if saved_ref != self.ref_name:
            raise ProfitConfigError(f"checkpoint of PROFIT(ref={saved_ref!r}) cannot be loaded into "
                                    f"ref={self.ref_name!r}; build the optimizer with ref={saved_ref!r}")
        params = _all_params(self.param_groups)
        cycle, refs = _checked_cycle(params, saved)
        intended = _checked_tensors(params, saved.get("intended") or {}, "Δ_exact")
        mid = int(saved["phase"]) > 0 and bool(cycle)
        if mid and self.delta == "exact" and self.intended is not None and not intended:
            raise ProfitConfigError(f"checkpoint of PROFIT(delta={saved.get('delta', 'weights')!r}) was saved "
                                    f"mid-cycle without the intended Δ that delta='exact' projects with; build the "
                                    f"optimizer with delta='weights' to resume it, or resume from a cycle boundary")
        self.main.load_state_dict(state_dict["main"])
        self.param_groups = self.main.param_groups  # load_state_dict rebuilt the group dicts
        if self.ref_opt is not None and "ref_optimizer" in saved:
            self._ref_groups()
            self.ref_opt.load_state_dict(saved["ref_optimizer"])
        self.ratio, self.n_ref = float(saved["ratio"]), int(saved["n_ref"])
        self.phase, self.main_steps = int(saved["phase"]), int(saved["main_steps"])
        self._cycle = set(self.theta_ref.load(cycle, refs, saved))
        self._intended_live = self.intended is not None and mid and bool(intended)
        if self._intended_live:
            self.intended.load(self.theta_ref.params, intended)
        ref_sq = saved.get("ref_sq")
        if ref_sq is None and self._cycle:  # an older checkpoint: the displaced θ stands in for θ_ref
            ref_sq = _sum_sq(self.theta_ref.params, self.theta_ref.params[0].device)
        self._ref_sq = ref_sq.detach().clone() if ref_sq is not None else None

    def __repr__(self) -> str:
        mem = "" if self.memory == "full" else f", memory={self.memory!r}"
        ref = "" if self.ref_opt is None else f", ref={self.ref_name!r}"
        delta = "" if self.delta == "exact" else f", delta={self.delta!r}"
        return f"PROFIT(ratio={self.ratio:g}, n_ref={self.n_ref}{ref}{mem}{delta}, main={self.main!r})"


class MainStepScheduler:
    """Step an LR scheduler once per PROFIT main step, however often ``step()`` is called.

    PROFIT calls ``step()`` n_ref + 1 times per main step, so a scheduler stepped per batch (Hugging Face Trainer,
    Lightning's ``interval="step"``) advances n_ref + 1 times per main step: StepLR(step_size=1) would halve the lr
    n_ref + 1 times. Wrapped, it is stepped as many times as ``optimizer.main_steps`` advanced since the last call
    (every call for an optimizer without ``main_steps``), so a schedule written in main steps stays one. Call
    ``step()`` after every optimizer step; ``get_last_lr``, ``state_dict`` and ``load_state_dict`` are the
    scheduler's. (The same without a wrapper: ``LambdaLR(opt, lambda _: f(opt.main_steps))``.)
    """

    def __init__(self, scheduler, optimizer: Optimizer):
        self.scheduler, self.optimizer = scheduler, optimizer
        self.seen = getattr(optimizer, "main_steps", 0)

    def step(self) -> None:
        done = getattr(self.optimizer, "main_steps", None)
        if done is None:
            self.scheduler.step()
            return
        while self.seen < done:
            self.scheduler.step()
            self.seen += 1

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "seen": self.seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self.seen = int(state_dict["seen"])


def _check_is_profit_checkpoint(state_dict, main: Optimizer) -> None:
    """A plain optimizer's checkpoint (e.g. AdamW: keys 'state' and 'param_groups') would fail with a bare
    KeyError: say what it is and how to load it."""
    if isinstance(state_dict, dict) and "profit" in state_dict and "main" in state_dict:
        return
    keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
    plain = isinstance(state_dict, dict) and {"state", "param_groups"} <= set(state_dict)
    what = "a plain optimizer's state_dict" if plain else "not a PROFIT state_dict"
    raise ProfitConfigError(
        f"PROFIT.load_state_dict got {what} (keys {keys}; PROFIT saves 'main' and 'profit'). To start PROFIT from "
        f"a plain optimizer checkpoint, load it into the main optimizer before wrapping: "
        f"main = {type(main).__name__}(params, ...); main.load_state_dict(sd); opt = PROFIT(main, ...)")


def _build_ref(ref, kwargs: dict, groups: list[dict], ratio: float,
               to_ref: Callable[[torch.Tensor], torch.Tensor]) -> tuple[str, Optimizer | None]:
    """O_ref's name and optimizer (None: plain SGD, fused into PROFIT's foreach kernels), one group per main group,
    over ``to_ref(p)`` of each parameter (p itself, or its shadow)."""
    if ref == "sgd" and not kwargs:
        return "sgd", None
    if isinstance(ref, str):
        if ref not in REF_OPTIMIZERS:
            raise ProfitConfigError(f"unknown ref optimizer {ref!r}; choose {', '.join(REF_OPTIMIZERS)} "
                                    f"or pass a factory")
        factory, name = (lambda gs: REF_OPTIMIZERS[ref](gs, **kwargs)), ref
    elif kwargs:
        raise ProfitConfigError("ref_kwargs apply to a named ref optimizer; bind them in the factory instead")
    else:
        factory, name = ref, getattr(ref, "__name__", type(ref).__name__)
    given = [_ref_group(g, ratio, to_ref) for g in groups]
    opt = factory(given)
    if not isinstance(opt, Optimizer):
        raise TypeError(f"the ref factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
    expected = [id(t) for g in given for t in g["params"]]
    if [id(t) for g in opt.param_groups for t in g["params"]] != expected:
        raise ProfitConfigError("the ref factory must build its optimizer over the parameter groups it is given "
                                "(with delta='exact' these are PROFIT's float64 shadows of the parameters)")
    return name, opt


def _ref_group(group: dict, ratio: float, to_ref: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    return {"params": [to_ref(p) for p in group["params"]], "lr": float(group["lr"]) / ratio,
            "maximize": group.get("maximize", False)}


@contextlib.contextmanager
def _hidden_grads(params: list[torch.Tensor]) -> Iterator[None]:
    """Set the gradients of `params` to None for the duration, then put them back."""
    hidden = [(p, p.grad) for p in params if p.grad is not None]
    for p, _ in hidden:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in hidden:
            p.grad = grad


def _maximizing(param_groups) -> bool:
    flags = {bool(g.get("maximize", False)) for g in param_groups}
    if len(flags) > 1:
        raise ProfitConfigError("PROFIT needs maximize to be the same in every parameter group")
    return flags == {True}


def _diagnostic_values(omega, delta_sq, g_sq, ref_sq, projected) -> torch.Tensor:
    """DIAGNOSTICS of main steps (scalars, or vectors of a window's steps) stacked on dim 0: projected, cos(g, Δ),
    ‖g'‖/‖g‖, ‖Δ‖/‖θ_ref‖."""
    cos = _safe_div(omega, delta_sq.sqrt() * g_sq.sqrt())
    perp = torch.where(projected, torch.sqrt(torch.clamp(1 - cos * cos, min=0)), torch.ones_like(cos))
    return torch.stack([projected.to(cos.dtype), cos, perp, _safe_div(delta_sq.sqrt(), ref_sq.sqrt())])


def _lost_terms(weights: Displacement, exact: Displacement, scratch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖Δ_weights − Δ_exact‖², ‖Δ_exact‖²) for the delta_lost diagnostic; Δ_weights is overwritten when
    `scratch` (delta="exact": it is θ, restored right after) and the dtypes agree, else the difference is a
    temporary. ‖Δ_exact‖² is None when `scratch`: it is then the projection's ‖Δ‖², already summed."""
    dw, de = weights.directions, exact.directions
    if not dw:
        zero = torch.zeros(())
        return zero, zero
    exact_sq = None if scratch else _sum_sq(de, de[0].device)  # (delta="exact": ‖Δ_exact‖² is the projection's)
    dev = de[0].device
    if scratch and all(a.dtype == b.dtype for a, b in zip(dw, de)):
        torch._foreach_sub_(dw, de)
        diff = dw
    else:
        diff = torch._foreach_sub([a.to(b.dtype) for a, b in zip(dw, de)], de)
    return _sum_sq(diff, dev), exact_sq


def _checked_tensors(params, saved: dict, what: str) -> dict[torch.Tensor, torch.Tensor]:
    """Per-parameter tensors of a checkpoint ({index: tensor}), after checking indices and shapes."""
    out = {}
    for i, t in saved.items():
        if not 0 <= int(i) < len(params):
            raise ProfitConfigError(f"PROFIT checkpoint names parameter {int(i)}, but the optimizer has "
                                    f"{len(params)}")
        p = params[int(i)]
        if t.shape != p.shape:
            raise ProfitConfigError(f"PROFIT checkpoint: {what} of parameter {int(i)} has shape {tuple(t.shape)}, "
                                    f"the parameter {tuple(p.shape)}; load a checkpoint of this model")
        out[p] = t.detach()
    return out


def _checked_cycle(params, saved) -> tuple[list[torch.Tensor], dict[torch.Tensor, torch.Tensor]]:
    """The cycle's parameters and their saved θ_ref, after checking indices and shapes against `params`."""
    indices = [int(i) for i in saved.get("in_cycle", saved["refs"].keys())]
    for i in indices + [int(i) for i in saved["refs"]]:
        if not 0 <= i < len(params):
            raise ProfitConfigError(f"PROFIT checkpoint names parameter {i}, but the optimizer has {len(params)}")
    refs = {}
    for i, r in saved["refs"].items():
        p = params[int(i)]
        if r.shape != p.shape:
            raise ProfitConfigError(f"PROFIT checkpoint: θ_ref of parameter {int(i)} has shape {tuple(r.shape)}, "
                                    f"the parameter {tuple(p.shape)}; load a checkpoint of this model")
        refs[p] = r.detach().to(device=p.device, dtype=p.dtype)
    return [params[i] for i in indices], refs


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

    exact = True   # restore() gives θ_ref bit for bit
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

    exact = False
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
