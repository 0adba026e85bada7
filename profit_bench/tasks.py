"""Task registry: each task yields old-train/old-test/new-train/new-test tensors and its metric.

All data lives on the training device as tensors. Image augmentation (random crop + flip) runs there in
batches instead of a per-sample DataLoader, which is what lets a CIFAR epoch take about a second on a GPU
(the airbench recipe).
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from profit_bench import UserError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts it
FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}
CIFAR_DOWNLOAD = ('python -c "import torchvision; torchvision.datasets.CIFAR10(\'DIR\', download=True); '
                  'torchvision.datasets.CIFAR100(\'DIR\', download=True)"')
CROP_PAD = 4


@dataclass
class Split:
    x: Tensor
    y: Tensor  # classification: int64 [N]; regression: float32 [N, 1] (same shape as the head's output)

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class TaskData:
    name: str
    kind: str  # "regression" | "classification"
    old_train: Split
    old_test: Split
    new_train: Split
    new_test: Split
    in_shape: tuple[int, ...]
    n_old: int
    n_new: int
    metric: str  # "mse" | "accuracy"
    higher_is_better: bool
    image: bool  # True -> augment() does random crop + flip

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return random_crop_flip(x, generator) if self.image else x

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        """Mean training loss: cross-entropy for classification, MSE for regression."""
        return F.cross_entropy(out, y) if self.kind == "classification" else F.mse_loss(out, y)

    @property
    def device(self) -> torch.device:
        return self.old_train.x.device

    def to(self, device) -> TaskData:
        move = lambda s: Split(s.x.to(device), s.y.to(device))  # noqa: E731
        return replace(self, old_train=move(self.old_train), old_test=move(self.old_test),
                       new_train=move(self.new_train), new_test=move(self.new_test))


# ---------------------------------------------------------------------------------------------- augmentation

def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = CROP_PAD) -> Tensor:
    """Random crop after reflect-padding by `pad` pixels, then random horizontal flip, for a batch [B,C,H,W].

    Reflect (not zero) padding, as in airbench: no black borders the model could learn to key on.
    Offsets and flips are drawn from `generator` (on its own device), so a seeded generator gives the same
    batch on any device; the crop and the flip are one gather on the tensor's device.
    """
    b, _, h, w = x.shape
    gdev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
    rows = dy[:, None] + torch.arange(h, device=x.device)                     # [B, H]
    col = torch.arange(w, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - col, col)          # [B, W]; a flip reverses columns
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()                                # advanced indexing put C last


# ---------------------------------------------------------------------------------------------- helpers

def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent random stream per (seed, purpose), so e.g. test sets do not shift when train sizes change."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _standardize(splits: list[np.ndarray], ref: np.ndarray) -> list[Tensor]:
    """Per-channel mean/std of the old-train split `ref` [N,C,H,W], applied to every split (no peeking at new)."""
    mean = ref.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    std = ref.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    return [torch.from_numpy((s.astype(np.float32) - mean) / std) for s in splits]


def _image_task(name, xs, ys, n_old, n_new, augment=True) -> TaskData:
    """xs/ys: old_train, old_test, new_train, new_test as float arrays [N,C,H,W] and int labels."""
    xs = _standardize(xs, ref=xs[0])
    splits = [Split(x, torch.as_tensor(y, dtype=torch.int64)) for x, y in zip(xs, ys)]
    return TaskData(name, "classification", *splits, in_shape=tuple(xs[0].shape[1:]), n_old=n_old, n_new=n_new,
                    metric="accuracy", higher_is_better=True, image=augment)


def _split_by_class(x: np.ndarray, y: np.ndarray, old: range, new: range):
    """Old classes keep their labels; new classes are re-indexed from 0."""
    mo, mn = np.isin(y, old), np.isin(y, new)
    return (x[mo], y[mo] - old.start), (x[mn], y[mn] - new.start)


# ---------------------------------------------------------------------------------------------- tasks

def toy_sine(n: int, low: float, high: float, noise: bool, rng: np.random.Generator) -> Split:
    x = torch.from_numpy(rng.uniform(low, high, size=(n, 2)).astype(np.float32))
    y = torch.sin(10 * x.norm(dim=1, keepdim=True))
    if noise:
        y = y + torch.from_numpy(rng.standard_normal((n, 1)).astype(np.float32))
    return Split(x, y)


def make_toy(*, data_dir=None, seed=0) -> TaskData:
    """Paper §4.1 / C.1: f(x) = sin(10‖x‖); old x ~ U[-1,1]², new x ~ U[0.8,1.5]²; N(0,1) noise on train only."""
    splits = [toy_sine(50_000, -1.0, 1.0, True, _rng(seed, 0)), toy_sine(10_000, -1.0, 1.0, False, _rng(seed, 1)),
              toy_sine(50_000, 0.8, 1.5, True, _rng(seed, 2)), toy_sine(10_000, 0.8, 1.5, False, _rng(seed, 3))]
    return TaskData("toy", "regression", *splits, in_shape=(2,), n_old=1, n_new=1, metric="mse",
                    higher_is_better=False, image=False)


def make_digits(*, data_dir=None, seed=0) -> TaskData:
    """sklearn 8×8 digits (bundled, offline): old = 0–4, new = 5–9. Fast CPU task for CI.

    Not augmented (image=False): a flip changes a digit's identity and a 4-pixel crop drops half of an 8×8 image.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = d.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, stratify=d.target, random_state=seed)
    (otr, ntr), (ote, nte) = _split_by_class(xtr, ytr, range(5), range(5, 10)), \
        _split_by_class(xte, yte, range(5), range(5, 10))
    return _image_task("digits", [otr[0], ote[0], ntr[0], nte[0]], [otr[1], ote[1], ntr[1], nte[1]], 5, 5,
                       augment=False)


def read_idx(path: Path) -> np.ndarray:
    """IDX format (MNIST family): 2 zero bytes, dtype code 0x08 (=uint8), ndim, ndim big-endian int32 sizes, data."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an uint8 IDX file (bad header {raw[:4]!r}); re-download it")
    ndim = raw[3]
    shape = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_fmnist(data_dir) -> dict[str, Path]:
    dirs = [FMNIST_DIR]
    if data_dir is not None:
        d = Path(data_dir)
        dirs = [d, d / "fashion-mnist", d / "FashionMNIST" / "raw"] + dirs
    for d in dirs:
        for ext in (".gz", ""):
            paths = {k: d / (f + ext) for k, f in FMNIST_FILES.items()}
            if all(p.is_file() for p in paths.values()):
                return paths
    raise UserError(f"Fashion-MNIST not found in {', '.join(map(str, dirs))}: run `apt-get install "
                    f"dataset-fashion-mnist`, or put {', '.join(f + '.gz' for f in FMNIST_FILES.values())} "
                    f"into --data-dir")


def make_fmnist(*, data_dir=None, seed=0) -> TaskData:
    """Fashion-MNIST: old = classes 0–4, new = 5–9 (re-indexed 0–4); the official train/test split."""
    p = _find_fmnist(data_dir)
    arr = {k: read_idx(v) for k, v in p.items()}
    old, new = range(5), range(5, 10)
    tr = _split_by_class(arr["train_x"][:, None].astype(np.float32) / 255, arr["train_y"].astype(np.int64), old, new)
    te = _split_by_class(arr["test_x"][:, None].astype(np.float32) / 255, arr["test_y"].astype(np.int64), old, new)
    return _image_task("fmnist", [tr[0][0], te[0][0], tr[1][0], te[1][0]],
                       [tr[0][1], te[0][1], tr[1][1], te[1][1]], 5, 5)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_arrays(batches: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    parts = [_unpickle(p) for p in batches]
    x = np.concatenate([d[b"data"] for d in parts]).reshape(-1, 3, 32, 32).astype(np.float32) / 255
    return x, np.concatenate([np.asarray(d[label_key], dtype=np.int64) for d in parts])


def make_cifar(*, data_dir=None, seed=0) -> TaskData:
    """Paper §4.2: old = CIFAR-10, new = CIFAR-100 (fine labels 0–99).

    Reads the python-pickle layout torchvision downloads. We unpickle it ourselves (the same way torchvision
    does) because torchvision's loader insists on the md5 of the official files, which generated test data fails.
    """
    root = Path(data_dir if data_dir is not None else "data")
    c10, c100 = root / "cifar-10-batches-py", root / "cifar-100-python"
    need = [c10 / f"data_batch_{i}" for i in range(1, 6)] + [c10 / "test_batch", c100 / "train", c100 / "test"]
    missing = [str(p.relative_to(root)) for p in need if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"CIFAR data missing under {root}/ (no {shown}); expected folders cifar-10-batches-py/ and "
                        f"cifar-100-python/ there. Download them on a machine with internet: "
                        f"{CIFAR_DOWNLOAD.replace('DIR', str(root))} and pass --data-dir {root}")
    otr = _cifar_arrays(need[:5], b"labels")
    ote = _cifar_arrays([c10 / "test_batch"], b"labels")
    ntr = _cifar_arrays([c100 / "train"], b"fine_labels")
    nte = _cifar_arrays([c100 / "test"], b"fine_labels")
    return _image_task("cifar", [otr[0], ote[0], ntr[0], nte[0]], [otr[1], ote[1], ntr[1], nte[1]], 10, 100)


TASKS: dict[str, Callable[..., TaskData]] = {
    "toy": make_toy, "digits": make_digits, "fmnist": make_fmnist, "cifar": make_cifar,
}


def _subsample(s: Split, limit: int, rng: np.random.Generator) -> Split:
    if len(s) <= limit:
        return s
    idx = torch.from_numpy(np.sort(rng.choice(len(s), size=limit, replace=False)))
    return Split(s.x[idx], s.y[idx])


def get_task(name: str, *, data_dir=None, device="cpu", seed=0, limit: int | None = None) -> TaskData:
    """Build task `name` on `device`. `seed` drives data generation/splits; `limit` subsamples every split."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    task = TASKS[name](data_dir=data_dir, seed=seed)
    if limit is not None:
        rng = _rng(seed, 100)
        task = replace(task, **{k: _subsample(getattr(task, k), limit, rng)
                                for k in ("old_train", "old_test", "new_train", "new_test")})
    return task.to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: TaskData, split_name: str, batch_size: int = 1024) -> tuple[float, float]:
    """(metric, mean loss) of `model(x, task=split_name)` on that task's test split.

    Classification: (accuracy in [0, 1], cross-entropy); regression: (MSE, MSE).
    Eval mode while measuring; each module's own train/eval flag is restored afterwards (so e.g. a frozen
    BatchNorm kept in eval mode by a method stays that way).
    """
    if split_name not in ("old", "new"):
        raise ValueError(f"split_name must be 'old' or 'new', got {split_name!r}")
    split = task.old_test if split_name == "old" else task.new_test
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        loss_sum, correct = 0.0, 0
        for i in range(0, len(split), batch_size):
            x, y = split.x[i:i + batch_size], split.y[i:i + batch_size]
            out = model(x, task=split_name).float()
            if task.kind == "classification":
                loss_sum += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
            else:
                loss_sum += F.mse_loss(out, y, reduction="sum").item()
    finally:
        for m, mode in modes:
            m.training = mode
    n = split.y.numel()
    loss = loss_sum / n
    return (correct / n if task.kind == "classification" else loss), loss
