"""The PROFIT optimizer: agreement with Algorithm 1 (reference.py) for every main optimizer, memory mode, O_ref and
n_ref, hand-computed cycles and diagnostics, checkpoints, and the optimizer contract."""

import copy
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from profit_bench.optim import DIAGNOSTICS, PROFIT, REF_OPTIMIZERS
from profit_bench.theta_ref import _CompactBucket
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


# ---------------------------------------------------------------------------------------------- vs. Algorithm 1
# float64 makes rounding (summation order of the global dot, fused multiply-adds) ~1e-15, so any
# difference above 1e-6 is a difference in the math; float32 runs the same battery at rounding-level tolerance.
# "compact" is checked bit for bit against "full" below, "low" (approximate) where it is exact.
# delta="weights" differs from "exact" only by fp64 rounding in fp64, so it runs in fp32 only.
@pytest.mark.parametrize("dtype,atol,delta", [(torch.float64, 1e-6, "exact"), (torch.float32, 2e-5, "exact"),
                                              (torch.float32, 2e-5, "weights")],
                         ids=["fp64", "fp32", "fp32-weights"])
@pytest.mark.parametrize("main_name", ALL_MAINS)
@pytest.mark.parametrize("n_ref", [1, 2, 3])
@pytest.mark.parametrize("ratio", [10.0, 1000.0])
def test_fast_matches_reference(main_name, n_ref, ratio, dtype, atol, delta):
    cycles = 6
    batches = make_batches(cycles * (n_ref + 1), dtype=dtype)
    ref_model, omegas = run_reference(main_name, n_ref, cycles, batches, ratio=ratio, dtype=dtype, delta=delta)
    model = small_mlp(dtype=dtype)
    opt = PROFIT(make_main(main_name, model), ratio=ratio, n_ref=n_ref, delta=delta)
    run_fast(model, opt, batches)

    assert opt.main_steps == cycles and opt.phase == 0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0)
    # The comparison only means something if the run left the starting point.
    assert not same_bits(model.parameters(), small_mlp(dtype=dtype).parameters())
    assert len(omegas) == cycles


def test_reference_runs_see_both_branches():
    """The agreement test above is only strong if projections happen and are skipped; check both occur."""
    batches = make_batches(40, seed=3)
    model = small_mlp()
    main = torch.optim.SGD(model.parameters(), lr=0.05)
    omegas = profit_reference(model, iter(batches), mse, main, ratio=10.0, n_ref=1, n_steps=20)
    assert any(w < 0 for w in omegas) and any(w >= 0 for w in omegas)


def neg_mse(model, batch):
    return -mse(model, batch)


@pytest.mark.parametrize("memory", ["full", "compact"])
@pytest.mark.parametrize("main_name", ["sgd_momentum", "adam"])
def test_maximize_matches_reference(main_name, memory):
    """maximize=True on −loss is the same training as minimising the loss: the reference steps ascend too."""
    batches = make_batches(12, dtype=torch.float64)
    ref_model, _ = run_reference(main_name, 2, 4, batches, dtype=torch.float64, loss_fn=neg_mse, maximize=True)
    model = small_mlp(dtype=torch.float64)
    run_fast(model, PROFIT(make_main(main_name, model, maximize=True), ratio=10.0, n_ref=2, memory=memory), batches,
             neg_mse)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    minimised = small_mlp(dtype=torch.float64)
    run_fast(minimised, PROFIT(make_main(main_name, minimised), ratio=10.0, n_ref=2), batches)
    for p, q in zip(model.parameters(), minimised.parameters()):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=0)


@pytest.mark.parametrize("memory", ["full", "compact", "low"])
def test_tensor_lr_matches_float_lr(memory):
    """A tensor lr (capturable optimizers, schedulers on the device) takes the device-side path, same result."""
    batches = make_batches(12, dtype=torch.float64)
    runs = []
    for lr in (1e-3, torch.tensor(1e-3, dtype=torch.float64)):
        model = small_mlp(dtype=torch.float64)
        opt = PROFIT(make_main("adam", model, lr=lr, foreach=False), ratio=10.0, n_ref=2, memory=memory)
        run_fast(model, opt, batches)
        runs.append(params_of(model))
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=0)
    assert not same_bits(runs[0], small_mlp(dtype=torch.float64).parameters())


def test_plain_sgd_reference_step_is_the_explicit_formula():
    """Default ref="sgd" (today's PROFIT, bit for bit): each reference step is θ ← θ − (lr_group / ratio)·g."""
    model = small_mlp()
    opt = PROFIT(make_main("adamw", model), ratio=7.0, n_ref=3)
    for batch in make_batches(12):
        opt.zero_grad()
        mse(model, batch).backward()
        expected = [torch.add(p, p.grad, alpha=-(g["lr"] / 7.0)) for g in opt.param_groups for p in g["params"]]
        main_step = opt.is_main_step
        opt.step()
        if not main_step:
            assert same_bits(model.parameters(), expected)
    assert opt.main_steps == 3


# ---------------------------------------------------------------------------------------------- O_ref
@pytest.mark.parametrize("n_ref", [1, 3])
@pytest.mark.parametrize("ref", list(REFS))
def test_each_ref_optimizer_matches_reference(ref, n_ref):
    """Any O_ref: fp64 agreement with Algorithm 1, compact bit-identical to full, θ_ref restored bit for bit,
    O_ref's state its own and kept across cycles."""
    cycles = 4
    batches = make_batches(cycles * (n_ref + 1), dtype=torch.float64)
    ref_model, omegas = run_reference("adam", n_ref, cycles, batches, dtype=torch.float64, ref=ref)
    assert any(w < 0 for w in omegas)  # the projection branch is exercised
    runs = {}
    for memory in ("full", "compact"):
        model = small_mlp(dtype=torch.float64)
        main = make_main("adam", model)
        name, kwargs = REFS[ref]
        opt = PROFIT(main, ratio=10.0, n_ref=n_ref, ref=name, ref_kwargs=kwargs, memory=memory)
        starts, at_main = [], []
        main.register_step_pre_hook(lambda o, a, k: at_main.append(params_of(model)))
        for i, b in enumerate(batches):
            if i % (n_ref + 1) == 0:
                starts.append(params_of(model))
            run_fast(model, opt, [b])
        assert all(same_bits(s, m) for s, m in zip(starts, at_main)) and len(at_main) == cycles
        assert all(int(s["step"]) == cycles for s in main.state.values())
        assert all(int(s["step"]) == cycles * n_ref for s in opt.ref_opt.state.values() if "step" in s)
        runs[memory] = params_of(model)
    assert same_bits(runs["full"], runs["compact"])
    for p, q in zip(runs["full"], ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_ref_choice_changes_the_result():
    """The O_ref really is used (a test that always ran plain SGD would pass the agreement tests above if the
    reference ignored `ref` too)."""
    out = {}
    for ref in ("sgd", "adam"):
        model = small_mlp(dtype=torch.float64)
        run_fast(model, PROFIT(make_main("adam", model), ratio=10.0, ref=ref), make_batches(8, dtype=torch.float64))
        out[ref] = params_of(model)
    assert max((a - b).abs().max() for a, b in zip(out["sgd"], out["adam"])) > 1e-6


def test_bad_ref_arguments():
    model = small_mlp()
    with pytest.raises(ValueError, match="unknown ref"):
        PROFIT(torch.optim.Adam(model.parameters()), ref="lion")
    with pytest.raises(ValueError, match="ref_kwargs"):
        PROFIT(torch.optim.Adam(model.parameters()), ref=_factory, ref_kwargs={"lr": 1.0})
    with pytest.raises(TypeError, match="Optimizer"):
        PROFIT(torch.optim.Adam(model.parameters()), ref=lambda groups: None)
    with pytest.raises(ValueError, match="plain-SGD"):
        PROFIT(torch.optim.Adam(model.parameters()), ref="adam", memory="low")
    with pytest.raises(ValueError, match="plain-SGD"):
        PROFIT(torch.optim.Adam(model.parameters()), ref_kwargs={"momentum": 0.9}, memory="low")


# ---------------------------------------------------------------------------------------------- hand-computed
class TwoScalars(nn.Module):
    """θ = (a, b) as two separate tensors, loss ½‖θ − t‖², so g = θ − t (exact in binary for the values used)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(1.0))

    def loss(self, t):
        return 0.5 * ((self.a - t[0]) ** 2 + (self.b - t[1]) ** 2)


def one_cycle(t1, t2):
    m = TwoScalars()
    opt = PROFIT(torch.optim.SGD(m.parameters(), lr=0.5), ratio=4.0, n_ref=1, diagnostics=True)  # λ_ref = 0.125
    for t in (t1, t2):
        opt.zero_grad()
        m.loss(torch.tensor(t)).backward()
        opt.step()
    return m, opt


def test_hand_computed_cycle_with_projection():
    # g1 = (1, 1) → θ1 = (0.875, 0.875), Δ = (−0.125, −0.125); g2 = (1.5, −0.5), ω = −0.125 < 0.
    # Global projection: g' = g2 − (ω/‖Δ‖²)Δ = (1.5, −0.5) − (−4)(−0.125, −0.125) = (1, −1).
    # (A per-tensor projection would give (0, −0.5): this case tells the two apart.)
    m, _ = one_cycle((0.0, 0.0), (-0.625, 1.375))
    assert m.a.grad.item() == 1.0 and m.b.grad.item() == -1.0
    assert m.a.item() == 0.5 and m.b.item() == 1.5  # θ_ref − 0.5·g' = (1, 1) − 0.5·(1, −1)


def test_hand_computed_cycle_without_projection():
    # Same Δ; g2 = (−1.5, 0.5) → ω = 0.125 ≥ 0 → g unchanged; θ = (1, 1) − 0.5·(−1.5, 0.5) = (1.75, 0.75).
    m, _ = one_cycle((0.0, 0.0), (2.375, 0.375))
    assert m.a.grad.item() == -1.5 and m.b.grad.item() == 0.5
    assert m.a.item() == 1.75 and m.b.item() == 0.75


def test_zero_displacement_means_no_projection():
    # g1 = 0 → Δ = 0: no projection and no NaN from 0/0.
    m, _ = one_cycle((1.0, 1.0), (-0.625, 1.375))
    assert m.a.grad.item() == 1.625 and m.b.grad.item() == -0.375
    assert torch.isfinite(m.a) and torch.isfinite(m.b)


def test_tiny_displacement_is_still_projected():
    # No absolute epsilon: a Δ of ~1e-20 is projected exactly like a large one (scale invariance).
    grads = {}
    for delta in ("weights", "exact"):
        m = TwoScalars()
        opt = PROFIT(torch.optim.SGD(m.parameters(), lr=0.5), ratio=2.0 ** 60, n_ref=1, delta=delta,
                     diagnostics=True)
        for t in ((0.0, 0.0), (1.0 - 1.5, 1.0 + 0.5)):
            opt.zero_grad()
            m.loss(torch.tensor(t)).backward()
            opt.step()
        grads[delta] = (m.a.grad.item(), m.b.grad.item())
        assert opt.diagnostics()["profit_delta_lost"] == 1.0  # the whole step rounded away in the weights
    # θ1 − θ0 rounds to 0 in fp32 at this ratio, so Δ read from the weights is 0 → no projection: g2 = (1.5, −0.5);
    # the intended Δ = −2^-61·(1, 1) projects it to (1, −1) exactly, as in the hand-computed case.
    assert grads == {"weights": (1.5, -0.5), "exact": (1.0, -1.0)}
    m64 = TwoScalars().double()
    opt = PROFIT(torch.optim.SGD(m64.parameters(), lr=0.5), ratio=2.0 ** 40, n_ref=1)
    for t in ((0.0, 0.0), (1.0 - 1.5, 1.0 + 0.5)):
        opt.zero_grad()
        m64.loss(torch.tensor(t, dtype=torch.float64)).backward()
        opt.step()
    # Δ ≈ −2^-41·(1, 1) ≠ 0: projected to (1, −1) up to the rounding of g2 at θ1.
    assert m64.a.grad.item() == pytest.approx(1.0, abs=1e-9)
    assert m64.b.grad.item() == pytest.approx(-1.0, abs=1e-9)


def test_diagnostics_of_hand_computed_cycles():
    # Projected cycle (see above): Δ = −0.125·(1, 1), g2 = (1.5, −0.5), ω = −0.125, ‖Δ‖ = 0.125·√2, ‖g2‖ = √2.5:
    # cos = −0.125 / (0.125·√2·√2.5) = −1/√5; g' = (1, −1) so ‖g'‖/‖g2‖ = √2/√2.5 = √0.8 = √(1 − cos²);
    # ‖Δ‖/‖θ_ref‖ = 0.125·√2 / √2 = 0.125.
    m, opt = one_cycle((0.0, 0.0), (-0.625, 1.375))
    d = opt.diagnostics()
    assert set(d) == set(DIAGNOSTICS)
    assert d["profit_projected_frac"] == 1.0
    assert d["profit_cos_g_delta"] == pytest.approx(-5 ** -0.5, rel=1e-6)
    assert d["profit_perp_ratio"] == pytest.approx(0.8 ** 0.5, rel=1e-6)
    assert d["profit_delta_rel"] == pytest.approx(0.125, rel=1e-6)
    assert opt.diagnostics() == {}  # reset by the call
    # Unprojected cycle: g2 = (−1.5, 0.5), ω = +0.125: cos = +1/√5, g unchanged (ratio 1). Then means of both.
    m, opt = one_cycle((0.0, 0.0), (2.375, 0.375))
    for t in ((0.0, 0.0), (-0.625 - 0.5, 1.375 + 0.5)):  # second cycle from θ = (1.75, 0.75): projected again
        opt.zero_grad()
        m.loss(torch.tensor(t)).backward()
        opt.step()
    d = opt.diagnostics()
    assert d["profit_projected_frac"] == 0.5
    assert d["profit_cos_g_delta"] < 5 ** -0.5  # mean of +1/√5 and a negative cosine
    assert 0 < d["profit_perp_ratio"] < 1


def test_diagnostics_agree_with_a_direct_computation():
    """On a real model, per main step: cos(g, Δ) and ‖g'‖/‖g‖ from the gradients before and after projection."""
    model = small_mlp(dtype=torch.float64)
    opt = PROFIT(make_main("adamw", model), ratio=10.0, n_ref=2, diagnostics=True)
    batches = make_batches(3 * 8, bs=2, dtype=torch.float64)  # small batches: noisy g, both branches
    expected = []
    for c in range(8):
        theta_ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        run_fast(model, opt, batches[3 * c:3 * c + 2])
        delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta_ref
        opt.zero_grad()
        mse(model, batches[3 * c + 2]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.step()
        g_after = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        ref_norm = ref_norm if c else theta_ref.norm()  # ‖θ_ref‖ of the window's first cycle
        expected.append([float(g @ delta < 0), float(g @ delta / (g.norm() * delta.norm())),
                         float(g_after.norm() / g.norm()), float(delta.norm() / ref_norm)])
    got = opt.diagnostics()
    means = torch.tensor(expected, dtype=torch.float64).mean(0).tolist()
    assert 0 < means[0] < 1  # both branches
    for key, want in zip(DIAGNOSTICS, means):
        assert got[key] == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_diagnostics_window_longer_than_the_fold_is_the_mean_of_its_steps():
    """A window of 300 main steps (more than the 256 raw steps kept before folding into sums) reports the mean of
    the per-step values that a twin optimizer reads one main step at a time."""
    torch.manual_seed(0)
    a = small_mlp(dtype=torch.float64)
    b = copy.deepcopy(a)
    opt_a = PROFIT(make_main("adam", a), ratio=10.0, n_ref=1, diagnostics=True)
    opt_b = PROFIT(make_main("adam", b), ratio=10.0, n_ref=1, diagnostics=True)
    batches = make_batches(600, bs=2, dtype=torch.float64)
    per_step = []
    for i in range(0, 600, 2):
        run_fast(a, opt_a, batches[i:i + 2])
        run_fast(b, opt_b, batches[i:i + 2])
        step = opt_b.diagnostics()
        per_step.append([step[k] for k in DIAGNOSTICS[:3]])  # delta_rel's ‖θ_ref‖ is per window
    got = opt_a.diagnostics()
    want = torch.tensor(per_step, dtype=torch.float64).mean(0).tolist()
    for key, w in zip(DIAGNOSTICS[:3], want):
        assert got[key] == pytest.approx(w, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("memory", ["compact", "low"])
def test_diagnostics_in_other_memory_modes(memory):
    runs = {}
    for mode in ("full", memory):
        model = small_mlp()
        opt = PROFIT(make_main("adam", model), ratio=10.0, n_ref=1, memory=mode, diagnostics=True)
        run_fast(model, opt, make_batches(12))
        runs[mode] = opt.diagnostics()
    # "low" keeps no θ_ref, so it cannot say how much of Δ the weights lost
    assert set(runs[memory]) == set(DIAGNOSTICS) - ({"profit_delta_lost"} if memory == "low" else set())
    if memory == "compact":
        assert runs["compact"] == runs["full"]
    else:  # Δ ≈ a·m: the same kinds of numbers, not the same values
        assert all(0 <= runs["low"][k] <= 1 for k in ("profit_projected_frac", "profit_perp_ratio"))
        assert -1 <= runs["low"]["profit_cos_g_delta"] <= 1 and runs["low"]["profit_delta_rel"] > 0


# ---------------------------------------------------------------------------------------------- orthogonality, restore
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_projected_gradient_is_orthogonal_and_restore_is_bit_exact(dtype):
    model = small_mlp(dtype=dtype)
    main = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    opt = PROFIT(main, ratio=10.0, n_ref=2)
    seen = {}
    main.register_step_pre_hook(lambda o, a, k: seen.__setitem__("at_main", [p.detach().clone()
                                                                              for p in model.parameters()]))
    batches = make_batches(2, dtype=dtype)
    projected = 0
    for _ in range(5):
        theta_ref = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            opt.zero_grad(); mse(model, batches[0]).backward(); opt.step()
        displaced = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad(); mse(model, batches[1]).backward()
        g_raw = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
        opt.step()
        delta = torch.cat([(d - r).reshape(-1) for d, r in zip(displaced, theta_ref)])
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        if torch.dot(delta, g_raw) < 0:
            projected += 1
            if dtype == torch.float64:
                assert abs(torch.dot(g, delta)) <= 1e-6 * g.norm() * delta.norm()
            else:  # fp32: the residual is bounded by rounding of g, not of the (possibly much smaller) g'
                assert abs(torch.dot(g, delta)) <= 1e-5 * g_raw.norm() * delta.norm()
            assert abs(torch.dot(g_raw, delta)) > 1e-3 * g_raw.norm() * delta.norm()  # it really changed
        else:
            assert torch.equal(g, g_raw)
        # main.step() started from θ_ref, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(seen["at_main"], theta_ref))
    assert projected >= 1


# ---------------------------------------------------------------------------------------------- optimizer contract
@pytest.mark.parametrize("ref", ["sgd", "adam"])
def test_is_a_real_optimizer_sharing_groups(ref):
    model = small_mlp()
    main = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = PROFIT(main, ratio=100.0, n_ref=1, ref=ref)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is main.param_groups
    assert "PROFIT" in repr(opt) and "AdamW" in repr(opt) and (ref == "sgd") != ("'adam'" in repr(opt))
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(o.phase))
    run_fast(model, opt, make_batches(4))
    assert calls == [1, 0, 1, 0]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.ones(2))
    main.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2
    extra.grad = torch.ones(2)
    at_main = []
    main.register_step_pre_hook(lambda o, a, k: at_main.append(extra.detach().clone()))
    opt.step()  # a reference step moves the new group's parameter too (O_ref gains the group)
    assert not torch.equal(extra.detach(), torch.ones(2))
    opt.step()
    assert torch.equal(at_main[0], torch.ones(2))  # and θ_ref comes back before the main step


@pytest.mark.parametrize("lr_type", ["float", "tensor"])
@pytest.mark.parametrize("attach_to", ["profit", "main"])
def test_scheduler_drives_reference_step_size(attach_to, lr_type):
    m = TwoScalars()
    main = torch.optim.SGD(m.parameters(), lr=0.5 if lr_type == "float" else torch.tensor(0.5))
    opt = PROFIT(main, ratio=4.0, n_ref=1)
    sched = torch.optim.lr_scheduler.StepLR(opt if attach_to == "profit" else main, step_size=1, gamma=0.5)
    for cycle in range(3):
        lr_now = 0.5 * 0.5 ** cycle
        before = (m.a.item(), m.b.item())
        opt.zero_grad(); m.loss(torch.tensor((0.0, 0.0))).backward(); opt.step()  # g = θ
        assert m.a.item() == pytest.approx(before[0] - lr_now / 4.0 * before[0], rel=1e-6)
        opt.zero_grad(); m.loss(torch.tensor((0.0, 0.0))).backward(); opt.step()
        sched.step()
    assert float(main.param_groups[0]["lr"]) == float(opt.param_groups[0]["lr"]) == 0.5 * 0.5 ** 3


def save_and_load(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


EXACT_PAIRS = [("full", "full"), ("compact", "compact"), ("full", "compact"), ("compact", "full")]


# Every stopping point with plain SGD; a stateful O_ref at the first cycle's two reference steps and mid second
# cycle, through both conversions.
@pytest.mark.parametrize("stop_after,saved_as,loaded_as,ref",
                         [(n, a, b, "sgd") for n in range(7) for a, b in EXACT_PAIRS]
                         + [(n, a, b, "adam") for n in (1, 2, 4) for a, b in EXACT_PAIRS[2:]])
def test_state_dict_round_trip_mid_cycle_is_bit_identical(stop_after, saved_as, loaded_as, ref):
    batches = make_batches(9)
    make = lambda model, memory: PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), ratio=10.0, n_ref=2,
                                        memory=memory, ref=ref)
    straight = small_mlp()
    run_fast(straight, make(straight, "full"), batches)

    first = small_mlp()
    opt = make(first, saved_as)
    run_fast(first, opt, batches[:stop_after])
    saved_model, saved = copy.deepcopy(first.state_dict()), save_and_load(opt)

    resumed = small_mlp(seed=123)  # fresh weights, overwritten by the checkpoint
    opt2 = make(resumed, loaded_as)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved)
    assert opt2.phase == stop_after % 3 and opt2.param_groups is opt2.main.param_groups
    assert opt2.memory == loaded_as  # built as, whatever the checkpoint's exact mode
    run_fast(resumed, opt2, batches[stop_after:])
    assert same_bits(resumed.parameters(), straight.parameters())


def test_checkpoint_errors():
    model = small_mlp()
    opt = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), n_ref=2)
    run_fast(model, opt, make_batches(1))
    saved = opt.state_dict()
    for memory, ref in (("low", "sgd"), ("full", "adam")):
        with pytest.raises(ValueError, match="memory='low'" if memory == "low" else "ref="):
            PROFIT(torch.optim.Adam(model.parameters()), memory=memory, ref=ref).load_state_dict(saved)
    low = PROFIT(torch.optim.Adam(model.parameters()), memory="low")
    with pytest.raises(ValueError, match="memory='low'"):
        opt.load_state_dict(low.state_dict())
    # A θ_ref that broadcasts ([1, 16] into [16, 16]) must not be accepted: it would overwrite every row.
    bad = copy.deepcopy(saved)
    bad["profit"]["refs"][4] = bad["profit"]["refs"][4][:1]
    target = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), n_ref=2)
    before = target.state_dict()
    with pytest.raises(ValueError, match="parameter 4 has shape"):
        target.load_state_dict(bad)
    assert target.state_dict()["profit"] == before["profit"] and target.phase == 0  # nothing half-loaded
    bad["profit"]["refs"] = {99: saved["profit"]["refs"][0]}
    with pytest.raises(ValueError, match="parameter 99"):
        target.load_state_dict(bad)


@pytest.mark.parametrize("memory", ["full", "compact", "low"])
def test_state_dict_deep_copies_without_autograd_history(memory):
    model = small_mlp()
    opt = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), n_ref=2, memory=memory)
    run_fast(model, opt, make_batches(4))  # mid-cycle, with a momentum buffer for "low"
    state = copy.deepcopy(opt.state_dict())
    assert all(not r.requires_grad and r.grad_fn is None for r in state["profit"]["refs"].values())
    assert len(state["profit"]["in_cycle"]) == 10


def test_misuse_raises():
    model = small_mlp()
    opt = PROFIT(make_main("adam", model), n_ref=2)
    with pytest.raises(TypeError, match="plain torch.optim.Optimizer"):
        PROFIT(opt)
    run_fast(model, opt, make_batches(1))
    with opt.anchored():
        with pytest.raises(RuntimeError, match="does not nest"):
            with opt.anchored():
                pass
        with pytest.raises(RuntimeError, match="inside anchored"):
            opt.step()
    assert opt.phase == 1
    with opt.anchored():  # usable again after the errors
        pass
    opt.param_groups[1]["maximize"] = True  # one group ascending, the other descending: no single loss
    run_fast(model, opt, make_batches(1))
    displaced = params_of(model)
    with pytest.raises(ValueError, match="maximize"):
        run_fast(model, opt, make_batches(1))
    assert same_bits(model.parameters(), displaced)  # refused before θ was touched


@pytest.mark.parametrize("memory", ["full", "compact"])
def test_anchored_and_finish(memory):
    model = small_mlp()
    opt = PROFIT(torch.optim.SGD(model.parameters(), lr=0.1), ratio=2.0, n_ref=2, memory=memory)
    start = params_of(model)
    run_fast(model, opt, make_batches(1))
    assert opt.mid_cycle and not opt.is_main_step
    displaced = params_of(model)
    assert not same_bits(displaced, start)
    with opt.anchored():
        assert same_bits(model.parameters(), start)
    assert same_bits(model.parameters(), displaced)
    run_fast(model, opt, make_batches(1, seed=5))
    assert opt.is_main_step
    opt.finish()
    assert same_bits(model.parameters(), start)
    assert opt.phase == 0 and not opt.mid_cycle


@pytest.mark.parametrize("ref", ["sgd", "adam"])
@pytest.mark.parametrize("memory", ["full", "compact"])
def test_parameters_without_grad_are_left_alone(memory, ref):
    model = small_mlp()
    unused = nn.Parameter(torch.randn(4))
    late = nn.Parameter(torch.randn(4))  # has no gradient when the cycle starts, one in its reference step
    opt = PROFIT(torch.optim.AdamW([*model.parameters(), unused, late], lr=1e-2, weight_decay=0.5), ratio=10.0,
                 n_ref=2, memory=memory, ref=ref)
    before, late_before = unused.detach().clone(), late.detach().clone()
    run_fast(model, opt, make_batches(9))
    assert torch.equal(unused, before) and unused.grad is None
    opt.zero_grad(); mse(model, make_batches(1)[0]).backward(); opt.step()  # cycle starts without `late`
    late.grad = torch.ones(4)
    mse(model, make_batches(1)[0]).backward()
    opt.step()
    assert torch.equal(late, late_before) and torch.equal(late.grad, torch.ones(4))  # not moved, grad kept


@pytest.mark.parametrize("memory", ["full", "compact"])
def test_grad_scaler_matches_unscaled_run(memory):
    batches = make_batches(6)
    plain = small_mlp()
    run_fast(plain, PROFIT(torch.optim.Adam(plain.parameters(), lr=1e-3), ratio=10.0), batches)

    scaled = small_mlp()
    opt = PROFIT(torch.optim.Adam(scaled.parameters(), lr=1e-3), ratio=10.0, memory=memory)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for b in batches:
        opt.zero_grad()
        scaler.scale(mse(scaled, b)).backward()
        scaler.step(opt)
        scaler.update()
    # Scaling by a power of two and unscaling is exact, so both runs are the same.
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)

    # An inf gradient makes the scaler skip the step: the PROFIT cycle must not advance.
    phase = opt.phase
    opt.zero_grad()
    scaler.scale(mse(scaled, batches[0]) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.phase == phase


def test_gradient_accumulation_equals_full_batch():
    batches = make_batches(6, bs=8)
    full = small_mlp()
    run_fast(full, PROFIT(torch.optim.SGD(full.parameters(), lr=0.05, momentum=0.9), ratio=10.0), batches)

    acc = small_mlp()
    opt = PROFIT(torch.optim.SGD(acc.parameters(), lr=0.05, momentum=0.9), ratio=10.0)
    for x, y in batches:
        opt.zero_grad()
        for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):
            (mse(acc, (xs, ys)) / 2).backward()
        opt.step()
    for p, q in zip(acc.parameters(), full.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_bad_arguments():
    model = small_mlp()
    with pytest.raises(ValueError):
        PROFIT(torch.optim.SGD(model.parameters(), lr=0.1), n_ref=0)
    with pytest.raises(ValueError):
        PROFIT(torch.optim.SGD(model.parameters(), lr=0.1), ratio=0.0)
    with pytest.raises(TypeError):
        PROFIT(model)


# ---------------------------------------------------------------------------------------------- delta: exact vs weights
# The setting: a 3-layer tanh MLP, 15 PROFIT cycles, Algorithm 1 computed in fp64 (Δ from the intended moves,
# reference.py delta="exact") from the same init and batches as the truth. The yardstick for "exact" is plain
# fine-tuning's own fp32-vs-fp64 difference over the same main steps, measured here too.
PRECISION_MAINS = {"adam": lambda ps: torch.optim.Adam(ps, lr=1e-4),
                   "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)}


def tanh_mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def flat64(model) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def rel_error(model, truth: torch.Tensor, start: torch.Tensor) -> float:
    """‖θ − θ_fp64‖ / ‖θ_fp64 − θ_0‖: the error relative to the total displacement."""
    return ((flat64(model) - truth).norm() / (truth - start).norm()).item()


def fine_tuning_error(main_name, batches64, dtype, every) -> float:
    """Plain fine-tuning (the main optimizer alone, on every `every`-th batch: the same main steps as PROFIT) in
    `dtype` vs fp64: the rounding any training in that dtype has."""
    runs = {}
    for dt in (torch.float64, dtype):
        model = tanh_mlp(dt)
        run_fast(model, PRECISION_MAINS[main_name](model.parameters()),
                 [(x.to(dt), y.to(dt)) for x, y in batches64[::every]])
        runs[dt] = model
    return rel_error(runs[dtype], flat64(runs[torch.float64]), flat64(tanh_mlp(torch.float64)))


def profit_vs_fp64(main_name, n_ref, ratio, dtype, ref=None):
    """Relative errors of PROFIT in `dtype` (delta exact and weights) and of plain fine-tuning, vs fp64 Algorithm 1."""
    cycles = 15
    batches64 = make_batches(cycles * (n_ref + 1), bs=16, dtype=torch.float64)
    truth_model = tanh_mlp(torch.float64)
    ref_opt = reference_ref_factory(ref) if ref else None
    profit_reference(truth_model, iter(batches64), mse, PRECISION_MAINS[main_name](truth_model.parameters()),
                     ratio=ratio, n_ref=n_ref, n_steps=cycles, ref=ref_opt, delta="exact")
    truth, start = flat64(truth_model), flat64(tanh_mlp(torch.float64))
    name, kwargs = REFS[ref] if ref else ("sgd", None)
    errors, lost = {}, {}
    for delta in ("exact", "weights"):
        model = tanh_mlp(dtype)
        opt = PROFIT(PRECISION_MAINS[main_name](model.parameters()), ratio=ratio, n_ref=n_ref, delta=delta,
                     ref=name, ref_kwargs=kwargs, diagnostics=True)
        run_fast(model, opt, [(x.to(dtype), y.to(dtype)) for x, y in batches64])
        errors[delta] = rel_error(model, truth, start)
        lost[delta] = opt.diagnostics().get("profit_delta_lost")
    errors["fine-tuning"] = fine_tuning_error(main_name, batches64, dtype, n_ref + 1)
    return errors, lost


@pytest.mark.parametrize("ratio", [10.0, 100.0, 1000.0, 10000.0])
@pytest.mark.parametrize("n_ref", [1, 3])
@pytest.mark.parametrize("main_name", list(PRECISION_MAINS))
def test_exact_delta_follows_fp64_algorithm_1(main_name, n_ref, ratio):
    """fp32 PROFIT with delta="exact" is as close to fp64 Algorithm 1 as fp32 fine-tuning is to fp64 fine-tuning
    (measured: 0.9-2.1×, all below 3e-5), at every ratio; delta="weights" is not once the reference steps fall
    below the weights' resolution (measured: 3e-2 to 0.65 with Adam lr 1e-4, 6e-5 to 0.12 with SGD lr 1e-2)."""
    errors, lost = profit_vs_fp64(main_name, n_ref, ratio, torch.float32)
    assert errors["exact"] <= max(4 * errors["fine-tuning"], 1e-6) and errors["exact"] <= 1e-3, errors
    if ratio >= 1000 or main_name == "adam":  # (λ_ref = 1e-5 and 1e-6 of SGD-momentum lose little in the weights)
        assert errors["weights"] > 10 * errors["exact"], errors
    assert lost["weights"] == pytest.approx(lost["weights"])  # reported in both modes (not NaN)
    assert 0 < lost["exact"] < 1 and 0 < lost["weights"] < 1  # part of every reference step rounds away


@pytest.mark.parametrize("ref", list(REFS))
def test_exact_delta_with_any_ref_optimizer_follows_fp64(ref):
    """A stateful O_ref (momentum, RMSProp, Adam, AdamW's weight decay, a factory) runs on PROFIT's fp64 shadow: at
    ratio 1e4 fp32 PROFIT still follows fp64 Algorithm 1, while reading Δ from the weights does not."""
    errors, lost = profit_vs_fp64("adam", 2, 10000.0, torch.float32, ref=ref)
    assert errors["exact"] <= max(4 * errors["fine-tuning"], 1e-6) and errors["exact"] <= 1e-3, errors
    assert errors["weights"] > 10 * errors["exact"], errors
    assert lost["exact"] > 0.01 and lost["weights"] is None  # weights + stateful O_ref: no Δ_exact to compare


@pytest.mark.parametrize("ratio", [10.0, 10000.0])
def test_exact_delta_in_bf16_weights(ratio):
    """bf16 weights (8-bit mantissa): fine-tuning itself is far from fp64 (~0.2 here), and exact PROFIT stays within
    a small multiple of that, while Δ read from bf16 weights is mostly lost (delta_lost 0.86 at ratio 10, ~1 at
    1e4)."""
    errors, lost = profit_vs_fp64("sgd_momentum", 3, ratio, torch.bfloat16)
    assert errors["exact"] <= 2.5 * errors["fine-tuning"], errors
    assert errors["weights"] > 2.5 * errors["fine-tuning"] and errors["weights"] > 2 * errors["exact"], errors
    assert lost["weights"] > 0.5 and lost["exact"] > 0.5  # (the weights lose most of Δ in both runs)


@pytest.mark.parametrize("dtype,ratios", [(torch.float32, (1.0, 1e4, 1e8)), (torch.bfloat16, (1.0, 1e2, 1e4))],
                         ids=["fp32", "bf16"])
def test_delta_lost_diagnostic_is_the_fraction_of_delta_the_weights_lost(dtype, ratios):
    """profit_delta_lost = ‖Δ_weights − Δ_exact‖/‖Δ_exact‖ per main step, checked against Δ computed here by hand
    (one plain-SGD reference step: Δ_exact = −λ_ref·g), and growing from ~0 to ~1 as λ_ref shrinks."""
    seen = []
    for ratio in ratios:
        model = small_mlp(dtype=dtype)
        opt = PROFIT(torch.optim.SGD(model.parameters(), lr=1e-2), ratio=ratio, n_ref=1, diagnostics=True)
        expected = []
        for x, y in make_batches(8, dtype=dtype)[::2]:
            theta_ref = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad(); mse(model, (x, y)).backward()
            exact = [-(1e-2 / ratio) * p.grad.float() for p in model.parameters()]
            opt.step()
            weights = [(p.detach() - r).float() for p, r in zip(model.parameters(), theta_ref)]
            diff = sum(((w - e) ** 2).sum() for w, e in zip(weights, exact)).sqrt()
            expected.append((diff / sum((e ** 2).sum() for e in exact).sqrt()).item())
            opt.zero_grad(); mse(model, (x, y)).backward(); opt.step()
        got = opt.diagnostics()["profit_delta_lost"]
        assert got == pytest.approx(sum(expected) / len(expected), rel=1e-4)
        seen.append(got)
    # measured: fp32 5e-6, 0.04, 0.997; bf16 0.19, 0.96, 0.997
    assert seen[0] < 0.25 and seen[2] > 0.9 and seen[0] < seen[1] < seen[2]


def test_delta_modes_share_the_weights_only_where_nothing_rounds():
    """delta="exact" changes the projection direction only, never the restore: θ_ref comes back bit for bit and
    the displaced weights (the forward passes) are those of delta="weights" in the first cycle."""
    runs = {}
    for delta in ("exact", "weights"):
        model = small_mlp()
        main = torch.optim.Adam(model.parameters(), lr=1e-3)
        opt = PROFIT(main, ratio=1e4, n_ref=2, delta=delta)
        at_main, starts = [], []
        main.register_step_pre_hook(lambda o, a, k: at_main.append(params_of(model)))
        displaced = []
        for i, b in enumerate(make_batches(9)):
            if i % 3 == 0:
                starts.append(params_of(model))
            run_fast(model, opt, [b])
            if i == 1:
                displaced = params_of(model)
        assert all(same_bits(s, m) for s, m in zip(starts, at_main))
        runs[delta] = (displaced, params_of(model))
    assert same_bits(runs["exact"][0], runs["weights"][0])
    assert not same_bits(runs["exact"][1], runs["weights"][1])  # and the projection made a difference


@pytest.mark.parametrize("memory", ["full", "compact", "low"])
def test_delta_in_every_memory_mode(memory):
    """compact is bit-identical to full with delta="exact" too (same Δ buffer); "low" follows ⟨m, Δ⟩ from the
    updates in both modes (so both give the same bits)."""
    runs = {}
    for delta in ("exact", "weights"):
        model = small_mlp()
        opt = PROFIT(make_main("adam", model), ratio=1e4, n_ref=2, memory=memory, delta=delta)
        run_fast(model, opt, make_batches(13))
        runs[delta] = params_of(model)
    if memory == "low":
        assert same_bits(runs["exact"], runs["weights"])
    else:
        full = small_mlp()
        run_fast(full, PROFIT(make_main("adam", full), ratio=1e4, n_ref=2, delta="exact"), make_batches(13))
        assert same_bits(runs["exact"], full.parameters())
        assert not same_bits(runs["exact"], runs["weights"])


@pytest.mark.parametrize("ref", ["sgd", "adam"])
@pytest.mark.parametrize("stop_after", [1, 2, 4])
def test_exact_checkpoint_mid_cycle_resumes_bit_identically(stop_after, ref):
    """The Δ buffer (plain SGD) or the fp64 shadow (a stateful O_ref) and O_ref's fp64 state travel in the
    checkpoint: resuming mid-cycle gives the bits of a straight run (full → compact too)."""
    batches = make_batches(9)
    make = lambda model, memory="full": PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), ratio=1e4, n_ref=2,
                                               ref=ref, memory=memory)
    straight = small_mlp()
    run_fast(straight, make(straight), batches)
    first = small_mlp()
    opt = make(first)
    run_fast(first, opt, batches[:stop_after])
    saved_model, saved = copy.deepcopy(first.state_dict()), save_and_load(opt)
    assert saved["profit"]["delta"] == "exact" and (len(saved["profit"]["intended"]) == 10) == opt.mid_cycle
    for memory in ("full", "compact"):
        resumed = small_mlp(seed=5)
        opt2 = make(resumed, memory)
        resumed.load_state_dict(saved_model)
        opt2.load_state_dict(copy.deepcopy(saved))  # (torch's load_state_dict keeps the saved moment tensors)
        run_fast(resumed, opt2, batches[stop_after:])
        assert same_bits(resumed.parameters(), straight.parameters())


def test_delta_checkpoint_conversions():
    """Mid-cycle, a checkpoint without an intended Δ (delta="weights", or older) cannot resume delta="exact" (it
    would have to read Δ from the rounded weights): refused before anything is loaded. The other way round, and at
    a cycle boundary, works."""
    batches = make_batches(4)
    model = small_mlp()
    weights = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), n_ref=2, delta="weights", diagnostics=False)
    run_fast(model, weights, batches[:1])
    mid = save_and_load(weights)
    assert "intended" not in mid["profit"]
    exact = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), n_ref=2)
    with pytest.raises(ValueError, match="delta='weights' to resume"):
        exact.load_state_dict(mid)
    assert exact.phase == 0 and exact.main.state == {}
    run_fast(model, weights, batches[1:3])  # to a cycle boundary
    exact.load_state_dict(save_and_load(weights))
    assert exact.main_steps == 1 and exact.phase == 0
    run_fast(model, exact, batches[3:])
    back = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), n_ref=2, delta="weights")
    back.load_state_dict(save_and_load(exact))  # mid-cycle exact → weights: θ_ref is all it needs
    assert back.phase == 1


def test_bad_delta_arguments():
    model = small_mlp()
    with pytest.raises(ValueError, match="delta must be one of"):
        PROFIT(torch.optim.Adam(model.parameters()), delta="rounded")
    with pytest.raises(ValueError, match="parameter groups it is given"):  # a factory that ignores its groups
        PROFIT(torch.optim.Adam(model.parameters()), ref=lambda groups: torch.optim.Adam(model.parameters()))


def test_diagnostics_are_opt_in():
    """Off by default (their per-main-step norms cost ~7 % per batch on the toy MLP, see docs/performance.md);
    the trajectory is the same either way."""
    runs = {}
    for diagnostics in (False, True):
        model = small_mlp()
        opt = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), ratio=10.0, n_ref=1, diagnostics=diagnostics)
        run_fast(model, opt, make_batches(6))
        runs[diagnostics] = (params_of(model), opt.diagnostics())
    assert runs[False][1] == {} and set(runs[True][1]) == set(DIAGNOSTICS)
    assert same_bits(runs[False][0], runs[True][0])


# ---------------------------------------------------------------------------------------------- distributed
def _ddp_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(small_mlp())
    opt = PROFIT(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), ratio=10.0, n_ref=2)
    for x, y in make_batches(6, bs=8):
        shard = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        mse(model, (x[shard], y[shard])).backward()  # DDP averages the two half-batch gradients
        opt.step()
    if rank == 0:
        torch.save([p.detach() for p in model.module.parameters()], out)
    _leave_process_group()


def _sharded_worker(rank, world, init_file, out, all_reduce=True, memory="full"):
    """Each rank owns a slice of one flat parameter vector (as FSDP would); ω must come out as in one process."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    full = torch.nn.utils.parameters_to_vector(small_mlp().parameters()).detach()
    n = -(-full.numel() // world)  # equal shards (gloo's all_gather wants them); the padding never gets a gradient
    padded = torch.cat([full, torch.zeros(n * world - full.numel())])
    mine = nn.Parameter(padded[rank * n:(rank + 1) * n].clone())
    opt = PROFIT(torch.optim.Adam([mine], lr=1e-3), ratio=10.0, n_ref=1, memory=memory, diagnostics=True,
                 process_group=dist.group.WORLD if all_reduce else None)
    shell = small_mlp()

    def gather():
        pieces = [torch.zeros(n) for _ in range(world)]
        dist.all_gather(pieces, mine.detach().contiguous())
        return torch.cat(pieces)[:full.numel()]

    for batch in make_batches(6):
        torch.nn.utils.vector_to_parameters(gather(), shell.parameters())
        shell.zero_grad()
        mse(shell, batch).backward()
        flat_grad = torch.cat([p.grad.reshape(-1) for p in shell.parameters()])
        flat_grad = torch.cat([flat_grad, torch.zeros(n * world - full.numel())])
        mine.grad = flat_grad[rank * n:(rank + 1) * n].clone()
        opt.step()
    result = gather()
    diag = opt.diagnostics()  # every rank calls it: its values are global too
    if rank == 0:
        torch.save({"params": result, "diag": diag}, out)
    _leave_process_group()


def _leave_process_group():
    # Tearing gloo down at exit aborts now and then ("terminate called without an active exception"): meet at a
    # barrier, then leave without running destructors; rank 0's result is already on disk.
    dist.barrier()
    os._exit(0)


def _spawn(fn, tmp_path, *extra):
    out = str(tmp_path / "out.pt")
    mp.spawn(fn, args=(2, str(tmp_path / f"init{len(extra)}"), out, *extra), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


def test_ddp_two_processes_equal_one_process_full_batch(tmp_path):
    got = _spawn(_ddp_worker, tmp_path)
    single = small_mlp()
    run_fast(single, PROFIT(torch.optim.SGD(single.parameters(), lr=0.05, momentum=0.9), ratio=10.0, n_ref=2),
             make_batches(6, bs=8))
    for p, q in zip(got, single.parameters()):
        torch.testing.assert_close(p, q.detach(), atol=1e-6, rtol=0)


def test_sharded_parameters_use_global_omega(tmp_path):
    got, got_diag = _spawn(_sharded_worker, tmp_path).values()
    # Unsharded: one flat parameter vector. Adam is elementwise, so only ω and ‖Δ‖² couple the shards:
    # agreement means the all-reduce gave the global values.
    shell = small_mlp()
    flat = nn.Parameter(torch.nn.utils.parameters_to_vector(shell.parameters()).detach().clone())
    opt = PROFIT(torch.optim.Adam([flat], lr=1e-3), ratio=10.0, n_ref=1, diagnostics=True)
    for batch in make_batches(6):
        torch.nn.utils.vector_to_parameters(flat.detach(), shell.parameters())
        shell.zero_grad()
        mse(shell, batch).backward()
        flat.grad = torch.cat([p.grad.reshape(-1) for p in shell.parameters()])
        opt.step()
    torch.testing.assert_close(got, flat.detach(), atol=1e-6, rtol=0)
    assert got_diag == pytest.approx(opt.diagnostics(), rel=1e-5)
    # Without the all-reduce each shard projects with its own ω: the test setup must tell the two apart.
    per_shard = _spawn(_sharded_worker, tmp_path, False)["params"]
    assert (per_shard - flat.detach()).abs().max() > 1e-5
    # memory="compact" keeps θ_ref per shard in its own encoding and must give the same bits.
    assert torch.equal(_spawn(_sharded_worker, tmp_path, True, "compact")["params"], got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("memory", ["full", "compact"])
@pytest.mark.parametrize("main_name", ALL_MAINS)
def test_fast_matches_reference_on_cuda(main_name, memory):
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(12)]
    ref_model = small_mlp().cuda()
    ref_main = make_main(main_name, ref_model)
    profit_reference(ref_model, iter(batches), mse, ref_main, ratio=10.0, n_ref=2, n_steps=4)
    model = small_mlp().cuda()
    run_fast(model, PROFIT(make_main(main_name, model), ratio=10.0, n_ref=2, memory=memory), batches)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lr", ["float", "tensor"])
@pytest.mark.parametrize("memory", ["full", "low"])
def test_step_never_waits_for_the_gpu(memory, lr):
    """The fast path's claim: no host sync in step() ("compact" syncs on purpose, to size its escape list), even
    with a device tensor lr (a capturable AdamW keeps its own step from syncing)."""
    model = small_mlp().cuda()
    kw = dict(lr=1e-3) if lr == "float" else dict(lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    opt = PROFIT(torch.optim.AdamW(model.parameters(), foreach=True, **kw), ratio=10.0, n_ref=2, memory=memory,
                 diagnostics=True)
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(9)]
    run_fast(model, opt, batches[:3])  # the first cycle allocates the optimizers' state
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_fast(model, opt, batches[3:])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.main_steps == 3 and set(opt.diagnostics()) == set(DIAGNOSTICS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compact_is_bit_identical_to_full_on_cuda():
    runs = {m: run_compact_vs_full_model(m, device="cuda") for m in ("full", "compact")}
    assert all(torch.equal(p, q) for p, q in zip(runs["full"][0].parameters(), runs["compact"][0].parameters()))
    assert sum(c.n_escapes for c in runs["compact"][1].theta_ref.buckets) > 0


# ---------------------------------------------------------------------------------------------- memory="compact"
# "compact" must be bit-identical to "full": every float operation is the same, only θ_ref's storage differs.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("main_name", ALL_MAINS)
@pytest.mark.parametrize("n_ref", [1, 2, 3])
@pytest.mark.parametrize("ratio", [100.0, 1.0])  # 1.0: reference steps as large as main steps, many escapes
def test_compact_is_bit_identical_to_full(main_name, n_ref, ratio, dtype):
    batches = make_batches(5 * (n_ref + 1) + 1, dtype=dtype)  # ends one call into a cycle: θ displaced
    runs = {}
    for memory in ("full", "compact"):
        model = small_mlp(dtype=dtype)
        opt = PROFIT(make_main(main_name, model), ratio=ratio, n_ref=n_ref, memory=memory)
        run_fast(model, opt, batches)
        with opt.anchored():
            at_ref = [p.detach().clone() for p in model.parameters()]
        runs[memory] = ([p.detach().clone() for p in model.parameters()], at_ref, opt)
    (full, full_ref, _), (compact, compact_ref, opt) = runs["full"], runs["compact"]
    assert all(torch.isfinite(a).all() for a in full)  # (NaN ≠ NaN would make the test meaningless)
    assert all(torch.equal(a, b) for a, b in zip(full, compact))
    assert all(torch.equal(a, b) for a, b in zip(full_ref, compact_ref))
    assert not all(torch.equal(a, b) for a, b in zip(compact, compact_ref))  # the comparison saw a displacement
    escapes = sum(c.n_escapes for c in opt.theta_ref.buckets)
    in_range = sum(int((c.offsets != 0).sum()) for c in opt.theta_ref.buckets)
    if dtype == torch.float64:  # fp64 ulps are 2^29× finer: offsets overflow int16
        assert escapes > sum(p.numel() for p in compact) / 10
    elif ratio == 100.0:
        assert in_range > escapes  # mostly stored as 16-bit offsets
    else:
        assert escapes > 0


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


def test_compact_channels_last_conv_is_bit_identical_to_full():
    (full, _), (compact, opt) = (run_compact_vs_full_model(m) for m in ("full", "compact"))
    assert compact[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), compact.parameters()))
    c = opt.theta_ref.buckets[0]
    assert c.n_escapes > 0 and (c.offsets != 0).sum() > c.n_escapes  # both paths of the encoding were used


def test_compact_encoding_round_trips_special_values():
    """Decode(encode) is the identity on the bits, for every kind of jump: ±0, subnormals, sign changes,
    inf, nan, offsets just inside and just outside ±32767 ulps."""
    f32 = torch.float32
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, -0.0, 1e-40, -1e-40, 3.0, float("inf"), float("nan"), -2.0, 5e-3])
    ref = torch.tensor([1.0, 1.0, 1.0, 1.0, -0.0, 0.0, -1e-40, 1e-40, -3.0, 1.0, 2.0, -2.0, 5e-3])
    ulps = torch.tensor([32767, -32767, 32768, -40000, 0, 0, 0, 0, 0, 0, 0, 0, -1000], dtype=torch.int32)
    ref = (ref.view(torch.int32) + ulps).view(f32)
    in_range = [0, 1, 11, 12]
    c = _CompactBucket([nn.Parameter(base.clone())])
    c.encode(ref.clone())
    assert torch.equal(c.decode().view(torch.int32), ref.view(torch.int32))
    # int16 offsets: 13·2 + 9 escapes·8 = 98 bytes beat int8's 13 + 12·8 = 109.
    assert c.offsets.dtype == torch.int16 and c.n_escapes == ref.numel() - len(in_range)
    assert c.offsets[in_range].tolist() == [32767, -32767, 0, -1000]
    assert c.nbytes() == 2 * ref.numel() + (4 + 4) * c.n_escapes


def test_compact_picks_int8_offsets_when_they_cost_less():
    base = torch.linspace(0.5, 2.0, 1000)
    ulps = torch.randint(-127, 128, (1000,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    ulps[:3] = torch.tensor([128, -128, 5000])  # three escapes for int8, none for int16
    ref = (base.view(torch.int32) + ulps).view(torch.float32)
    c = _CompactBucket([nn.Parameter(base.clone())])
    c.encode(ref.clone())
    assert c.offsets.dtype == torch.int8 and c.n_escapes == 3 and c.nbytes() == 1000 + 3 * 8
    assert torch.equal(c.decode().view(torch.int32), ref.view(torch.int32))
    ulps[3:10] = 300  # now 10 escapes for int8 (1080 B) vs none for int16 (2000 B): still int8
    ulps[10:200] = -300  # 200 escapes: 1000 + 1600 > 2000, int16 wins
    ref = (base.view(torch.int32) + ulps).view(torch.float32)
    c.encode(ref.clone())
    assert c.offsets.dtype == torch.int16 and c.n_escapes == 0
    assert torch.equal(c.decode().view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("delta", ["weights", "exact"])
def test_compact_keeps_a_quarter_to_a_half_of_the_extra_memory(delta):
    """θ_ref: 4 B per fp32 weight in "full", 1-2 B (+ escapes) in "compact"; delta="exact" adds its 4 B Δ buffer to
    either (delta="weights" keeps one only for the delta_lost diagnostic, off here)."""
    batches = make_batches(7)
    extra = {}
    for memory in ("full", "compact"):
        model = small_mlp()
        opt = PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), ratio=100.0, n_ref=2, memory=memory,
                     delta=delta, diagnostics=False)
        run_fast(model, opt, batches)  # mid-cycle
        extra[memory] = opt.extra_state_bytes()
        n = sum(p.numel() for p in model.parameters())
    buffer = 4 * n if delta == "exact" else 0
    assert extra["full"] == 4 * n + buffer
    (c,) = opt.theta_ref.buckets
    assert extra["compact"] - buffer == c.offsets.element_size() * n + 8 * c.n_escapes <= 2 * n + 8 * c.n_escapes
    assert c.n_escapes <= n // 50


def test_compact_rejects_unsupported_dtypes():
    p = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    opt = PROFIT(torch.optim.SGD([p], lr=0.1), memory="compact")
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="compact"):
        opt.step()


# ---------------------------------------------------------------------------------------------- memory="low"
class AlongU(nn.Module):
    """L = ½(⟨u, θ⟩ − t)²: every gradient is parallel to u, so Δ and the first moment m are too."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.u = torch.randn(12, generator=g, dtype=dtype)
        self.theta = nn.Parameter(torch.randn(12, generator=g, dtype=dtype))

    def loss(self, t):
        return 0.5 * (self.u @ self.theta - t) ** 2


@pytest.mark.parametrize("n_ref", [1, 3])
@pytest.mark.parametrize("main_name", ["sgd_momentum", "adam", "adamw", pytest.param("adan", marks=pytest.mark.slow)])
def test_low_memory_is_exact_when_delta_lies_along_the_momentum(main_name, n_ref):
    targets = torch.linspace(-2, 3, 16, dtype=torch.float64)
    # The first low-memory cycle has no momentum yet (and takes no reference step), so start both modes from
    # the same state after one plain step of the main optimizer.
    warm = AlongU()
    warm_opt = make_main(main_name, warm, groups=1)
    warm_opt.zero_grad(); warm.loss(torch.tensor(1.0, dtype=torch.float64)).backward(); warm_opt.step()
    runs = {}
    for memory in ("full", "low"):
        m = copy.deepcopy(warm)
        main = make_main(main_name, m, groups=1)
        main.load_state_dict(copy.deepcopy(warm_opt.state_dict()))
        opt = PROFIT(main, ratio=10.0, n_ref=n_ref, memory=memory)
        for t in targets:
            opt.zero_grad(); m.loss(t).backward(); opt.step()
        runs[memory] = m.theta.detach()
    torch.testing.assert_close(runs["low"], runs["full"], atol=1e-10, rtol=0)
    assert not torch.equal(runs["full"], warm.theta.detach())


def test_low_memory_restore_leaves_only_the_part_of_delta_orthogonal_to_m():
    model = small_mlp(dtype=torch.float64)
    main = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = PROFIT(main, ratio=10.0, n_ref=2, memory="low")
    batches = make_batches(12, dtype=torch.float64)
    seen = {}
    main.register_step_pre_hook(lambda o, a, k: seen.__setitem__("at_main", [p.detach().clone()
                                                                              for p in model.parameters()]))
    checked = 0
    for cycle in range(4):
        theta_ref = [p.detach().clone() for p in model.parameters()]
        m = [main.state[p]["exp_avg"].clone() for p in model.parameters()] if main.state else None
        for b in batches[3 * cycle: 3 * cycle + 2]:
            opt.zero_grad(); mse(model, b).backward(); opt.step()
        displaced = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt.zero_grad(); mse(model, batches[3 * cycle + 2]).backward(); opt.step()
        if m is None:  # first cycle: no momentum yet, no reference step
            assert torch.equal(displaced, torch.cat([r.reshape(-1) for r in theta_ref]))
            continue
        ref = torch.cat([r.reshape(-1) for r in theta_ref])
        mv = torch.cat([x.reshape(-1) for x in m])
        delta = displaced - ref
        orth = delta - (delta @ mv) / (mv @ mv) * mv
        restored = torch.cat([p.reshape(-1) for p in seen["at_main"]])
        torch.testing.assert_close(restored - ref, orth, atol=1e-12, rtol=0)
        assert (restored - ref).norm() <= delta.norm()
        checked += 1
    assert checked == 3


def test_low_memory_keeps_no_parameter_sized_buffer():
    model = small_mlp()
    main = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = PROFIT(main, ratio=10.0, n_ref=1, memory="low")
    run_fast(model, opt, make_batches(5))
    assert opt.mid_cycle
    main_ptrs = {t.data_ptr() for s in main.state.values() for t in s.values() if torch.is_tensor(t)}
    kept = [*vars(opt).values(), *vars(opt.theta_ref).values(), *opt.theta_ref.moments.values()]
    kept += [t for s in opt.state.values() for t in s.values()]
    tensors = [t for t in kept if torch.is_tensor(t) and t.numel() > len(DIAGNOSTICS) + 1]  # not the running sums
    assert tensors and all(t.data_ptr() in main_ptrs for t in tensors)  # only the main optimizer's own buffers
    assert opt.extra_state_bytes() == 0


def test_low_memory_state_dict_round_trip_and_bad_main():
    batches = make_batches(9)
    make = lambda model: PROFIT(torch.optim.Adam(model.parameters(), lr=1e-3), ratio=10.0, n_ref=2, memory="low")
    straight = small_mlp()
    run_fast(straight, make(straight), batches)
    first = small_mlp()
    opt = make(first)
    run_fast(first, opt, batches[:4])
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt.state_dict()})
    resumed = small_mlp(seed=9)
    opt2 = make(resumed)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    run_fast(resumed, opt2, batches[4:])
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), straight.parameters()))

    # anchored() in low-memory mode visits the approximate θ_ref and comes back up to rounding.
    run_fast(resumed, opt2, batches[:1])
    assert opt2.mid_cycle
    displaced = [p.detach().clone() for p in resumed.parameters()]
    with opt2.anchored():
        assert any(not torch.equal(p, d) for p, d in zip(resumed.parameters(), displaced))
    for p, d in zip(resumed.parameters(), displaced):
        torch.testing.assert_close(p.detach(), d, atol=1e-7, rtol=0)

    model = small_mlp()
    opt = PROFIT(torch.optim.RMSprop(model.parameters(), lr=1e-3), ratio=10.0, n_ref=1, memory="low")
    with pytest.raises(ValueError, match="first-moment"):
        run_fast(model, opt, make_batches(4))


def test_n_ref_1_displacement_is_not_exactly_minus_lr_times_gradient():
    """Why memory='low' cannot simply keep g₁: in fp32 θ₁ − θ₀ ≠ −λ_ref·g₁ and θ₁ + λ_ref·g₁ ≠ θ₀ bit for bit."""
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(100_000, generator=g) * 0.05
    grad = torch.randn(100_000, generator=g) * 1e-2
    lr_ref = 1e-3
    theta1 = theta0 - lr_ref * grad
    assert (theta1 - theta0 != -lr_ref * grad).float().mean() > 0.5
    assert (theta1 + lr_ref * grad != theta0).float().mean() > 1e-4  # 0.1% of weights come back wrong



@pytest.mark.parametrize("memory", ["full", "low"])
def test_step_reads_nothing_back_from_tensors(memory, monkeypatch):
    """CPU stand-in for the CUDA sync test: with a tensor lr, no step() reads a tensor into Python (each such read
    would wait for the GPU). Only the diagnostics() call does."""
    model = small_mlp()
    opt = PROFIT(torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05), momentum=0.9), ratio=10.0, n_ref=2,
                 memory=memory, diagnostics=True)
    batches = make_batches(9)
    run_fast(model, opt, batches[:3])  # the first cycle allocates the momentum buffers
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name: reads.append(_n))
    run_fast(model, opt, batches[3:])
    monkeypatch.undo()
    assert reads == [] and opt.main_steps == 3
    assert set(opt.diagnostics()) == set(DIAGNOSTICS) - ({"profit_delta_lost"} if memory == "low" else set())
