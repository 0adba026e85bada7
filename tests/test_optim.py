"""The PROFIT optimizer against Algorithm 1 (reference.py) for every main optimizer, O_ref and n_ref;
hand-computed cycles and diagnostics; orthogonality and bit-exact restore."""

import copy

import pytest
import torch

from profit_bench.optim import DIAGNOSTICS, PROFIT
from profit_bench.reference import profit_reference
from optim_helpers import (
    TwoScalars,
    small_mlp, make_batches, mse, run_fast, params_of, same_bits, make_main, _factory, run_reference, ALL_MAINS,
    REFS)


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
