"""PROFIT as a torch optimizer: shared groups, schedulers, checkpoints (bit-identical mid-cycle), misuse,
GradScaler, accumulation; distributed (DDP, sharded) and CUDA runs."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from profit_bench.optim import DIAGNOSTICS, PROFIT
from profit_bench.reference import profit_reference
from optim_helpers import (
    TwoScalars, save_and_load,
    small_mlp, make_batches, mse, run_fast, params_of, same_bits, make_main, run_compact_vs_full_model, ALL_MAINS)


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
