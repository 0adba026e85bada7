"""PROFIT in other people's training loops: train()/eval() (the schedule-free convention), LR schedulers stepped per
batch, loading a plain optimizer's checkpoint, and the real Hugging Face Trainer."""

import copy

import pytest
import torch
from torch import nn

from profit_bench.optim import PROFIT, MainStepScheduler, ProfitConfigError


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 3, generator=g)
        out.append((x, torch.sin(3 * x.norm(dim=1, keepdim=True))))
    return out


def train_on(model, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(xs, ys) -> bool:
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


def profit(model, memory="full", n_ref=2, lr=0.05):
    return PROFIT(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), ratio=2.0, n_ref=n_ref, memory=memory)


# ---------------------------------------------------------------------------------------------- train() / eval()
@pytest.mark.parametrize("memory", ["full", "compact", "low"])
def test_eval_swaps_theta_ref_in_and_train_swaps_the_training_weights_back(memory):
    data = batches(11)
    model, twin = small_mlp(), small_mlp()
    opt, twin_opt = profit(model, memory), profit(twin, memory)
    train_on(model, opt, data[:3])      # one main step: SGD momentum exists for memory="low"
    train_on(twin, twin_opt, data[:3])
    theta_ref = weights(model)
    train_on(model, opt, data[3:4])     # mid-cycle: displaced from θ_ref
    train_on(twin, twin_opt, data[3:4])
    displaced = weights(model)
    assert opt.mid_cycle and not same(displaced, theta_ref)
    with opt.anchored():
        anchored = weights(model)       # what anchored() evaluates at (for "low": the approximate θ_ref)

    opt.eval()
    at_eval = weights(model)
    if memory == "low":
        assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(at_eval, anchored))
    else:
        assert same(at_eval, theta_ref) and same(anchored, theta_ref)
    opt.eval()                          # idempotent: no second swap
    assert same(weights(model), at_eval) and opt.evaluating
    with opt.anchored():                # already at θ_ref: anchored() must not swap back
        assert same(weights(model), at_eval)
    assert same(weights(model), at_eval)
    with pytest.raises(RuntimeError, match="eval mode.*train()"):
        opt.step()

    opt.train()
    opt.train()                         # idempotent
    back = weights(model)
    if memory == "low":
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(back, displaced))
    else:
        assert same(back, displaced)
    # The cycle goes on where it was: same weights as a twin that never evaluated.
    train_on(model, opt, data[4:])
    train_on(twin, twin_opt, data[4:])
    if memory == "low":
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(weights(model), weights(twin)))
    else:
        assert same(weights(model), weights(twin))


def test_eval_at_a_cycle_boundary_moves_nothing_and_nesting_with_anchored_is_refused():
    model = small_mlp()
    opt = profit(model)
    train_on(model, opt, batches(3))
    before = weights(model)
    opt.eval()
    assert same(weights(model), before)
    opt.train()
    assert same(weights(model), before)
    train_on(model, opt, batches(1, seed=5))
    with opt.anchored():
        with pytest.raises(RuntimeError, match="inside anchored"):
            opt.eval()


def test_finish_in_eval_mode_ends_at_theta_ref_and_training_resumes_with_a_fresh_cycle():
    data = batches(5)
    model = small_mlp()
    opt = profit(model)
    train_on(model, opt, data[:3])
    theta_ref = weights(model)
    train_on(model, opt, data[3:4])
    opt.eval()
    opt.finish()
    assert same(weights(model), theta_ref) and opt.phase == 0
    opt.train()                         # nothing set aside any more
    assert same(weights(model), theta_ref)
    train_on(model, opt, data[4:])      # a new cycle starts at θ_ref
    assert opt.phase == 1


def test_checkpoint_taken_in_eval_mode_pairs_with_the_weights_at_theta_ref():
    """Trainer saves right after evaluating: model at θ_ref, so the optimizer part is the cycle abandoned."""
    data = batches(8)
    model = small_mlp()
    opt = profit(model)
    train_on(model, opt, data[:4])      # mid-cycle
    opt.eval()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["profit"]["phase"] == 0 and saved_opt["profit"]["refs"] == {}
    assert opt.phase == 1 and opt.evaluating  # the live optimizer keeps its cycle

    # Resuming from that pair equals a run that called finish() at the same point.
    resumed = small_mlp(seed=9)
    resumed.load_state_dict(saved_model)
    resumed_opt = profit(resumed)
    resumed_opt.load_state_dict(saved_opt)
    expected = small_mlp()
    expected_opt = profit(expected)
    train_on(expected, expected_opt, data[:4])
    expected_opt.finish()
    train_on(resumed, resumed_opt, data[4:])
    train_on(expected, expected_opt, data[4:])
    assert same(weights(resumed), weights(expected))


def test_load_in_eval_mode_comes_back_in_eval_mode_at_the_loaded_theta_ref():
    data = batches(4)
    model = small_mlp()
    opt = profit(model)
    train_on(model, opt, data[:3])
    theta_ref = weights(model)
    train_on(model, opt, data[3:])
    saved = copy.deepcopy(opt.state_dict())   # train mode, mid-cycle
    opt.eval()
    opt.load_state_dict(saved)
    assert opt.evaluating and same(weights(model), theta_ref)


# ---------------------------------------------------------------------------------------------- LR schedulers
def test_scheduler_stepped_per_batch_decays_per_call_unless_wrapped_to_main_steps():
    data = batches(6)
    # Unwrapped StepLR(step_size=1): one halving per step() call, i.e. n_ref + 1 = 3 per main step.
    model = small_mlp()
    opt = profit(model)
    plain = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_on(model, opt, data[:3], plain)
    assert opt.main_steps == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.05 / 8)

    # Wrapped: halves once per main step, and not in between.
    model = small_mlp()
    opt = profit(model)
    sched = MainStepScheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), opt)
    lrs = []
    for b in data:
        train_on(model, opt, [b], sched)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.025, 0.0125])
    assert sched.get_last_lr() == pytest.approx([0.0125])

    # The wrapper-free pattern: a LambdaLR that reads main_steps gives the same lrs.
    model = small_mlp()
    opt = profit(model)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 0.5 ** opt.main_steps)
    lam_lrs = []
    for b in data:
        train_on(model, opt, [b], lam)
        lam_lrs.append(opt.param_groups[0]["lr"])
    assert lam_lrs == pytest.approx(lrs)

    # Checkpoints keep the count of main steps already applied.
    fresh = MainStepScheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), opt)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.seen == 2 and fresh.scheduler.last_epoch == sched.scheduler.last_epoch


def test_main_step_scheduler_steps_every_call_for_a_plain_optimizer():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = MainStepScheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), opt)
    train_on(model, opt, batches(2), sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_loading_a_plain_adamw_checkpoint_names_the_fix():
    model = small_mlp()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_on(model, adamw, batches(2))
    sd = adamw.state_dict()
    opt = PROFIT(torch.optim.AdamW(model.parameters(), lr=1e-3))
    with pytest.raises(ProfitConfigError, match="plain optimizer's state_dict.*load it into the main optimizer "
                                                "before wrapping"):
        opt.load_state_dict(sd)
    # The fix it names works: the AdamW moments carry over.
    main = torch.optim.AdamW(model.parameters(), lr=1e-3)
    main.load_state_dict(sd)
    opt = PROFIT(main)
    assert torch.equal(opt.main.state[next(model.parameters())]["exp_avg"],
                       adamw.state[next(model.parameters())]["exp_avg"])
    train_on(model, opt, batches(2))    # and it trains


# ---------------------------------------------------------------------------------------------- Hugging Face Trainer
class TinyRegressor(nn.Module):
    """A randomly initialised model in Trainer's calling convention (keyword inputs, a dict with the loss); it records
    the training batches it sees, so a hand-written loop can replay exactly those."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.seen = []

    def forward(self, x, labels):
        if self.training:
            self.seen.append((x.detach().clone(), labels.detach().clone()))
        out = self.net(x).squeeze(-1)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


def regression_set(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(dim=1))
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def test_hugging_face_trainer_evaluates_at_theta_ref_and_trains_like_a_hand_written_loop(tmp_path):
    transformers = pytest.importorskip("transformers")
    train_set, eval_set = regression_set(64, seed=1), regression_set(16, seed=2)
    n_ref, eval_steps, max_steps = 2, 4, 7  # the evaluation after call 4 falls mid-cycle (calls 4-6)

    def make_opt(model):
        opt = PROFIT(torch.optim.AdamW(model.parameters(), lr=0.02), ratio=4.0, n_ref=n_ref)
        return opt, MainStepScheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7), opt)

    model = TinyRegressor()
    opt, sched = make_opt(model)
    calls = []
    for name in ("train", "eval"):
        method = getattr(opt, name)
        setattr(opt, name, lambda method=method, name=name: (calls.append(name), method())[1])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=max_steps,
        eval_strategy="steps", eval_steps=eval_steps, save_strategy="no", logging_strategy="no", report_to=[],
        max_grad_norm=0.0, use_cpu=True, seed=0, data_seed=0, remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                   optimizers=(opt, sched))
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2  # after call 4, and at the end of training (call 7: mid-cycle again)
    assert calls.count("train") == max_steps and calls.count("eval") == 2 and calls[-1] == "eval"
    # Trainer leaves the optimizer in eval mode: the model holds θ_ref; train() brings the training weights back.
    assert opt.evaluating
    at_end = weights(model)
    opt.train()
    trained = weights(model)

    # The same batches by hand, recording θ_ref of the cycle each evaluation falls into.
    hand = TinyRegressor()
    hand_opt, hand_sched = make_opt(hand)
    assert len(model.seen) == max_steps
    x_eval = torch.stack([r["x"] for r in eval_set])
    y_eval = torch.stack([r["labels"] for r in eval_set])

    def eval_loss(m) -> float:
        with torch.no_grad():
            return ((m.net(x_eval).squeeze(-1) - y_eval) ** 2).mean().item()

    theta_ref_loss, displaced_loss = None, None
    for i, (x, y) in enumerate(model.seen, start=1):
        if hand_opt.phase == 0:
            cycle_start, cycle_start_loss = weights(hand), eval_loss(hand)  # θ_ref of the cycle call i opens
        hand_opt.zero_grad()
        hand(x, y)["loss"].backward()
        hand_opt.step()
        hand_sched.step()
        if i == eval_steps:
            assert hand_opt.mid_cycle
            theta_ref_loss, displaced_loss = cycle_start_loss, eval_loss(hand)
    assert hand_opt.mid_cycle

    assert same(trained, weights(hand))             # Trainer's training = the hand-written loop, bit for bit
    assert same(at_end, cycle_start)                # and it ended at θ_ref
    assert hand_opt.main_steps == 2 and hand_opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.7 ** 2)
    assert abs(displaced_loss - theta_ref_loss) > 1e-4  # evaluating at the wrong weights would show
    assert evals[0] == pytest.approx(theta_ref_loss, rel=1e-6)
    assert evals[1] == pytest.approx(cycle_start_loss, rel=1e-6)
