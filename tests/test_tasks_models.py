import gzip

import numpy as np
import pytest
import torch
from torch import nn

from profit_bench import UserError
from profit_bench.models import MODELS, TaskModel, build_model, uses_channels_last
from profit_bench.tasks import (FMNIST_DIR, SPLITS, TASKS, TaskData, carve_val, evaluate, get_task, random_crop_flip,
                                read_idx)

torch.set_num_threads(1)
HAVE_FMNIST = (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def toy():
    return get_task("toy", seed=0)


@pytest.fixture(scope="module")
def digits():
    return get_task("digits", seed=0)


@pytest.fixture(scope="module")
def fmnist():
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
    return get_task("fmnist", seed=0)


@pytest.fixture(scope="module")
def cifar(fake_cifar_dir):
    return get_task("cifar", data_dir=fake_cifar_dir, seed=0)


def check_splits(task: TaskData, in_shape, n_old, n_new):
    assert task.in_shape == in_shape and (task.n_old, task.n_new) == (n_old, n_new)
    for name in SPLITS:
        s = getattr(task, name)
        assert s.x.shape[1:] == in_shape and s.x.dtype == torch.float32 and s.x.device.type == "cpu"
        assert len(s.x) == len(s.y) > 0
        n_classes = n_old if name.startswith("old") else n_new
        assert s.y.dtype == torch.int64 and 0 <= s.y.min() and s.y.max() < n_classes
        assert set(s.y.unique().tolist()) == set(range(n_classes)), name  # every class present
    # per-channel standardised with old-train statistics
    x = task.old_train.x
    dims = (0, 2, 3)
    assert torch.allclose(x.mean(dims), torch.zeros(in_shape[0]), atol=1e-4)
    assert torch.allclose(x.std(dims), torch.ones(in_shape[0]), atol=1e-3)


# ------------------------------------------------------------------------------------------------ toy

def test_toy_sizes_ranges_and_targets(toy):
    assert (toy.kind, toy.metric, toy.higher_is_better, toy.image) == ("regression", "mse", False, False)
    assert [len(getattr(toy, k)) for k in SPLITS] == [50_000, 1000, 10_000, 50_000, 1000, 10_000]
    for name, (lo, hi) in zip(SPLITS, [(-1, 1)] * 3 + [(0.8, 1.5)] * 3):
        s = getattr(toy, name)
        assert s.x.shape[1] == 2 and s.y.shape == (len(s.x), 1) and s.y.dtype == torch.float32
        assert s.x.min() >= lo and s.x.max() <= hi
        assert s.x.min() < lo + 0.05 and s.x.max() > hi - 0.05  # fills the whole box
    for name in ("old_val", "old_test", "new_val", "new_test"):  # noise-free
        s = getattr(toy, name)
        assert torch.equal(s.y, torch.sin(10 * torch.linalg.vector_norm(s.x, dim=1, keepdim=True)))
    for name in ("old_train", "new_train"):  # f(x) + N(0, 1)
        s = getattr(toy, name)
        noise = (s.y - torch.sin(10 * s.x.double().norm(dim=1, keepdim=True))).squeeze(1)
        assert abs(noise.mean().item()) < 0.02  # 4 sigma of the mean of 50k N(0,1)
        assert abs(noise.std().item() - 1) < 0.015
    assert not torch.equal(toy.old_train.x[:100], get_task("toy", seed=1).old_train.x[:100])


def test_toy_deterministic_and_limit(toy):
    again = get_task("toy", seed=0, limit=300)
    for name in SPLITS:
        s, full = getattr(again, name), getattr(toy, name)
        assert len(s) == 300
        # a subsample of the same data: every limited row appears in the full split
        match = (s.x[:, None, :] == full.x[None, :, :]).all(-1).any(1)
        assert match.all()


# ------------------------------------------------------------------------------------------------ classification

def test_digits(digits):
    from sklearn.datasets import load_digits
    assert (digits.kind, digits.metric, digits.higher_is_better, digits.image) == ("classification", "accuracy",
                                                                                   True, False)
    check_splits(digits, (1, 8, 8), 5, 5)
    target = load_digits().target
    assert len(digits.old_train) + len(digits.old_val) + len(digits.old_test) == (target < 5).sum()
    assert len(digits.new_train) + len(digits.new_val) + len(digits.new_test) == (target >= 5).sum()
    assert abs(len(digits.old_test) / (target < 5).sum() - 0.25) < 0.01
    for head in ("old", "new"):  # 20% of each class's training images, ±1 (stratified)
        train, val = getattr(digits, f"{head}_train").y, getattr(digits, f"{head}_val").y
        for c in range(5):
            n_c = (train == c).sum().item() + (val == c).sum().item()
            assert abs((val == c).sum().item() - 0.2 * n_c) <= 1


def test_digits_new_labels_are_reindexed(digits):
    """Compare to sklearn directly: a new-task image with label k is an original digit 5 + k.

    The standardisation is affine, so the source image is the raw one with correlation 1."""
    from sklearn.datasets import load_digits
    d = load_digits()
    raw = torch.from_numpy(d.data).double()
    raw = raw - raw.mean(1, keepdim=True)
    raw = raw / raw.norm(dim=1, keepdim=True)
    for split, offset in ((digits.new_test, 5), (digits.old_train, 0)):
        x = split.x[:30].reshape(30, 64).double()
        x = x - x.mean(1, keepdim=True)
        x = x / x.norm(dim=1, keepdim=True)
        # rows are centred and unit norm: the dot product is the correlation
        corr = x @ raw.T
        best = corr.argmax(1)
        assert (corr.max(1).values > 1 - 1e-6).all()
        assert (torch.from_numpy(d.target)[best] == split.y[:30] + offset).all()


@needs_fmnist
def test_fmnist(fmnist):
    check_splits(fmnist, (1, 28, 28), 5, 5)
    assert [len(getattr(fmnist, k)) for k in SPLITS] == [27_000, 3_000, 5_000, 27_000, 3_000, 5_000]
    assert fmnist.old_val.y.bincount().tolist() == [600] * 5  # stratified: 10% of each class's 6000
    # independent reader: the fixed offsets of the dataset's own utils/mnist_reader.py
    with gzip.open(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(FMNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    assert np.array_equal(read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz"), images)
    assert torch.equal(fmnist.new_test.y, torch.from_numpy(labels[labels >= 5].astype(np.int64) - 5))
    new_imgs = torch.from_numpy(images[labels >= 5].astype(np.float32) / 255)
    train_labels = read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz")
    old_all = read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")[train_labels < 5]
    (old_train, _), _ = carve_val(old_all, train_labels[train_labels < 5].astype(np.int64), seed=0)  # minus val
    mean, std = old_train.astype(np.float64).mean() / 255, old_train.astype(np.float64).std() / 255
    assert torch.allclose(fmnist.new_test.x[:, 0], (new_imgs - mean) / std, atol=1e-4)
    assert fmnist.image


def test_fmnist_missing_files(tmp_path, monkeypatch):
    import profit_bench.tasks as tasks
    monkeypatch.setattr(tasks, "FMNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        get_task("fmnist")


def test_fmnist_empty_data_dir_never_falls_back_to_the_system_copy(tmp_path):
    with pytest.raises(UserError, match=f"no Fashion-MNIST files in {tmp_path}"):
        get_task("fmnist", data_dir=tmp_path)


def _idx_files(folder, n=20):
    """Four tiny valid IDX files (gzipped) with n images of 28×28 and n labels 0..9."""
    rng = np.random.default_rng(0)
    parts = {"train-images-idx3-ubyte": (3, [n, 28, 28]), "t10k-images-idx3-ubyte": (3, [n, 28, 28]),
             "train-labels-idx1-ubyte": (1, [n]), "t10k-labels-idx1-ubyte": (1, [n])}
    for name, (ndim, shape) in parts.items():
        data = (np.arange(n) % 10).astype(np.uint8) if ndim == 1 else rng.integers(0, 256, shape, dtype=np.uint8)
        header = bytes([0, 0, 8, ndim]) + np.asarray(shape, ">i4").tobytes()
        with gzip.open(folder / f"{name}.gz", "wb") as f:
            f.write(header + data.tobytes())


@pytest.mark.parametrize("damage", ["truncate_gzip", "short_data"])
def test_corrupt_fmnist_file_is_named(tmp_path, damage):
    _idx_files(tmp_path)
    assert len(get_task("fmnist", data_dir=tmp_path).old_train) > 0  # the intact files load
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncate_gzip":
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        with gzip.open(bad, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + np.asarray([20, 28, 28], ">i4").tobytes() + b"\0" * 100)
    with pytest.raises(UserError, match=str(bad)):
        get_task("fmnist", data_dir=tmp_path)


def test_corrupt_cifar_file_is_named(tmp_path):
    import shutil
    from cifar_fixture import write_fake_cifar
    root = write_fake_cifar(tmp_path, n_train=20, n_test=10)
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(UserError, match=f"{bad} is corrupt"):
        get_task("cifar", data_dir=root)
    shutil.rmtree(root)


def test_cifar(cifar, fake_cifar_dir):
    import pickle
    check_splits(cifar, (3, 32, 32), 10, 100)
    # 10% of train, at least one per class: CIFAR-10 20 (2 per class), CIFAR-100 100 (1 per class)
    assert [len(getattr(cifar, k)) for k in SPLITS] == [180, 20, 100, 100, 100, 100]
    assert cifar.old_val.y.bincount().tolist() == [2] * 10 and cifar.new_val.y.bincount().tolist() == [1] * 100
    with open(fake_cifar_dir / "cifar-100-python" / "test", "rb") as f:
        fine = pickle.load(f, encoding="bytes")[b"fine_labels"]
    assert cifar.new_test.y.tolist() == fine  # CIFAR-100 fine labels kept as 0..99
    batches = []
    for i in range(1, 6):
        with open(fake_cifar_dir / "cifar-10-batches-py" / f"data_batch_{i}", "rb") as f:
            batches.append(pickle.load(f, encoding="bytes")[b"data"])
    raw = torch.from_numpy(np.concatenate(batches)).double().reshape(-1, 3, 32, 32) / 255
    # old_train ∪ old_val is the whole of CIFAR-10 train, standardised with old_train's statistics: undo the
    # per-channel affine map (fitted from the union's moments, which equal raw's) and match rows exactly.
    both = torch.cat([cifar.old_train.x, cifar.old_val.x]).double()
    dims = (0, 2, 3)
    scale = raw.std(dims, keepdim=True) / both.std(dims, keepdim=True)
    shift = raw.mean(dims, keepdim=True) - scale * both.mean(dims, keepdim=True)
    restored = both * scale + shift
    def as_bytes(t):
        return sorted(r.numpy().tobytes() for r in (t * 255).round().to(torch.uint8).reshape(len(t), -1))
    assert torch.allclose(restored * 255, (restored * 255).round(), atol=1e-3)  # whole pixel values again
    assert as_bytes(restored) == as_bytes(raw)
    train_raw = cifar.old_train.x.double() * scale + shift
    assert torch.allclose(shift, train_raw.mean(dims, keepdim=True), atol=1e-5)  # the stats are old_train's
    assert cifar.image and cifar.metric == "accuracy"


def test_cifar_missing_dir(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py") as e:
        get_task("cifar", data_dir=tmp_path / "empty")
    assert "download=True" in str(e.value) and "\n" not in str(e.value)


def test_unknown_task_names_every_registered_one():
    with pytest.raises(UserError, match="imagenet") as e:
        get_task("imagenet")
    assert all(name in str(e.value) for name in TASKS) and "\n" not in str(e.value)


def test_limit_and_device_arguments(fake_cifar_dir):
    t = get_task("cifar", data_dir=fake_cifar_dir, limit=50, device="cpu")
    assert [len(getattr(t, s)) for s in SPLITS] == [50, 20, 50, 50, 50, 50] and t.device.type == "cpu"
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="limit must be a whole number >= 1"):
            get_task("toy", limit=bad)


# ------------------------------------------------------------------------------------------------ augmentation

def test_augment_shape_determinism_and_crop(cifar):
    x = cifar.old_train.x[:16]
    a = cifar.augment(x, torch.Generator().manual_seed(3))
    b = cifar.augment(x, torch.Generator().manual_seed(3))
    c = cifar.augment(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b) and not torch.equal(a, c)
    # every output is a 32×32 window of the reflect-padded input, possibly mirrored
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(a[i], w) for w in windows)


def test_flip_really_flips():
    x = torch.randn(64, 3, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=0)  # no crop: only flips remain
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ same).all() and 16 < flipped.sum() < 48


def test_no_augmentation_for_non_image_tasks(toy, digits):
    g = torch.Generator().manual_seed(0)
    assert torch.equal(toy.augment(toy.old_train.x[:8], g), toy.old_train.x[:8])
    assert torch.equal(digits.augment(digits.old_train.x[:8], g), digits.old_train.x[:8])


# ------------------------------------------------------------------------------------------------ models

def mlp_param_count(d_in=2, w=500, n_out=1):
    return (d_in * w + w) + 2 * w + (w * w + w) + 2 * w + (w * n_out + n_out)


def test_mlp_is_the_papers_mlp(toy):
    model = build_model("mlp", toy, seed=0)
    assert sum(p.numel() for p in model.parameters()) == mlp_param_count()
    assert model.heads["new"] is model.heads["old"] and model.feat_dim == 500
    layers = [type(m) for m in model.backbone]
    assert layers == [nn.Flatten, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear, nn.LayerNorm, nn.ReLU]
    x = toy.old_test.x[:5]
    assert model(x).shape == (5, 1) and torch.equal(model(x, task="new"), model(x))


def test_mlp_digits_heads(digits):
    model = build_model("mlp", digits, seed=0)
    assert model.heads["new"] is not model.heads["old"]
    assert sum(p.numel() for p in model.parameters()) == mlp_param_count(64, n_out=5) + 500 * 5 + 5


def test_build_is_seeded_and_leaves_global_rng(toy):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_model("mlp", toy, seed=1), build_model("mlp", toy, seed=1), build_model("mlp", toy, seed=2)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.backbone[1].weight, c.backbone[1].weight)


def test_resnet18_cifar_stem(cifar):
    model = build_model("resnet18", cifar, seed=0)
    conv1 = model.backbone.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.in_channels == 3
    assert isinstance(model.backbone.maxpool, nn.Identity)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.feat_dim == 512


@pytest.mark.parametrize("name,width", [("vit_tiny", 192), ("vit_small", 384)])
def test_vit_patches(cifar, name, width):
    model = build_model(name, cifar, seed=0)
    vit = model.backbone.net
    assert vit.patch_embed.patch_size == (4, 4) and vit.patch_embed.num_patches == 64
    tokens = vit.patch_embed(torch.zeros(1, 3, 32, 32))
    assert tokens.shape == (1, 64, width) and model.feat_dim == width


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("task_name", ["toy", "digits", "fmnist", "cifar"])
def test_forward_shapes(request, model_name, task_name):
    if task_name == "toy" and model_name != "mlp":
        with pytest.raises(UserError, match="mlp"):
            build_model(model_name, request.getfixturevalue("toy"), seed=0)
        return
    task = request.getfixturevalue(task_name)
    model = build_model(model_name, task, seed=0)
    assert isinstance(model, TaskModel) and isinstance(model.heads, nn.ModuleDict)
    x = task.old_test.x[:2]
    with torch.no_grad():
        feats = model.backbone(x)
        assert feats.shape == (2, model.feat_dim)
        assert model(x, task="old").shape == (2, task.n_old)
        assert model(x, task="new").shape == (2, task.n_new)


def test_unknown_model(toy):
    with pytest.raises(UserError, match="vit_small"):
        build_model("resnet50", toy, seed=0)


def test_vit_pads_small_inputs_centered(digits):
    model = build_model("vit_tiny", digits, seed=0)
    seen = {}
    model.backbone.net.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.randn(1, 1, 8, 8)
    model.backbone(x)
    padded = seen["x"]
    assert padded.shape == (1, 1, 32, 32) and torch.equal(padded[..., 12:20, 12:20], x)
    border = padded.clone()
    border[..., 12:20, 12:20] = 0
    assert not border.any()  # zeros everywhere else


# ------------------------------------------------------------------------------------------------ evaluate

def test_evaluate_classification(digits):
    n = len(digits.old_test)
    logits = torch.randn(n, 5, generator=torch.Generator().manual_seed(0))

    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            self.i, self.bn = 0, nn.BatchNorm1d(1)

        def forward(self, x, task="old"):
            assert not self.training and task == "old"
            out = logits[self.i:self.i + len(x)]
            self.i += len(x)
            return out

    model = Batched()
    model.bn.eval()  # a submodule deliberately in eval mode must stay so
    acc, loss = evaluate(model, digits, "old_test", batch_size=7)
    y = digits.old_test.y
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert model.training and not model.bn.training


def test_evaluate_regression(toy):
    model = build_model("mlp", toy, seed=0)
    model.train()
    mse, loss = evaluate(model, toy, "new_test", batch_size=999)
    with torch.no_grad():
        model.eval()
        expected = nn.functional.mse_loss(model(toy.new_test.x), toy.new_test.y).item()
    assert mse == loss == pytest.approx(expected, rel=1e-5)
    # the noise-free zero predictor scores E[sin²(10‖x‖)], about 0.5
    zero = TaskModel(nn.Flatten(), 2, 1, 1, shared_head=True)
    nn.init.zeros_(zero.heads["old"].weight), nn.init.zeros_(zero.heads["old"].bias)
    assert evaluate(zero, toy, "old_test")[0] == pytest.approx((toy.old_test.y ** 2).mean().item(), rel=1e-5)
    assert evaluate(zero, toy, "old_val")[0] == pytest.approx((toy.old_val.y ** 2).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate(zero, toy, "old")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_data_augment_and_evaluate(fake_cifar_dir):
    task = get_task("cifar", data_dir=fake_cifar_dir, device="cuda")
    assert task.old_train.x.is_cuda and task.new_test.y.is_cuda
    x = task.old_train.x[:32]
    # a CPU generator gives the same crops/flips on either device
    on_gpu = task.augment(x, torch.Generator().manual_seed(0))
    on_cpu = task.augment(x.cpu(), torch.Generator().manual_seed(0))
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)
    cuda_gen = task.augment(x, torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(cuda_gen, task.augment(x, torch.Generator(device="cuda").manual_seed(0)))
    model = build_model("resnet18", task, seed=0)
    assert next(model.parameters()).is_cuda
    acc, loss = evaluate(model, task, "new_test", batch_size=64)
    assert 0 <= acc <= 1 and loss > 0


# ------------------------------------------------------------------------------------------------ validation splits

def _rows(split) -> set[bytes]:
    return {r.numpy().tobytes() for r in split.x.reshape(len(split), -1)}


@pytest.mark.parametrize("task_name", ["toy", "digits", "cifar"])
def test_val_disjoint_from_train_and_test(request, task_name):
    task = request.getfixturevalue(task_name)
    for head in ("old", "new"):
        train, val, test = (_rows(getattr(task, f"{head}_{s}")) for s in ("train", "val", "test"))
        assert len(val) == len(getattr(task, f"{head}_val")) > 0  # no duplicate rows hide an overlap
        assert not (val & train) and not (val & test) and not (train & test)


def test_val_seeded_by_the_data_seed(digits):
    again, other = get_task("digits", seed=0), get_task("digits", seed=1)
    assert torch.equal(again.old_val.x, digits.old_val.x)
    assert _rows(other.old_val) != _rows(digits.old_val)


def test_carve_val_is_a_stratified_partition():
    x = np.arange(200)[:, None]                   # row i is example i
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    (xt, yt), (xv, yv) = carve_val(x, y, seed=0, fraction=0.1)
    assert sorted(np.concatenate([xt, xv])[:, 0].tolist()) == list(range(200))  # disjoint, nothing lost
    assert np.array_equal(y[xv[:, 0]], yv) and np.bincount(yv).tolist() == [10, 5, 3, 2]
    (_, _), (_, yv1) = carve_val(np.arange(12)[:, None], np.arange(12) % 6, seed=0, fraction=0.1)
    assert sorted(yv1.tolist()) == list(range(6))  # at least one example of every class


# ------------------------------------------------------------------------------------------------ small models

def test_resnet_small_is_resnet20(cifar):
    from timm.models.resnet import BasicBlock
    model = build_model("resnet_small", cifar, seed=0)
    blocks = [m for m in model.backbone.modules() if isinstance(m, BasicBlock)]
    assert [b.conv1.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert sum(p.numel() for p in model.backbone.parameters()) == 271_824  # ResNet-20 (1×1 projections): 0.27M
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and model.feat_dim == 64


def test_vit_micro(cifar):
    from timm.models.vision_transformer import VisionTransformer
    vit = build_model("vit_micro", cifar, seed=0).backbone.net
    assert isinstance(vit, VisionTransformer) and vit.patch_embed.patch_size == (4, 4)
    assert (vit.embed_dim, len(vit.blocks)) == (128, 4)


def test_channels_last_rule():
    assert uses_channels_last("resnet_small", "cuda") and uses_channels_last("resnet18", "cuda:0")
    assert not uses_channels_last("resnet18", "cpu") and not uses_channels_last("vit_micro", "cuda")


# ------------------------------------------------------------------------------------------------ C.1 readings

@pytest.mark.parametrize("activation, act_type", [("relu", nn.ReLU), ("tanh", nn.Tanh), ("gelu", nn.GELU)])
@pytest.mark.parametrize("layernorm, order", [
    ("before_act", ["Linear", "LayerNorm", "act"]), ("after_act", ["Linear", "act", "LayerNorm"]),
    ("none", ["Linear", "act"])])
def test_mlp_activation_and_layernorm_readings(toy, activation, act_type, layernorm, order):
    model = build_model("mlp", toy, seed=0, mlp=dict(activation=activation, layernorm=layernorm))
    names = ["act" if type(m) is act_type else type(m).__name__ for m in model.backbone]
    assert names == ["Flatten"] + order + order  # the head (last Linear) never gets a norm or an activation
    ln_params = 0 if layernorm == "none" else 2 * 2 * 500
    assert sum(p.numel() for p in model.parameters()) == mlp_param_count() - 2 * 2 * 500 + ln_params
    assert model(toy.old_test.x[:3]).shape == (3, 1)


def test_mlp_readings_share_the_linear_init_and_other_models_refuse_them(toy, digits):
    a = build_model("mlp", toy, seed=3)
    b = build_model("mlp", toy, seed=3, mlp=dict(activation="tanh", layernorm="after_act"))
    lin = lambda m: [x.weight for x in m.backbone if isinstance(x, nn.Linear)]  # noqa: E731
    assert all(torch.equal(p, q) for p, q in zip(lin(a), lin(b)))  # only the module order differs
    assert [type(m) for m in a.backbone] == [nn.Flatten, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear,
                                             nn.LayerNorm, nn.ReLU]  # the default is the original reading
    with pytest.raises(UserError, match="only the mlp"):
        build_model("resnet18", digits, seed=0, mlp=dict(activation="tanh"))
    with pytest.raises(UserError, match="unknown activation"):
        build_model("mlp", toy, seed=0, mlp=dict(activation="swish"))
