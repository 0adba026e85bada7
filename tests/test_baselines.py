"""Baselines: adapter parameter counts, frozen parts, VPT sequence layout, zero-init identities, every method
× {plain, +PROFIT} as a tiny trial, and the timm optimizers (Lookahead, Adan) as we use them."""
import pytest
import torch
from torch import nn

from baselines.adapters import ConvAdapter, PromptedViT, add_convadapter, add_lora, add_vpt, unwrap_backbone
from profit_bench import UserError
from profit_bench.methods import MethodContext, canonical, get_method, make_optimizer
from profit_bench.models import MODELS, build_model
from profit_bench.pretrain import default_pretrain_config, load_or_pretrain
from profit_bench.tasks import get_task
from profit_bench.trial import run_trial

torch.set_num_threads(1)

RESNET18_BLOCKS = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1),  # (c_in, c_out, stride) of conv1
                   (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
VIT = {"vit_tiny": (192, 12), "vit_small": (384, 12)}  # (dim, depth); mlp ratio 4, patch 4 on 32×32 → 64 patches


@pytest.fixture(scope="module")
def digits():
    return get_task("digits", limit=32)


def prepare(method_name, model, task, method_args=None):
    method = get_method(method_name)
    return method.prepare(model, method.resolve_args(method_args), MethodContext(task))


def prepared(model_name, method, task, **method_args):
    p = prepare(method, build_model(model_name, task, seed=0).eval(), task, method_args)
    return p.model, list({id(q): q for q in p.params}.values())


def n_params(params):
    return sum(p.numel() for p in params)


def new_head(task, feat):
    return feat * task.n_new + task.n_new


# -------------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("r", [1, 4])
def test_lora_on_a_known_linear_adds_2rd(r):
    d = 32
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Linear(d, d))
    model.heads = nn.ModuleDict({"old": nn.Linear(d, 2), "new": nn.Linear(d, 3)})
    add_lora(model, r=r, alpha=2 * r)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert n_params(trainable) == 2 * r * d  # A: r×d, B: d×r; base layer and both heads frozen by peft


def test_lora_counts_mlp_resnet_vit(digits):
    r = 4
    _, p = prepared("mlp", "lora", digits, lora_r=r)
    assert n_params(p) == r * (64 + 500) + r * (500 + 500) + new_head(digits, 500)
    _, p = prepared("resnet18", "lora", digits, lora_r=r)
    convs = [(1, 64, 3)]  # stem (in_chans 1 on digits) then per block conv1, conv2 (+ 1×1 downsample)
    for c_in, c_out, stride in RESNET18_BLOCKS:
        convs += [(c_in, c_out, 3), (c_out, c_out, 3)] + ([(c_in, c_out, 1)] if stride == 2 else [])
    assert n_params(p) == sum(r * ci * k * k + co * r for ci, co, k in convs) + new_head(digits, 512)
    dim, depth = VIT["vit_tiny"]
    _, p = prepared("vit_tiny", "lora", digits, lora_r=r)
    per_block = r * ((dim + 3 * dim) + (dim + dim) + (dim + 4 * dim) + (4 * dim + dim))  # qkv, proj, fc1, fc2
    assert n_params(p) == depth * per_block + new_head(digits, dim)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_counts(digits, deep):
    dim, depth = VIT["vit_tiny"]
    _, p = prepared("vit_tiny", "vpt", digits, vpt_length=5, vpt_deep=deep)
    assert n_params(p) == (depth if deep else 1) * 5 * dim + new_head(digits, dim)


def test_convadapter_counts(digits):
    red = 4
    _, p = prepared("resnet18", "convadapter", digits, adapter_reduction=red)
    # down: grouped 3×3 conv c_in → c_in/red, groups c_in/red → (c_in/red)·red·9; up: 1×1 → c_out; scale: c_out
    expect = sum((ci // red) * red * 9 + (ci // red) * co + co for ci, co, _ in RESNET18_BLOCKS)
    assert n_params(p) == expect + new_head(digits, 512)


def test_frozen_flags(digits):
    for model_name, method in [("mlp", "lora"), ("resnet18", "lora"), ("vit_tiny", "vpt"),
                               ("resnet18", "convadapter")]:
        model, params = prepared(model_name, method, digits)
        ids = {id(p) for p in params}
        assert all(p.requires_grad == (id(p) in ids) for p in model.parameters())
        assert not any(p.requires_grad for p in model.heads["old"].parameters())
        assert all(p.requires_grad for p in model.heads["new"].parameters())


# -------------------------------------------------------------------------------- identities at init
def backbone_out(model, x):
    with torch.no_grad():
        return model.eval().backbone(x)


@pytest.mark.parametrize("model_name", ["mlp", "resnet18", "vit_tiny"])
def test_lora_zero_b_leaves_output_unchanged(digits, model_name):
    x = digits.new_test.x[:4]
    model = build_model(model_name, digits, seed=0)
    ref = backbone_out(model, x)
    add_lora(model, r=4, alpha=8)
    assert torch.equal(backbone_out(model, x), ref)
    for n, p in model.named_parameters():  # a non-zero B must change it: the adapters are really in the path
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)
    assert not torch.allclose(backbone_out(model, x), ref, atol=1e-3)


def test_convadapter_identity_at_init_and_with_scale_zero(digits):
    x = digits.new_test.x[:4]
    model = build_model("resnet18", digits, seed=0)
    for m in model.modules():  # timm zero-inits each block's last BN gamma, which would hide the residual branch
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    ref = backbone_out(model, x)
    adapters = add_convadapter(model)  # up conv zero-initialised, scale 1
    assert len(adapters) == 8 and torch.equal(backbone_out(model, x), ref)
    for ad in adapters:
        nn.init.normal_(ad.up.weight, std=0.1)
    changed = backbone_out(model, x)
    assert not torch.allclose(changed, ref, atol=1e-3)
    for ad in adapters:
        ad.scale.data.zero_()  # scale 0 switches the adapter off whatever its weights
    assert torch.allclose(backbone_out(model, x), ref, atol=1e-6)


def test_convadapter_matches_hand_formula():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False)
    ad = ConvAdapter(conv, reduction=2, scale_init=0.5)
    nn.init.normal_(ad.up.weight)
    x = torch.randn(2, 8, 9, 9)
    hidden = torch.relu(nn.functional.conv2d(x, ad.down.weight, stride=2, padding=1, groups=4))
    expect = conv(x) + 0.5 * nn.functional.conv2d(hidden, ad.up.weight)
    assert ad.down.weight.shape == (4, 2, 3, 3)  # 4 groups, each reads 2 input channels
    assert torch.allclose(ad(x), expect, atol=1e-5)


# ------------------------------------------------------------------------------------------------ VPT
def block_input_lengths(vit, x, run):
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1])) for b in vit.blocks]
    with torch.no_grad():
        run(x)
    for h in hooks:
        h.remove()
    return lengths


def test_vpt_lengthens_the_token_sequence(digits):
    x = digits.new_test.x[:2]
    plain = build_model("vit_tiny", digits, seed=0)
    vit = unwrap_backbone(plain.backbone)
    base = block_input_lengths(vit, x, plain.backbone)
    assert base == [1 + 64] * 12  # CLS + 8×8 patches (digits padded to 32×32, patch 4)
    model = build_model("vit_tiny", digits, seed=0)
    prompted = add_vpt(model, length=7)
    assert model.backbone.net is prompted  # the PadTo wrapper stays outside
    assert block_input_lengths(prompted.vit, x, model.backbone) == [1 + 7 + 64] * 12
    assert backbone_out(model, x).shape == backbone_out(plain, x).shape


def test_vpt_shallow_and_deep_differ(digits):
    x = digits.new_test.x[:3]
    model = build_model("vit_tiny", digits, seed=0)
    shallow = add_vpt(model, length=4, deep=False)
    deep = PromptedViT(shallow.vit, length=4, deep=True)
    deep.prompts.data[:] = shallow.prompts.data  # same prompts in every layer
    with torch.no_grad():
        pad = model.backbone  # PadTo(shallow)
        out_s = pad(x)
        pad.net = deep
        out_d = pad(x)
        # deep = shallow only for the first block: after it, deep resets the prompt tokens, shallow lets them flow
        assert not torch.allclose(out_s, out_d, atol=1e-4)
        deep.prompts.data[1:] += torch.randn_like(deep.prompts.data[1:])  # deep reads the later layers' prompts ...
        assert not torch.allclose(pad(x), out_d, atol=1e-4)
        pad.net = shallow
        assert torch.equal(pad(x), out_s)  # ... shallow has only the first set


def test_vpt_prompts_have_no_position_embedding(digits):
    # Without a position embedding the prompts are an unordered set: permuting them leaves the CLS output intact.
    x = digits.new_test.x[:2]
    model = build_model("vit_tiny", digits, seed=0)
    prompted = add_vpt(model, length=6, deep=True)
    ref = backbone_out(model, x)
    prompted.prompts.data = prompted.prompts.data[:, torch.randperm(6)]
    assert torch.allclose(backbone_out(model, x), ref, atol=1e-5)
    prompted.prompts.data += torch.randn_like(prompted.prompts)  # but their values matter (a constant
    # shift would not: every block starts with a LayerNorm)
    assert not torch.allclose(backbone_out(model, x), ref, atol=1e-4)


def test_unsupported_pairs_fail_clearly(digits):
    with pytest.raises(UserError, match="'vpt' does not support model 'resnet18'"):
        get_method("vpt", "resnet18")
    with pytest.raises(UserError, match="'convadapter' does not support model 'vit_tiny'"):
        get_method("convadapter", "vit_tiny")
    with pytest.raises(UserError, match="VPT needs a ViT"):
        add_vpt(build_model("resnet18", digits, seed=0))
    with pytest.raises(UserError, match="'lora' takes no method_args \\['lora_rank'\\]"):
        prepared("mlp", "lora", digits, lora_rank=4)
    with pytest.raises(UserError, match="does not support"):
        run_trial(dict(task="digits", model="resnet18", method="vpt", limit=16, epochs=1, device="cpu"))


# --------------------------------------------------------------------------------------------- trials
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain")


def tiny_trial(task, model, method, profit, cache_dir, data_dir=None, **extra):
    c = dict(task=task, model=model, method=method, profit=profit, epochs=1, pretrain_epochs=1, limit=32,
             batch_size=8, device="cpu", cache_dir=str(cache_dir), data_dir=data_dir, optimizer="adam", lr=1e-3,
             **extra)
    return run_trial(c, return_model=True)


MATRIX = [(m, b) for m in ("head", "lora", "vpt", "convadapter") for b in MODELS if get_method(m).supports(b)]
FAST_BACKBONES = ("mlp", "resnet_small", "vit_micro")  # the same adapter code as resnet18 / vit_*, a CPU's size


def check_trial(res, model, method, cache_dir, data_dir=None):
    assert res["status"] == "ok" and res["main_steps"] >= 1
    assert res["profit"] == res["config"]["profit"]
    # frozen parts after the trial equal a freshly prepared copy of the same pretrained model
    c = res["config"]
    task = get_task(c["task"], data_dir=data_dir, seed=c["seed"], limit=c["limit"])
    pcfg = default_pretrain_config(task.name, epochs=c["pretrain_epochs"], limit=c["limit"], dtype=c["dtype"])
    fresh = load_or_pretrain(task, c["model"], c["seed"], pcfg, cache_dir, progress=False)
    p = prepare(method, fresh, task, c["method_args"])
    fresh, params = p.model, list({id(q): q for q in p.params}.values())
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in params) == res["n_trainable"]
    after, before = model.state_dict(), fresh.state_dict()
    assert after.keys() == before.keys()
    frozen = [k for k in before if k not in trainable]
    assert any(k.startswith("heads.old") for k in frozen)
    for k in frozen:  # parameters and buffers (BN running stats) alike
        assert torch.equal(after[k], before[k]), k
    moved = [k for k in trainable if not torch.equal(after[k], before[k])]
    assert any(k.startswith("heads.new") for k in moved)


def run_and_check(method, backbone, profit, task, cache_dir, data_dir=None):
    res, model = tiny_trial(task, backbone, method, profit, cache_dir, data_dir)
    check_trial(res, model, method, cache_dir, data_dir)
    assert res["profit"] is profit


# Fast: every adapter × {plain, PROFIT} × small backbone on digits; one adapter per big backbone on the CIFAR
# fixture. The slow test runs the whole matrix (every model, head too) on both tasks.
@pytest.mark.parametrize("profit", [False, True], ids=["plain", "profit"])
@pytest.mark.parametrize("method,backbone", [mb for mb in MATRIX if mb[1] in FAST_BACKBONES and mb[0] != "head"])
def test_trial_digits(method, backbone, profit, cache_dir):
    run_and_check(method, backbone, profit, "digits", cache_dir)


@pytest.mark.parametrize("method,backbone,profit", [("convadapter", "resnet18", True), ("lora", "resnet18", False),
                                                    ("vpt", "vit_tiny", True), ("head", "resnet18", False)])
def test_trial_cifar(method, backbone, profit, cache_dir, fake_cifar_dir):
    run_and_check(method, backbone, profit, "cifar", cache_dir, str(fake_cifar_dir))


@pytest.mark.slow
@pytest.mark.parametrize("profit", [False, True], ids=["plain", "profit"])
@pytest.mark.parametrize("method,backbone", MATRIX)
@pytest.mark.parametrize("task", ["digits", "cifar"])
def test_trial_full_matrix(task, method, backbone, profit, cache_dir, fake_cifar_dir):
    data_dir = str(fake_cifar_dir) if task == "cifar" else None
    run_and_check(method, backbone, profit, task, cache_dir, data_dir)


def test_adapter_counts_on_the_small_models(digits):
    r, (dim, depth) = 2, (128, 4)
    _, p = prepared("vit_micro", "lora", digits, lora_r=r)
    per_block = r * ((dim + 3 * dim) + (dim + dim) + (dim + 4 * dim) + (4 * dim + dim))  # qkv, proj, fc1, fc2
    assert n_params(p) == depth * per_block + new_head(digits, dim)
    _, p = prepared("vit_micro", "vpt", digits, vpt_length=3)
    assert n_params(p) == 3 * dim + new_head(digits, dim)
    _, p = prepared("resnet_small", "convadapter", digits, adapter_reduction=4)
    blocks = [(16, 16)] * 3 + [(16, 32), (32, 32), (32, 32), (32, 64), (64, 64), (64, 64)]  # conv1 (c_in, c_out)
    assert n_params(p) == sum((ci // 4) * 4 * 9 + (ci // 4) * co + co for ci, co in blocks) + new_head(digits, 64)


def test_a_method_registered_with_profit_is_its_base_through_profit(cache_dir):
    # The analysis and the benchmark read Method.base / canonical instead of naming "profit": the registry's
    # "profit" method must be exactly `full` trained through PROFIT, trial for trial.
    assert canonical("profit", False) == ("full", True) == canonical("full", True)
    assert canonical("lora", True) == ("lora", True) and canonical("ewc", False) == ("ewc", False)
    assert canonical("a_retired_method", True) == ("a_retired_method", True)  # older runs pass through
    by_name, _ = tiny_trial("digits", "mlp", "profit", False, cache_dir)
    by_flag, _ = tiny_trial("digits", "mlp", "full", True, cache_dir)
    assert by_name["profit"] and by_flag["profit"]
    assert [by_name[k] for k in ("old_val", "new_val", "main_steps")] == \
        [by_flag[k] for k in ("old_val", "new_val", "main_steps")]


def test_profit_trains_only_the_adapter(cache_dir):
    # lora + PROFIT: n_trainable is the adapter + new head, and the LoRA B matrices moved from zero.
    res, model = tiny_trial("digits", "mlp", "lora", True, cache_dir, method_args={"lora_r": 2})
    assert res["n_trainable"] == 2 * (64 + 500) + 2 * (500 + 500) + 500 * 5 + 5
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


# ------------------------------------------------------------------------------------------ optimizers
def quadratic_run(opt_fn, steps=6, lr_schedule=None):
    """Minimise a fixed quadratic from a fixed start; returns the trajectory. lr_schedule(step) sets the lr."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 5), torch.randn(5)
    w = nn.Parameter(torch.randn(5))
    opt = opt_fn([w])
    traj = []
    for s in range(steps):
        if lr_schedule is not None:
            for g in opt.param_groups:
                g["lr"] = lr_schedule(s)
        opt.zero_grad()
        ((a @ w - b) ** 2).sum().backward()
        opt.step()
        traj.append(w.detach().clone())
    return torch.stack(traj)


def opt_cfg(**kw):
    return {"lr": 0.01, "weight_decay": 0.0, **kw}


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_lookahead_alpha_one_equals_base(base):
    la = quadratic_run(lambda p: make_optimizer("lookahead", p, **opt_cfg(lookahead_base=base, lookahead_alpha=1.0,
                                                                        lookahead_k=2)))
    ref = quadratic_run(lambda p: make_optimizer(base, p, **opt_cfg()))
    assert torch.allclose(la, ref, atol=1e-6)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_lookahead_half_alpha_k1_is_base_at_half_step(base):
    # Paper C.2.5's α=0.5, k=1. timm creates the slow weights lazily at the first sync, *from the already
    # stepped fast weights*, so step 1 is a full base step and every later step is a half step.
    la = quadratic_run(lambda p: make_optimizer("lookahead", p, **opt_cfg(lookahead_base=base, lookahead_alpha=0.5,
                                                                        lookahead_k=1)))
    ref = quadratic_run(lambda p: make_optimizer(base, p, **opt_cfg()), lr_schedule=lambda s: 0.01 if s == 0 else 0.005)
    assert torch.allclose(la, ref, atol=1e-6)
    plain = quadratic_run(lambda p: make_optimizer(base, p, **opt_cfg()))
    assert not torch.allclose(la, plain, atol=1e-4)


def test_adan_matches_paper_algorithm():
    # Adan (Xie et al. 2022), timm's β convention (β ≈ 0.9x) with bias correction and proximal weight decay.
    lr, (b1, b2, b3), eps, wd = 0.01, (0.98, 0.92, 0.99), 1e-8, 0.1
    got = quadratic_run(lambda p: make_optimizer("adan", p, **opt_cfg(weight_decay=wd)))
    torch.manual_seed(0)
    a, b = torch.randn(5, 5), torch.randn(5)
    w = torch.randn(5)
    m, d, n, g_prev, traj = torch.zeros(5), torch.zeros(5), torch.zeros(5), None, []
    for k in range(1, 7):
        g = 2 * a.T @ (a @ w - b)
        g_prev = g if g_prev is None else g_prev
        m = b1 * m + (1 - b1) * g
        d = b2 * d + (1 - b2) * (g - g_prev)
        n = b3 * n + (1 - b3) * (g + b2 * (g - g_prev)) ** 2
        denom = (n / (1 - b3 ** k)).sqrt() + eps
        w = (w - lr * (m / (1 - b1 ** k) + b2 * d / (1 - b2 ** k)) / denom) / (1 + lr * wd)
        g_prev = g
        traj.append(w.clone())
    assert torch.allclose(got, torch.stack(traj), atol=1e-5)


# ---------------------------------------------------------------------------------------------- sweeps
def arms_by(spec):
    out = {}
    for arm in spec.arms:
        (model,) = arm.models
        f = arm.fixed
        key = "profit" if f["method"] == "profit" else f["optimizer"]
        out[(model, f["method"], key, bool(f.get("profit")))] = arm
    return out


def test_table2_yaml_is_the_papers_grid():
    from profit_bench.plan import Plan
    from profit_bench.sweep import load_spec
    spec = load_spec("table2")
    assert load_spec("table2", data_dir="/somewhere").task == "cifar"
    table10 = {"resnet18": {"adam": 1e-4, "lookahead": 1e-4, "profit": 1e-4},   # paper Table 10
               "vit_tiny": {"adam": 1e-5, "lookahead": 1e-4, "profit": 1e-4},
               "vit_small": {"adam": 3e-4, "lookahead": 3e-4, "profit": 3e-4}}
    ratio = {"resnet18": 10, "vit_tiny": 1000, "vit_small": 100}  # Table 9 rows equal to the Table 2 PROFIT cells
    arms = arms_by(spec)
    assert spec.trial["lookahead_alpha"] == 0.5 and spec.trial["lookahead_k"] == 1 and spec.trial["n_ref"] == 1
    for model, lrs in table10.items():
        for name, lr in lrs.items():
            arm = arms[(model, "profit" if name == "profit" else "full", name, False)]
            assert arm.fixed["lr"] == lr
        assert arms[(model, "profit", "profit", False)].fixed["ratio"] == ratio[model]
        for opt in ("sgd", "adan"):  # no paper lr: searched on a grid
            assert "grid" in arms[(model, "full", opt, False)].space["lr"]
    assert {m for m, *_ in arms} == set(table10) and {k[2] for k in arms} == {"sgd", "adam", "lookahead", "adan",
                                                                            "profit"}
    for model, lrs in table10.items():  # L2-SP, EWC, LwF (issue 18): Adam at its Table 10 lr, 4 strengths each
        for method, knob in (("l2sp", "l2sp_alpha"), ("ewc", "ewc_lambda"), ("lwf", "lwf_lambda")):
            arm = arms[(model, method, "adam", False)]
            assert arm.fixed["lr"] == lrs["adam"] and len(arm.space[knob]["grid"]) == 4
    # 3 backbones × 3 seeds × (SGD 4 + Adam + Lookahead + Adan 3 + PROFIT + 3 regularisers × 4)
    assert len(Plan(spec).search_points()) == 3 * 3 * (4 + 1 + 1 + 3 + 1 + 3 * 4)


def test_table7_yaml_pairs_every_adapter_with_and_without_profit():
    from profit_bench.sweep import load_spec
    arms = arms_by(load_spec("table7_adapters"))
    pairs = {("resnet18", "convadapter", "adamw"), ("vit_tiny", "lora", "adam"), ("vit_tiny", "vpt", "adam"),
             ("vit_small", "lora", "adam"), ("vit_small", "vpt", "adam")}
    for model, method, opt in pairs:
        plain, prof = arms[(model, method, opt, False)], arms[(model, method, opt, True)]
        assert plain.space == prof.space and plain.fixed["method_args"] == prof.fixed["method_args"]
    assert {(m, me, o) for m, me, o, _ in arms if me != "profit"} == pairs
