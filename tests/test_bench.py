"""The benchmark commands run and account memory correctly (no timing is asserted anywhere)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from profit_bench.bench import (kept_bytes, make_variant, saved_activation_bytes, synthetic_task, train_block,
                                variant_memories)


def args(**kw):
    base = dict(model="mlp", batch_size=16, dtype="fp32", device="cpu", steps=4, warmup=2, ratio=100.0, n_ref=1,
                memory=["all"])
    return SimpleNamespace(**{**base, **kw})


def test_kept_bytes_counts_one_copy_for_profit_at_most_half_for_compact_and_none_for_low_memory():
    a = args()
    task = synthetic_task("mlp", 16, "cpu")
    memories = variant_memories(a)
    assert memories == [None, "full", "compact", "low"]
    sizes = {}
    for memory in memories:
        v = make_variant(memory, a, task)
        train_block(v, task, a, 3)  # mid-cycle: θ_ref exists
        sizes[memory] = kept_bytes(v)
        trainable = [p for p in v.model.parameters() if p.requires_grad]
        if memory == "compact":
            (c,) = v.opt._compact
    adamw, full, compact, low = sizes.values()
    n = sum(p.numel() for p in trainable)
    assert full - adamw == 4 * n  # fp32 θ_ref
    # int8 or int16 offsets + (int32 index, fp32 value) per escape, whichever width is smaller in all
    assert compact - adamw == c.offsets.element_size() * n + (4 + 4) * c.n_escapes <= 2 * n + 8 * c.n_escapes
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
    if "all" in cmd:  # every memory variant has its row
        assert any(l.startswith("PROFIT(AdamW) compact") for l in lines)
        assert any(l.startswith("PROFIT(AdamW) low-mem") for l in lines)


def test_bench_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, "-m", "profit_bench.bench", "step", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and len(out.stderr.splitlines()) == 1
