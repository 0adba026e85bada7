"""The benchmark commands run and account memory correctly (no timing is asserted anywhere)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from profit_bench.bench import (bench_methods, kept_bytes, make_variant, method_contexts, saved_activation_bytes,
                                synthetic_task, train_block, variant_memories)
from profit_bench import UserError
from profit_bench.methods import METHODS


def args(**kw):
    base = dict(model="mlp", batch_size=16, dtype="fp32", device="cpu", steps=4, warmup=2, ratio=100.0, n_ref=1,
                memory=["all"], methods=[], stat_samples=4)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("delta", ["exact", "weights"])
def test_kept_bytes_counts_one_copy_for_profit_at_most_half_for_compact_and_none_for_low_memory(delta):
    """θ_ref: 4 B per fp32 weight (full), 1-2 B + escapes (compact), 0 (low); delta="exact" adds its fp32 Δ
    buffer (4 B) to full and compact, never to low."""
    a = args()
    task = synthetic_task("mlp", 16, "cpu")
    memories = variant_memories(a)
    assert memories == [None, "full", "compact", "low"]
    sizes = {}
    for memory in memories:
        v = make_variant(memory, a, task, delta=delta)
        train_block(v, task, a, 3)  # mid-cycle: θ_ref exists
        sizes[memory] = kept_bytes(v)
        trainable = [p for p in v.model.parameters() if p.requires_grad]
        if memory == "compact":
            (c,) = v.opt.theta_ref.buckets
    adamw, full, compact, low = sizes.values()
    n = sum(p.numel() for p in trainable)
    buffer = 4 * n if delta == "exact" else 0
    assert full - adamw == 4 * n + buffer  # fp32 θ_ref (+ Δ)
    # int8 or int16 offsets + (int32 index, fp32 value) per escape, whichever width is smaller in all
    assert compact - adamw - buffer == c.offsets.element_size() * n + (4 + 4) * c.n_escapes <= 2 * n + 8 * c.n_escapes
    assert c.n_escapes < n / 20
    assert low == adamw


def test_saved_activation_bytes_match_a_hand_count_for_the_mlp():
    a = args(batch_size=16)
    task = synthetic_task("mlp", 16, "cpu")
    v = make_variant(None, a, task)
    # Per example: 2 LayerNorm inputs + 2 ReLU outputs of width 500 in fp32 (the Linear layers save the same
    # tensors) = 8000 bytes, plus a few scalars (input, LayerNorm mean/rstd, output, target).
    got = saved_activation_bytes(v, task, a)
    assert 8000 * 16 <= got <= 8100 * 16


@pytest.mark.parametrize("cmd", [["step", "--model", "mlp", "--steps", "2", "--warmup", "1", "--memory", "all"],
                                 ["memory", "--model", "mlp", "--batch-size", "16", "--dtype", "fp32",
                                  "--memory", "all"],
                                 ["epoch", "--model", "resnet18", "--n-images", "16", "--batch-size", "8",
                                  "--epochs", "1", "--dtype", "fp32"]])
def test_bench_cli_prints_side_by_side_ratios(cmd):
    out = subprocess.run([sys.executable, "-m", "profit_bench.bench", *cmd, "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(l.startswith("AdamW") and "1.000" in l for l in lines)
    assert any(l.startswith("PROFIT(AdamW)") for l in lines)
    assert not any("(AdamW)" in l and not l.startswith("PROFIT") for l in lines)  # no method rows unless asked
    if "all" in cmd:  # every memory variant has its row
        assert any(l.startswith("PROFIT(AdamW) compact") for l in lines)
        assert any(l.startswith("PROFIT(AdamW) low-mem") for l in lines)


def test_bench_step_prints_one_row_per_registry_method():
    out = subprocess.run([sys.executable, "-m", "profit_bench.bench", "step", "--model", "mlp", "--steps", "2",
                          "--warmup", "1", "--batch-size", "16", "--methods", "all", "--stat-samples", "4",
                          "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = {l.split()[0]: l.split() for l in out.stdout.splitlines()
            if l.split() and l.split()[0].endswith(")") and "(" in l.split()[0]}
    expected = [m for m in METHODS if METHODS[m].base != "full" and METHODS[m].supports("mlp")]
    assert {"l2sp", "ewc", "mas", "lwf"} <= set(expected)
    for m in expected:  # name, ms/batch, ± s.e., time ×, peak MiB, mem × (all numbers)
        assert len(rows[f"{m}(AdamW)"]) == 6 and all(float(x) > 0 for x in rows[f"{m}(AdamW)"][1:]), m
    for wrong, says in ((["vpt"], "does not support model 'mlp'"), (["profit"], "row already")):
        with pytest.raises(UserError, match=says):
            bench_methods(args(methods=wrong))


@pytest.mark.parametrize("model", ["mlp", "resnet_small"])
def test_l2sp_keeps_exactly_one_anchor_copy_more_than_adamw_and_its_penalty_trains(model):
    a = args(model=model, batch_size=4, methods=["l2sp", "ewc", "mas"])
    task = synthetic_task(model, 4, "cpu")
    ctx = method_contexts(task, a, bench_methods(a))
    adamw, l2sp = make_variant(None, a, task), make_variant(None, a, task, "l2sp", ctx["l2sp"])
    for v in (adamw, l2sp):
        train_block(v, task, a, 3)
    # L2-SP anchors every pretrained parameter that trains: the whole backbone, and for the toy's regression also
    # the head it shares between old and new (classification: the old head is frozen, the new one has no anchor).
    anchored = list(l2sp.model.backbone.parameters())
    if task.kind == "regression":
        anchored += list(l2sp.model.heads["old"].parameters())
    assert kept_bytes(l2sp) - kept_bytes(adamw) == sum(4 * p.numel() for p in anchored)  # one fp32 copy
    # The penalty reached the loss: from the second step on (θ ≠ θ₀) the two runs part.
    assert any(not torch.equal(p, q) for p, q in zip(adamw.model.parameters(), l2sp.model.parameters()))
    for name in ("ewc", "mas"):  # EWC, MAS: anchors + λ·(Fisher | importance) for the same parameters
        assert make_variant(None, a, task, name, ctx[name]).extra_state_bytes == 2 * l2sp.extra_state_bytes


def test_bench_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, "-m", "profit_bench.bench", "step", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and len(out.stderr.splitlines()) == 1
