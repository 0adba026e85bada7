"""run_trial, the pretrain cache, the method/optimizer registries and the trial CLI."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from profit_bench import UserError, methods, pretrain
from profit_bench.methods import METHODS, OPTIMIZERS, Prepared, register_method
from profit_bench.pretrain import cache_path, default_pretrain_config, ensure_pretrained, load_or_pretrain
from profit_bench.tasks import FMNIST_DIR, evaluate, get_task
from profit_bench.trial import TrialConfig, resolve, run_trial, to_json

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"wall_time_s", "cpu_time_s", "step_time_median_s", "train_time_s", "peak_mem_bytes"}


def tiny(tmp_path, **kw) -> TrialConfig:
    """A seconds-long trial: small splits, a short pretraining, a few fine-tuning steps (toy) or epochs (images)."""
    toy = kw.get("task", "toy") == "toy"
    d = dict(task="toy", method="full", seed=0, device="cpu", limit=256, cache_dir=str(tmp_path / "cache"))
    d.update(dict(steps=6, eval_every=3, pretrain_steps=30) if toy else dict(epochs=2, pretrain_epochs=2))
    d.update(kw)
    return TrialConfig(**d)


def params_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------- every task & model

@pytest.mark.parametrize("method", ["full", "head", "profit"])
def test_toy_methods_run_and_report(tmp_path, method):
    reports = []
    r = run_trial(tiny(tmp_path, method=method), report=reports.append)
    assert r["status"] == "ok"
    assert r["metric"] == "mse" and r["higher_is_better"] is False
    assert r["main_steps"] == 6
    # PROFIT consumes n_ref + 1 = 2 batches per main step; the others one.
    assert r["batches"] == (12 if method == "profit" else 6)
    assert [h["main_steps"] for h in reports] == [3, 6] and reports == r["history"]
    assert set(reports[0]) >= {"epoch", "step", "main_steps", "old_val", "new_val", "old_val_loss",
                               "new_val_loss", "train_loss"}
    assert not any(k.startswith(("old_test", "new_test")) for rec in reports for k in rec)  # test: end only
    diag = {"profit_projected_frac", "profit_cos_g_delta", "profit_perp_ratio", "profit_delta_rel", "profit_delta_lost"}
    assert (diag <= set(reports[0])) == (method == "profit") and (diag <= set(r)) == (method == "profit")
    assert r["n_trainable"] == (501 if method == "head" else 2 * 500 + 500 + 500 * 500 + 500 + 2 * 500 + 501 + 1000)
    assert r["config"]["profit"] == (method == "profit")
    assert r["forgetting_test"] == pytest.approx(r["old_test"] - r["old_test_before"])  # MSE: positive = worse
    assert r["forgetting_val"] == pytest.approx(r["old_val"] - r["old_val_before"])
    assert r["old_val"] == reports[-1]["old_val"] and r["old_val"] != r["old_test"]
    assert r["chance_old"] is None and r["extra_state_bytes"] == r["profit_state_bytes"]


def test_profit_memory_modes_in_a_trial(tmp_path):
    """memory='compact' is the same trial as 'full' (same metrics, same weights) with ¼–½ of the θ_ref bytes; the
    exact Δ buffer (profit_delta="exact", the default: 4 bytes per fp32 weight) comes on top in both."""
    runs = {m: run_trial(tiny(tmp_path, method="profit", profit_memory=m), return_model=True)
            for m in ("full", "compact")}
    (full, m_full), (compact, m_compact) = runs["full"], runs["compact"]
    for key in ("old_val", "new_val", "old_test", "new_test", "old_test_loss", "new_test_loss"):
        assert compact[key] == full[key]
    assert params_of(m_full).keys() == params_of(m_compact).keys()
    assert all(torch.equal(a, b) for a, b in zip(params_of(m_full).values(), params_of(m_compact).values()))
    n = full["n_trainable"]
    assert full["profit_state_bytes"] == 4 * n + 4 * n
    assert n <= compact["profit_state_bytes"] - 4 * n < 2.1 * n
    with pytest.raises(UserError, match="profit_memory"):
        run_trial(tiny(tmp_path, method="profit", profit_memory="half"))


@pytest.mark.parametrize("model", ["mlp", "resnet18", "vit_tiny",
                                   pytest.param("vit_small", marks=pytest.mark.slow)])
def test_digits_every_model(tmp_path, model):
    r = run_trial(tiny(tmp_path, task="digits", model=model, limit=32, batch_size=16, epochs=1, pretrain_epochs=1,
                       method="profit"))
    assert r["status"] == "ok" and r["metric"] == "accuracy"
    assert 0.0 <= r["old_test"] <= 1.0 and 0.0 <= r["new_val"] <= 1.0
    assert r["forgetting_test"] == pytest.approx(r["old_test_before"] - r["old_test"])  # accuracy: positive = worse
    assert (r["chance_old"], r["chance_new"]) == (1 / 5, 1 / 5)
    assert r["epochs_done"] == 1 and r["batches"] == 2 and r["main_steps"] == 1  # 32/16 batches, 2 per cycle


def test_cifar_runs(tmp_path, fake_cifar_dir):
    r = run_trial(tiny(tmp_path, task="cifar", model="mlp", data_dir=str(fake_cifar_dir), limit=32,
                       batch_size=16, epochs=1, pretrain_epochs=1))
    assert r["status"] == "ok" and r["batches"] == 2 and len(r["history"]) == 1


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_fmnist_runs(tmp_path):
    r = run_trial(tiny(tmp_path, task="fmnist", model="mlp", limit=32, batch_size=16, epochs=1, pretrain_epochs=1))
    assert r["status"] == "ok" and r["batches"] == 2


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_every_optimizer_changes_the_model(tmp_path, opt):
    r, model = run_trial(tiny(tmp_path, optimizer=opt, lr=1e-3, steps=2, eval_every=None), return_model=True)
    before = load_or_pretrain(get_task("toy", limit=256), "mlp", 0, default_pretrain_config("toy", steps=30,
                              limit=256), tmp_path / "cache")
    assert r["status"] == "ok"
    assert not torch.equal(model.backbone[1].weight, before.backbone[1].weight)


# --------------------------------------------------------------------------------------- what a trial trains

@pytest.mark.parametrize("method", ["full", "profit"])
def test_old_head_frozen_new_head_and_backbone_trained(tmp_path, method):
    cfg = tiny(tmp_path, task="digits", model="mlp", method=method, limit=64, batch_size=16)
    r, tuned = run_trial(cfg, return_model=True)
    task = get_task("digits", limit=64)
    pre = load_or_pretrain(task, "mlp", 0, default_pretrain_config("digits", epochs=2, limit=64), cfg.cache_dir)
    for k, v in params_of(pre.heads["old"]).items():
        assert torch.equal(v, tuned.heads["old"].state_dict()[k]), f"old head {k} moved"
    assert not torch.equal(pre.heads["new"].weight, tuned.heads["new"].weight)
    assert not torch.equal(pre.backbone[1].weight, tuned.backbone[1].weight)
    # The "before" numbers are the pretrained model's, measured independently here.
    for split in ("old_val", "new_val", "old_test", "new_test"):
        assert r[f"{split}_before"] == evaluate(pre, task, split)[0]


def test_head_method_moves_only_the_new_head(tmp_path):
    cfg = tiny(tmp_path, task="digits", model="mlp", method="head", limit=64, batch_size=16)
    r, tuned = run_trial(cfg, return_model=True)
    pre = load_or_pretrain(get_task("digits", limit=64), "mlp", 0,
                           default_pretrain_config("digits", epochs=2, limit=64), cfg.cache_dir)
    assert torch.equal(pre.backbone[1].weight, tuned.backbone[1].weight)
    assert not torch.equal(pre.heads["new"].weight, tuned.heads["new"].weight)
    assert r["old_test"] == r["old_test_before"] and r["forgetting_test"] == 0  # backbone + old head untouched
    assert r["n_trainable"] == 500 * 5 + 5


@pytest.mark.parametrize("task,method", [("toy", "full"), ("toy", "profit"), ("digits", "full"),
                                         ("digits", "profit")])
def test_lr_zero_keeps_old_metric(tmp_path, task, method):
    r = run_trial(tiny(tmp_path, task=task, method=method, lr=0.0, model="mlp", batch_size=16, limit=64))
    assert r["status"] == "ok" and r["main_steps"] > 0
    assert r["old_test"] == r["old_test_before"] and r["old_val"] == r["old_val_before"]
    assert r["forgetting_test"] == 0 == r["forgetting_val"]


def test_deterministic_on_cpu(tmp_path):
    cfg = tiny(tmp_path, method="profit")
    a, b = run_trial(cfg), run_trial(cfg)  # the first run pretrains, the second loads the cache
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING_KEYS}  # noqa: E731
    assert strip(a) == strip(b)
    c = run_trial(tiny(tmp_path, method="profit", seed=1))
    assert c["old_test"] != a["old_test"]


def test_bf16_autocast_runs(tmp_path):
    r = run_trial(tiny(tmp_path, task="digits", model="mlp", dtype="bf16", limit=64, batch_size=16))
    assert r["status"] == "ok" and r["config"]["dtype"] == "bf16"
    assert r["new_val"] != r["new_val_before"]  # it trained


def test_divergence_returns_status(tmp_path):
    r = run_trial(tiny(tmp_path, optimizer="sgd", lr=1e30, steps=20, eval_every=5))
    assert r["status"] == "diverged"
    assert r["main_steps"] < 20


def test_warmup_then_profit(tmp_path):
    r = run_trial(tiny(tmp_path, task="digits", model="mlp", method="profit", limit=64, batch_size=16,
                       epochs=2, warmup_epochs=1))
    # epoch 1: AdamW, 4 batches = 4 main steps; epoch 2: PROFIT, 4 batches = 2 cycles.
    assert r["status"] == "ok" and r["batches"] == 8 and r["main_steps"] == 6


def test_step_scheduler_counts_main_steps(tmp_path, monkeypatch):
    import profit_bench.trial as trial
    made = []
    monkeypatch.setattr(trial, "make_optimizer",
                        lambda *a, **k: made.append(methods.make_optimizer(*a, **k)) or made[-1])
    r = run_trial(tiny(tmp_path, profit=True, n_ref=2, steps=4, step_size=2, gamma=0.5, eval_every=None))
    assert r["main_steps"] == 4 and r["batches"] == 12 and r["profit"]
    # StepLR per main step: 0.5 ** (4 // 2); stepping per batch would give 0.5 ** (12 // 2).
    assert made[0].param_groups[0]["lr"] == pytest.approx(5e-4 * 0.25)


# --------------------------------------------------------------------------------------- registry

def test_register_method_may_wrap_the_model(tmp_path):
    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.heads, self.scale = inner, inner.heads, torch.nn.Parameter(torch.ones(()))

        def forward(self, x, task="old"):
            return self.inner(x, task) * self.scale

    def prepare_scaled(model, args, ctx):
        m = Scaled(model)
        for p in model.parameters():
            p.requires_grad_(False)
        return Prepared(m, [m.scale])

    register_method("scaled", prepare_scaled, supports=lambda name: name == "mlp")
    try:
        r, model = run_trial(tiny(tmp_path, method="scaled", lr=1e-2), return_model=True)
        assert isinstance(model, Scaled) and r["n_trainable"] == 1
        assert model.scale.item() != 1.0
        with pytest.raises(UserError, match="does not support model"):
            run_trial(tiny(tmp_path, task="digits", model="resnet18", method="scaled"))
    finally:
        METHODS.pop("scaled")


def test_bad_names_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        run_trial(tiny(tmp_path, method="nope"))
    with pytest.raises(UserError, match="unknown optimizer"):
        resolve(TrialConfig(optimizer="nope"))
    with pytest.raises(UserError, match="unknown trial config keys"):
        run_trial({"task": "toy", "bogus": 1})


# --------------------------------------------------------------------------------------- pretrain cache

def test_cache_hit_on_second_use(tmp_path, monkeypatch):
    task = get_task("toy", limit=128)
    pcfg = default_pretrain_config("toy", steps=20, limit=128)
    first = load_or_pretrain(task, "mlp", 0, pcfg, tmp_path)
    path = cache_path("toy", "mlp", 0, pcfg, tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["steps"] == 20 and meta["steps"] == 20
    assert meta["old_val"] == pytest.approx(evaluate(first, task, "old_val")[0])

    def boom(*a, **k):
        raise AssertionError("pretrained again despite the cache")
    monkeypatch.setattr(pretrain, "pretrain", boom)
    second = load_or_pretrain(task, "mlp", 0, pcfg, tmp_path)
    for k, v in first.state_dict().items():
        assert torch.equal(v, second.state_dict()[k])
    # A different pretraining config is a different key.
    assert cache_path("toy", "mlp", 0, default_pretrain_config("toy", steps=21, limit=128), tmp_path) != path


def _pretrain_in_child(cache_dir, barrier, out):
    torch.set_num_threads(1)
    barrier.wait()  # both processes miss the cache and write the same key at once
    task = get_task("toy", limit=512)
    was_cached = cache_path("toy", "mlp", 0, default_pretrain_config("toy", steps=100, limit=512), cache_dir).exists()
    model = load_or_pretrain(task, "mlp", 0, default_pretrain_config("toy", steps=100, limit=512), cache_dir,
                             progress=False)
    out.put((was_cached, float(model.backbone[1].weight.sum())))


def test_cache_survives_two_concurrent_writers(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_pretrain_in_child, args=(str(tmp_path), barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [cached for cached, _ in results] == [False, False]  # both really wrote
    assert results[0][1] == results[1][1]
    files = sorted(f.name for f in tmp_path.iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)  # .pt + .json, no temp leftovers
    pt = next(tmp_path.glob("*.pt"))
    state = torch.load(pt, weights_only=True)
    assert float(state["backbone.1.weight"].sum()) == results[0][1]


# --------------------------------------------------------------------------------------- CLI

def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "profit_bench.trial", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--task", "nope"], "unknown task"),
    (["--method", "nope"], "unknown method"),
    (["--task", "cifar", "--data-dir", "/nonexistent"], "CIFAR data missing"),
])
def test_cli_errors(args, needle, monkeypatch):
    monkeypatch.setenv("PROFIT_BENCH_CIFAR_URL", "http://127.0.0.1:9/")  # missing CIFAR: a download that cannot work
    p = cli(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr


@pytest.mark.parametrize("args,needle", [
    (["--optimizer", "nope"], "unknown optimizer"),
    (["--scheduler", "nope"], "unknown scheduler"),
    (["--steps", "5", "--epochs", "1"], "either steps or epochs"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_main_errors_in_process(args, needle, capsys):
    from profit_bench.trial import main
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_cli_prints_json(tmp_path):
    p = cli("--task", "toy", "--method", "profit", "--device", "cpu", "--limit", "128", "--steps", "4",
            "--eval-every", "2", "--pretrain-steps", "10", "--cache-dir", str(tmp_path), "--method-args", "{}")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["status"] == "ok" and r["main_steps"] == 4 and "history" not in r
    assert r["config"]["method"] == "profit" and r["config"]["steps"] == 4
    assert math.isfinite(r["old_test"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_mark_is_reset_per_trial():
    # Ray reuses worker processes: a big allocation before a trial must not be counted as (or hide) the
    # trial's own peak. run_trial resets the kernel's peak-RSS mark (VmHWM) when fine-tuning starts.
    import mmap

    from profit_bench.trial import _peak_rss_bytes, _reset_peak_rss
    size = 128 * 2**20
    ballast = mmap.mmap(-1, size)  # anonymous pages: unmapping returns them to the OS, whatever malloc does
    for i in range(0, size, 4096):
        ballast[i] = 1  # touch every page so it counts in RSS
    high = _peak_rss_bytes()
    ballast.close()
    assert _reset_peak_rss()
    assert _peak_rss_bytes() < high - 64 * 2**20


# --------------------------------------------------------------------------------------- bad input (issue 17)

@pytest.mark.parametrize("field,value,needle", [
    ("limit", 0, "limit must be >= 1"), ("steps", 0, "steps must be >= 1"), ("eval_every", 0, "eval_every"),
    ("batch_size", 2.5, "batch_size must be a whole number"), ("lr", float("nan"), "lr must be a finite"),
    ("n_ref", 1.5, "n_ref must be a whole number"), ("eval_every", "abc", "eval_every must be a whole number"),
    ("ratio", 0.0, "ratio must be > 0"), ("ref_optimizer", "lbfgs", "unknown ref_optimizer"),
    ("model", "resnet99", "unknown model"),
])
def test_resolve_rejects_bad_values(field, value, needle):
    with pytest.raises(UserError, match=needle):
        resolve(TrialConfig(**{field: value}))


def test_low_memory_needs_a_first_moment():
    with pytest.raises(UserError, match="first moment"):
        resolve(TrialConfig(method="profit", optimizer="rmsprop", profit_memory="low"))
    assert resolve(TrialConfig(method="profit", optimizer="adam", profit_memory="low")).profit
    assert resolve(TrialConfig(method="full", optimizer="rmsprop", profit_memory="low")).profit is False


def test_method_args_are_checked_per_method():
    with pytest.raises(UserError, match="'lora' takes no method_args \\['vpt_length'\\]"):
        resolve(TrialConfig(task="digits", model="vit_micro", method="lora", method_args={"vpt_length": 3}))
    with pytest.raises(UserError, match="'full' takes no method_args"):
        resolve(TrialConfig(method="full", method_args={"lora_r": 4}))
    assert METHODS["lora"].resolve_args({"lora_r": 2}) == {"lora_r": 2, "lora_alpha": 16.0, "lora_dropout": 0.0}


def test_cli_limit_zero_fails_fast():
    p = cli("--limit", "0", "--steps", "5")  # used to hang in pretraining
    assert p.returncode == 2 and p.stderr.strip() == "error: limit must be >= 1 (got 0)"


def test_cli_help_lists_choices_and_explains_profit():
    out = cli("--help").stdout
    for needle in ("{toy, digits, fmnist, cifar}", "lwf", "{sgd, adam, adamw, rmsprop, lookahead, adan}",
                   "{sgd, rmsprop, adam, adamw}", "--method profit is the same as --method full --profit"):
        assert needle in " ".join(out.split()), needle


def test_json_uses_null_for_non_finite():
    text = to_json({"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


# --------------------------------------------------------------------------------------- self-healing cache

def _toy_key(tmp_path):
    pcfg = default_pretrain_config("toy", steps=10, limit=64)
    return pcfg, cache_path("toy", "mlp", 0, pcfg, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "empty", "random", "other_model", "meta"])
def test_corrupt_cache_is_reported_moved_aside_and_rebuilt(tmp_path, capsys, damage):
    pcfg, path = _toy_key(tmp_path)
    good = ensure_pretrained("toy", "mlp", 0, pcfg, tmp_path, limit=64, progress=False)
    assert good == path and oct(path.stat().st_mode & 0o777) == "0o644"  # a shared cache is readable by all
    reference = torch.load(path, weights_only=True)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(torch.randint(0, 256, (len(raw),), dtype=torch.uint8).numpy().tobytes())
    elif damage == "other_model":  # a loadable file with another model's tensors under this key
        torch.save({"backbone.1.weight": torch.zeros(3, 3)}, path)
    else:
        meta = json.loads(path.with_suffix(".json").read_text())
        path.with_suffix(".json").write_text(json.dumps({**meta, "model": "resnet18"}))
    capsys.readouterr()
    ensure_pretrained("toy", "mlp", 0, pcfg, tmp_path, limit=64, progress=False)
    err = capsys.readouterr().err
    assert str(path) in err and "moved aside" in err
    assert len(list(tmp_path.glob(f"{path.name}.corrupt-*"))) == 1
    rebuilt = torch.load(path, weights_only=True)
    assert all(torch.equal(rebuilt[k], v) for k, v in reference.items())  # seeded: the same weights again


def test_unwritable_cache_dir_fails_before_pretraining(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a folder below a file cannot be created, whoever runs the test (root too)

    def boom(*a, **k):
        raise AssertionError("pretrained before checking the cache dir")
    monkeypatch.setattr(pretrain, "pretrain", boom)
    pcfg, _ = _toy_key(tmp_path)
    with pytest.raises(UserError, match=f"cache dir {blocker / 'cache'} is not writable"):
        ensure_pretrained("toy", "mlp", 0, pcfg, blocker / "cache", limit=64)


def test_missing_checkpoint_without_pretraining_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no pretrained checkpoint .*toy-mlp-s0-"):
        run_trial(tiny(tmp_path, pretrain_if_missing=False))


def test_fisher_cached_beside_checkpoint_and_rebuilt_when_missing(tmp_path, monkeypatch):
    pcfg, path = _toy_key(tmp_path)
    ensure_pretrained("toy", "mlp", 0, pcfg, tmp_path, limit=64, old_stats=[("fisher", 16)], progress=False)
    fpath = path.with_name(f"{path.stem}.fisher-n16.pt")
    first = torch.load(fpath, weights_only=True)
    # every parameter once (toy: the new head IS the old head), computed on old-train only
    assert set(first) == set(torch.load(path, weights_only=True)) - {"heads.new.weight", "heads.new.bias"}
    assert first["backbone.1.weight"].abs().sum() > 0
    fpath.unlink()
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("the checkpoint was rebuilt"))
    r = run_trial(tiny(tmp_path, limit=64, pretrain_steps=10, cache_dir=str(tmp_path), method="ewc",
                       method_args={"ewc_fisher_samples": 16}))
    assert r["status"] == "ok" and fpath.is_file()
    assert all(torch.equal(first[k], v) for k, v in torch.load(fpath, weights_only=True).items())
    assert r["extra_state_bytes"] > 0 and r["profit_state_bytes"] == 0


# --------------------------------------------------------------------------------------- the protocol (selection)

def test_shuffled_test_labels_change_no_choice(tmp_path, monkeypatch):
    """Selection reads validation only: with the test labels of both tasks shuffled, every trial reports the same
    history and validation results, so protocol.confirm_choices (what the sweep confirms, what the report
    selects) picks exactly the same configurations; only the test numbers move."""
    import dataclasses

    import pandas as pd

    from profit_bench import protocol, tasks

    def grid_results():
        rows = []
        for arm, method, lr in [("full", "full", 1e-3), ("full", "full", 1e-2), ("profit", "profit", 1e-3),
                                ("profit", "profit", 1e-2), ("head", "head", 1e-2)]:
            r = run_trial(tiny(tmp_path, task="digits", method=method, lr=lr, epochs=2))
            rows.append(dict(arm=arm, lr=lr, **{k: v for k, v in r.items() if k not in ("config",)}))
        return pd.DataFrame(rows)

    plain = grid_results()
    spec = tasks.TASKS["digits"]

    def shuffled_build(**kw):
        data = spec.build(**kw)
        g = torch.Generator().manual_seed(123)
        for split in ("old_test", "new_test"):
            s = getattr(data, split)
            data = dataclasses.replace(data, **{split: tasks.Split(s.x, s.y[torch.randperm(len(s.y), generator=g)])})
        return data
    monkeypatch.setitem(tasks.TASKS, "digits", dataclasses.replace(spec, build=shuffled_build))
    shuffled = grid_results()

    assert not plain["new_test"].equals(shuffled["new_test"])  # the test labels really changed
    val_cols = ["old_val", "new_val", "old_val_loss", "new_val_loss", "old_val_before", "new_val_before"]
    pd.testing.assert_frame_equal(plain[val_cols], shuffled[val_cols])
    assert plain["history"].tolist() == shuffled["history"].tolist()
    pick = lambda df: protocol.confirm_choices(protocol.mark_diverged(df, True), True)[["arm", "lr", "choice"]]  # noqa: E731
    pd.testing.assert_frame_equal(pick(plain), pick(shuffled))


def test_cache_behind_a_pyarrow_uri_is_shared_without_a_shared_folder(tmp_path, monkeypatch):
    """A file:// cache URI stands for a bucket: ensure_pretrained uploads the checkpoint (+ EWC's Fisher) there, and a
    trial on a "fresh node" (an empty local staging folder) finds it there instead of pretraining. The pretrained
    model's val/test metrics (`.before-cpu.json`) travel with it."""
    import shutil
    from dataclasses import replace
    monkeypatch.setenv("PROFIT_BENCH_CACHE", str(tmp_path / "node_a"))
    bucket = tmp_path / "bucket"
    uri = bucket.as_uri()
    cfg = tiny(tmp_path, method="ewc", cache_dir=uri)
    pcfg = pretrain.pretrain_config_for(resolve(cfg))
    where = ensure_pretrained("toy", "mlp", 0, pcfg, uri, limit=256, old_stats=[("fisher", 64)])
    key = pretrain.cache_key("toy", "mlp", 0, pcfg)
    assert where == f"{uri}/{key}.pt"
    assert sorted(p.name for p in bucket.iterdir()) == sorted([f"{key}.json", f"{key}.pt", f"{key}.fisher-n64.pt",
                                                               f"{key}.fisher-n64.json", f"{key}.before-cpu.json"])
    shutil.rmtree(tmp_path / "node_a")
    monkeypatch.setenv("PROFIT_BENCH_CACHE", str(tmp_path / "node_b"))
    r = run_trial(replace(cfg, pretrain_if_missing=False, method_args={"ewc_fisher_samples": 64}))
    assert r["status"] == "ok"
    with pytest.raises(UserError, match="no pretrained checkpoint"):  # nothing there for another seed
        run_trial(replace(cfg, seed=1, pretrain_if_missing=False))


# --------------------------------------------------------------------------------------- C.1 readings (issue 25)

def _main_step_lrs(tmp_path, monkeypatch, **kw) -> list[float]:
    """The lr of every main-optimizer step of a PROFIT n_ref 1 trial (RMSProp main optimizer)."""
    import profit_bench.trial as trial
    lrs = []

    def spy(*a, **k):
        opt = methods.make_optimizer(*a, **k)
        step = opt.step
        opt.step = lambda *sa, **sk: lrs.append(opt.param_groups[0]["lr"]) or step(*sa, **sk)
        return opt
    monkeypatch.setattr(trial, "make_optimizer", spy)
    r = run_trial(tiny(tmp_path, profit=True, n_ref=1, steps=12, step_size=4, gamma=0.5, eval_every=None, **kw))
    assert r["main_steps"] == 12 and r["batches"] == 24
    return lrs


def test_lr_decay_counting_batches_halves_the_main_steps_between_decays(tmp_path, monkeypatch):
    main = _main_step_lrs(tmp_path, monkeypatch)
    batch = _main_step_lrs(tmp_path, monkeypatch, lr_schedule_unit="batch")
    drops = lambda lrs: [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1]]  # noqa: E731
    assert drops(main) == [4, 8]                 # every step_size = 4 main steps
    assert drops(batch) == [2, 4, 6, 8, 10]      # every 4 batches = 2 PROFIT main steps at n_ref 1
    # main step k runs after 2k + 1 batches (its reference batch first): 0.5 ** ((2k + 1) // 4)
    assert batch == pytest.approx([5e-4 * 0.5 ** ((2 * k + 1) // 4) for k in range(12)])
    assert main == pytest.approx([5e-4 * 0.5 ** (k // 4) for k in range(12)])


def test_toy_variant_fills_the_knobs_and_explicit_knobs_win():
    from profit_bench.tasks import TOY_VARIANTS
    assert set(TOY_VARIANTS["today"]) == {"activation", "layernorm", "batch_size", "pretrain_batch_size",
                                          "lr_schedule_unit"}
    plain = resolve(TrialConfig(task="toy"))
    today = resolve(TrialConfig(task="toy", toy_variant="today"))
    assert (plain.activation, plain.layernorm, plain.batch_size, plain.lr_schedule_unit) == \
        (today.activation, today.layernorm, today.batch_size, today.lr_schedule_unit) == ("relu", "before_act", 32,
                                                                                          "main")
    assert pretrain.pretrain_config_for(plain) == pretrain.pretrain_config_for(today)  # same checkpoint
    big = resolve(TrialConfig(task="toy", toy_variant="batch_256"))
    assert big.batch_size == 256 and pretrain.pretrain_config_for(big).batch_size == 256
    assert resolve(TrialConfig(task="toy", toy_variant="batch_256", batch_size=64)).batch_size == 64
    with pytest.raises(UserError, match="toy_variant"):
        resolve(TrialConfig(task="digits", toy_variant="today"))
    with pytest.raises(UserError, match="unknown toy_variant"):
        resolve(TrialConfig(task="toy", toy_variant="nosuch"))
    with pytest.raises(UserError, match="mlp model only"):
        resolve(TrialConfig(task="digits", model="resnet18", layernorm="after_act"))


def test_pretraining_cache_key_follows_the_mlp_readings():
    from dataclasses import asdict
    base = resolve(TrialConfig(task="toy"))
    def key(**kw):
        return pretrain.config_hash(pretrain.pretrain_config_for(resolve(TrialConfig(task="toy", **kw))))
    keys = {key(), key(activation="tanh"), key(activation="gelu"), key(layernorm="after_act"), key(layernorm="none"),
            key(pretrain_batch_size=8), key(toy_variant="ln_after")}
    assert len(keys) == 6  # ln_after = layernorm after_act: the same model, the same key
    assert key(batch_size=8) == key() and key(lr_schedule_unit="batch") == key()  # fine-tuning only
    # at the original reading the key is the one computed before these knobs existed (old caches stay valid)
    import hashlib
    old = {k: v for k, v in asdict(pretrain.pretrain_config_for(base)).items() if k not in ("activation", "layernorm")}
    blob = json.dumps({"v": pretrain.CACHE_VERSION, **old}, sort_keys=True)
    assert key() == hashlib.sha256(blob.encode()).hexdigest()[:12]


def test_trial_pretrains_and_fine_tunes_the_reading_it_names(tmp_path):
    r, model = run_trial(tiny(tmp_path, toy_variant="ln_after", activation="tanh"), return_model=True)
    assert r["status"] == "ok" and r["config"]["layernorm"] == "after_act" and r["config"]["activation"] == "tanh"
    assert [type(m).__name__ for m in model.backbone][1:4] == ["Linear", "Tanh", "LayerNorm"]
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))
    run_trial(tiny(tmp_path))  # the original reading: its own checkpoint beside the first
    assert len(sorted(p.name for p in (tmp_path / "cache").glob("*.pt"))) == len(files) + 1


def test_trial_and_pretraining_record_their_process_cpu_seconds(tmp_path):
    """cpu_time_s: the compute a loaded shared machine's wall clock hides (the Table 1 regime study's budget)."""
    import json
    cfg = tiny(tmp_path)
    r = run_trial(cfg, progress=False)
    assert 0 < r["cpu_time_s"] < 60 and r["cpu_time_s"] <= r["wall_time_s"] * torch.get_num_threads() + 0.5
    ckpt = cache_path("toy", resolve(cfg).model, 0, default_pretrain_config("toy", steps=30, limit=256),
                      tmp_path / "cache")
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    assert 0 < meta["cpu_time_s"] <= meta["wall_time_s"] * torch.get_num_threads() + 0.5
