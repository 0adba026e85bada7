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

How θ_ref is kept (``memory=``: ``FullRef``, ``CompactRef``, ``LowMemRef``) and how Δ is formed (``delta=``:
``IntendedDelta`` or the stored weights) are strategies in ``profit_bench/theta_ref.py``; its docstring says what
each one costs and guarantees.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from profit_bench.theta_ref import (CompactRef, Displacement, FullRef, IntendedDelta, LowMemRef, ProfitConfigError,
                                    ThetaRef, _all_params, _by_device, _nbytes, _safe_div, _sum_dots, _sum_sq)

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
