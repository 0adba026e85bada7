"""The benchmark commands run and account memory correctly (no timing is asserted anywhere)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from profit_bench.bench import bench_step, kept_bytes, make_variant, synthetic_task, train_block


def args(**kw):
    base = dict(model="mlp", batch_size=16, dtype="fp32", device="cpu", steps=4, warmup=2, ratio=100.0, n_ref=1,
                memory="both")
    return SimpleNamespace(**{**base, **kw})


def test_kept_bytes_counts_exactly_one_extra_copy_for_profit_and_none_for_low_memory():
    a = args()
    task = synthetic_task("mlp", 16, "cpu")
    sizes = {}
    for name in ("AdamW", "PROFIT(AdamW) ratio=100 n_ref=1", "PROFIT(AdamW) low-mem ratio=100 n_ref=1"):
        v = make_variant(name, a, task)
        train_block(v, task, a, 3)  # mid-cycle: θ_ref exists
        sizes[name] = kept_bytes(v)
        trainable = sum(p.numel() * p.element_size() for p in v.model.parameters() if p.requires_grad)
    adamw, full, low = sizes.values()
    assert full - adamw == trainable
    assert low == adamw


@pytest.mark.parametrize("cmd", [["step", "--model", "mlp", "--steps", "2", "--warmup", "1", "--memory", "both"],
                                 ["epoch", "--model", "resnet18", "--n-images", "16", "--batch-size", "8",
                                  "--epochs", "1", "--dtype", "fp32"]])
def test_bench_cli_prints_side_by_side_ratios(cmd):
    out = subprocess.run([sys.executable, "-m", "profit_bench.bench", *cmd, "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(l.startswith("AdamW") and "1.000" in l for l in lines)
    assert any(l.startswith("PROFIT(AdamW)") for l in lines)


def test_bench_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, "-m", "profit_bench.bench", "step", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and len(out.stderr.splitlines()) == 1
