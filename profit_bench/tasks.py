"""Task registry: `TASKS[name]` is one `TaskSpec` (data builder, fine-tune and pretraining defaults, titles).

Every task has six splits: old_train, old_val, old_test, new_train, new_val, new_test. The validation splits are
carved from the training data (seeded by the data seed, disjoint from train and test, stratified by class), so
anything that chooses hyperparameters reads validation and the test splits stay untouched until the end.

All data lives on the training device as tensors. Image augmentation (random crop + flip) runs there in
batches instead of a per-sample DataLoader, which is what lets a CIFAR epoch take about a second on a GPU
(the airbench recipe).
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import os
import pickle
import shutil
import socket
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from profit_bench import UserError, default_cache_dir

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts it
FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}
CIFAR_DOWNLOAD = ('python -c "import torchvision; torchvision.datasets.CIFAR10(\'DIR\', download=True); '
                  'torchvision.datasets.CIFAR100(\'DIR\', download=True)"')
CROP_PAD = 4
CIFAR_URL_ENV = "PROFIT_BENCH_CIFAR_URL"  # a mirror (base URL) holding the two archives under their own names


@dataclass(frozen=True)
class CifarArchive:
    """One of torchvision's CIFAR archives (url, filename, tgz_md5 and base_folder of torchvision.datasets.CIFAR10 /
    CIFAR100; tests/test_frameworks.py checks they agree) and the files make_cifar reads from it."""
    name: str
    folder: str
    filename: str
    url: str
    md5: str
    size: int  # bytes of the archive, for --dry-run
    files: tuple[str, ...]


CIFAR_ARCHIVES = (
    CifarArchive("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                 "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                 170498071, tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)),
    CifarArchive("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 169001437, ("train", "test")),
)


SPLITS = ("old_train", "old_val", "old_test", "new_train", "new_val", "new_test")
VAL_FRACTION = 0.1      # of each image task's training data, held out for validation
TOY_VAL_SIZE = 1000     # toy: validation points per task, drawn like the test points


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
    old_val: Split
    old_test: Split
    new_train: Split
    new_val: Split
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

    def chance(self, head: str) -> float | None:
        """Accuracy of a uniform guess on that task (None for regression)."""
        return 1.0 / (self.n_old if head == "old" else self.n_new) if self.kind == "classification" else None

    @property
    def device(self) -> torch.device:
        return self.old_train.x.device

    def to(self, device) -> TaskData:
        return replace(self, **{k: Split(getattr(self, k).x.to(device), getattr(self, k).y.to(device))
                                for k in SPLITS})


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


def carve_val(x: np.ndarray, y: np.ndarray, seed: int, fraction: float = VAL_FRACTION):
    """((x_train, y_train), (x_val, y_val)): `fraction` of the training data held out, stratified by class.

    At least one example per class goes to validation when the data allows it; a class with a single example
    (tiny test fixtures) makes stratification impossible, and then the split is a plain random one.
    """
    from sklearn.model_selection import train_test_split
    counts = np.bincount(y)
    n_classes = int((counts > 0).sum())
    n_val = max(int(round(fraction * len(y))), n_classes)
    stratify = y if counts[counts > 0].min() >= 2 and len(y) - n_val >= n_classes else None
    xtr, xva, ytr, yva = train_test_split(x, y, test_size=n_val, stratify=stratify, random_state=seed)
    return (xtr, ytr), (xva, yva)


def _standardize(splits: list[np.ndarray], ref: np.ndarray) -> list[Tensor]:
    """Per-channel mean/std of the old-train split `ref` [N,C,H,W], applied to every split (no peeking at new)."""
    mean = ref.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    std = ref.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    return [torch.from_numpy((s.astype(np.float32) - mean) / std) for s in splits]


def _image_task(name, old_train, old_test, new_train, new_test, n_old, n_new, seed, augment=True,
                val_fraction=VAL_FRACTION) -> TaskData:
    """Each argument split is an (x [N,C,H,W], int labels) pair; validation is carved from the two train splits."""
    old_train, old_val = carve_val(*old_train, seed, val_fraction)
    new_train, new_val = carve_val(*new_train, seed, val_fraction)
    pairs = [old_train, old_val, old_test, new_train, new_val, new_test]
    xs = _standardize([x for x, _ in pairs], ref=old_train[0])
    splits = [Split(x, torch.as_tensor(y, dtype=torch.int64)) for x, (_, y) in zip(xs, pairs)]
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
    """Paper §4.1 / C.1: f(x) = sin(10‖x‖); old x ~ U[-1,1]², new x ~ U[0.8,1.5]²; N(0,1) noise on train only.

    Validation points come from the same input distributions on their own random streams and, like the test
    points, without label noise: noisy targets would add ≈1 to every MSE and bury the differences selection
    must see.
    """
    old, new = (-1.0, 1.0), (0.8, 1.5)
    splits = [toy_sine(50_000, *old, True, _rng(seed, 0)), toy_sine(TOY_VAL_SIZE, *old, False, _rng(seed, 4)),
              toy_sine(10_000, *old, False, _rng(seed, 1)),
              toy_sine(50_000, *new, True, _rng(seed, 2)), toy_sine(TOY_VAL_SIZE, *new, False, _rng(seed, 5)),
              toy_sine(10_000, *new, False, _rng(seed, 3))]
    return TaskData("toy", "regression", *splits, in_shape=(2,), n_old=1, n_new=1, metric="mse",
                    higher_is_better=False, image=False)


def make_digits(*, data_dir=None, seed=0) -> TaskData:
    """sklearn 8×8 digits (bundled, offline): old = 0–4, new = 5–9. Fast CPU task for CI.

    Not augmented (image=False): a flip changes a digit's identity and a 4-pixel crop drops half of an 8×8 image.
    Validation is 20% of train (not 10%): the set is so small that 10% would leave ~13 images per class.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = d.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.25, stratify=d.target, random_state=seed)
    (otr, ntr), (ote, nte) = _split_by_class(xtr, ytr, range(5), range(5, 10)), \
        _split_by_class(xte, yte, range(5), range(5, 10))
    return _image_task("digits", otr, ote, ntr, nte, 5, 5, seed, augment=False, val_fraction=0.2)


def read_idx(path: Path) -> np.ndarray:
    """IDX format (MNIST family): 2 zero bytes, dtype code 0x08 (=uint8), ndim, ndim big-endian int32 sizes, data."""
    try:
        raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    except (OSError, EOFError) as e:  # truncated or not gzip at all
        raise UserError(f"{path} cannot be read ({e}); re-download it") from None
    if raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * raw[3]:
        raise UserError(f"{path} is not an uint8 IDX file (bad header {raw[:4]!r}); re-download it")
    ndim = raw[3]
    shape = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated or corrupt ({data.size} bytes of data, header says "
                        f"{'×'.join(map(str, shape))}); re-download it")
    return data.reshape(shape)


def _find_fmnist(data_dir) -> dict[str, Path]:
    """The four IDX files: under --data-dir when it is given (never elsewhere), else the system copy."""
    dirs = [FMNIST_DIR] if data_dir is None else [Path(data_dir), Path(data_dir) / "fashion-mnist",
                                                    Path(data_dir) / "FashionMNIST" / "raw"]
    for d in dirs:
        for ext in (".gz", ""):
            paths = {k: d / (f + ext) for k, f in FMNIST_FILES.items()}
            if all(p.is_file() for p in paths.values()):
                return paths
    names = ", ".join(f + ".gz" for f in FMNIST_FILES.values())
    if data_dir is not None:
        raise UserError(f"no Fashion-MNIST files in {data_dir} (looked in {', '.join(map(str, dirs))}): put {names} "
                        f"there, or drop --data-dir to use the system copy in {FMNIST_DIR}")
    raise UserError(f"Fashion-MNIST not found in {FMNIST_DIR}: run `apt-get install dataset-fashion-mnist`, "
                    f"or put {names} into a folder and pass it as --data-dir")


@functools.lru_cache(maxsize=2)
def _fmnist_arrays(files: tuple[tuple[str, Path, int, int], ...]) -> dict[str, np.ndarray]:
    # Seconds of gunzip per call: a reused Ray actor runs many trials, each building the task again. Keyed by
    # (path, size, mtime) so a file replaced on disk is read again.
    return {k: read_idx(v) for k, v, _, _ in files}


def make_fmnist(*, data_dir=None, seed=0) -> TaskData:
    """Fashion-MNIST: old = classes 0–4, new = 5–9 (re-indexed 0–4); the official test split, val from train."""
    p = _find_fmnist(data_dir)
    arr = _fmnist_arrays(tuple((k, v, v.stat().st_size, v.stat().st_mtime_ns) for k, v in sorted(p.items())))
    for part in ("train", "test"):
        if len(arr[f"{part}_x"]) != len(arr[f"{part}_y"]):
            raise UserError(f"{p[part + '_x']} and {p[part + '_y']} disagree on the number of examples; re-download")
    old, new = range(5), range(5, 10)
    tr = _split_by_class(arr["train_x"][:, None].astype(np.float32) / 255, arr["train_y"].astype(np.int64), old, new)
    te = _split_by_class(arr["test_x"][:, None].astype(np.float32) / 255, arr["test_y"].astype(np.int64), old, new)
    return _image_task("fmnist", tr[0], te[0], tr[1], te[1], 5, 5, seed)


def _unpickle(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,3,32,32] in [0,1], labels) of one CIFAR pickle; a damaged file is a UserError naming it."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).astype(np.float32) / 255
        y = np.asarray(d[label_key], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 — unpickling a damaged file can raise almost anything
        raise UserError(f"{path} is corrupt ({type(e).__name__}: {e}); re-download the CIFAR data") from None
    if len(x) != len(y):
        raise UserError(f"{path} is corrupt ({len(x)} images, {len(y)} labels); re-download the CIFAR data")
    return x, y


def _cifar_arrays(batches: list[Path], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    parts = [_unpickle(p, label_key) for p in batches]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def default_data_dir() -> Path:
    """Where datasets go without --data-dir: data/ under the pretrained-model cache ($PROFIT_BENCH_CACHE or
    ~/.cache/profit_bench)."""
    return default_cache_dir() / "data"


def cifar_url(archive: CifarArchive) -> str:
    base = os.environ.get(CIFAR_URL_ENV)
    return f"{base.rstrip('/')}/{archive.filename}" if base else archive.url


def cifar_missing(root: Path) -> list[CifarArchive]:
    return [a for a in CIFAR_ARCHIVES if not all((root / a.folder / f).is_file() for f in a.files)]


def describe_task_data(task: str, data_dir=None) -> list[str]:
    """--dry-run: what of the task's data is present and what a run would download (nothing is touched)."""
    if task != "cifar":
        return []
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    missing = cifar_missing(root)
    lines = [f"data {root}: {a.name} " + (f"missing, would download {cifar_url(a)} ({a.size / 2 ** 20:.0f} MiB, "
                                          f"md5 {a.md5})" if a in missing else f"present ({a.folder}/)")
             for a in CIFAR_ARCHIVES]
    return lines


def ensure_task_data(task: str, data_dir=None) -> None:
    """Download what the task needs and is missing (CIFAR-10/100 through torchvision); the other tasks' data is
    generated or comes from Debian. The CLIs call this once before training, on the driver."""
    if task != "cifar":
        return
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    for archive in cifar_missing(root):
        _download_cifar(archive, root)


def _download_cifar(a: CifarArchive, root: Path) -> None:
    """torchvision's download_and_extract_archive (progress bar, md5 check) into a temporary folder inside `root`,
    then one rename: the data folder appears complete or not at all, and a failure leaves nothing behind."""
    from torchvision.datasets.utils import download_and_extract_archive
    if (root / a.folder).exists():
        absent = [f for f in a.files if not (root / a.folder / f).is_file()]
        raise UserError(f"{root / a.folder} is incomplete (no {', '.join(absent)}); remove it to download "
                        f"{a.name} again")
    url = cifar_url(a)
    created = next((d for d in reversed([root, *root.parents]) if not d.exists()), None)  # removed on failure
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{a.folder}.", dir=root))
    except OSError as e:
        raise UserError(f"cannot write the CIFAR data folder {root}: {e.strerror or e}; pass a writable --data-dir")
    timeout, done = socket.getdefaulttimeout(), False
    try:
        socket.setdefaulttimeout(60)  # torchvision's urlopen has none: a dead link must not hang the sweep
        # Reach the server first, so that without network the error is the only line printed.
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD")).close()
        print(f"downloading {a.name} ({a.size / 2 ** 20:.0f} MiB) from {url} into {root}", file=sys.stderr,
              flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # older torchvision prints "Downloading ...": off the JSON stdout
            download_and_extract_archive(url, str(tmp), filename=a.filename, md5=a.md5, remove_finished=True)
        absent = [f for f in a.files if not (tmp / a.folder / f).is_file()]
        if absent:
            raise RuntimeError(f"the archive holds no {a.folder}/{absent[0]}")
        if not (root / a.folder).exists():  # another process may have finished the same download meanwhile
            os.replace(tmp / a.folder, root / a.folder)
        done = True
    except Exception as e:  # noqa: BLE001 — network, HTTP, checksum, tar and disk errors all end the same way
        reason = "checksum (md5) mismatch" if "corrupted" in str(e) else (str(e).strip() or type(e).__name__)
        raise UserError(f"CIFAR data missing under {root} and could not download {a.name} from {url} ({reason}); "
                        f"nothing was written. Set {CIFAR_URL_ENV} to a mirror, or download it where there is "
                        f"internet: {CIFAR_DOWNLOAD.replace('DIR', str(root))}") from None
    finally:  # also on Ctrl-C
        socket.setdefaulttimeout(timeout)
        shutil.rmtree(tmp if done or created is None else created, ignore_errors=True)


def make_cifar(*, data_dir=None, seed=0) -> TaskData:
    """Paper §4.2: old = CIFAR-10, new = CIFAR-100 (fine labels 0–99).

    Reads the python-pickle layout torchvision downloads. We unpickle it ourselves (the same way torchvision
    does) because torchvision's loader insists on the md5 of the official files, which generated test data fails.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    c10, c100 = root / "cifar-10-batches-py", root / "cifar-100-python"
    need = [c10 / f"data_batch_{i}" for i in range(1, 6)] + [c10 / "test_batch", c100 / "train", c100 / "test"]
    missing = [str(p.relative_to(root)) for p in need if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"CIFAR data missing under {root}/ (no {shown}); expected folders cifar-10-batches-py/ and "
                        f"cifar-100-python/ there. `python -m profit_bench.sweep cifar` and `python -m "
                        f"profit_bench.trial --task cifar` download them; or on a machine with internet: "
                        f"{CIFAR_DOWNLOAD.replace('DIR', str(root))} and pass --data-dir {root}")
    otr = _cifar_arrays(need[:5], b"labels")
    ote = _cifar_arrays([c10 / "test_batch"], b"labels")
    ntr = _cifar_arrays([c100 / "train"], b"fine_labels")
    nte = _cifar_arrays([c100 / "test"], b"fine_labels")
    return _image_task("cifar", otr, ote, ntr, nte, 10, 100, seed)


# ---------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class TaskSpec:
    """Everything the project knows about one task. `finetune` holds TrialConfig defaults, `pretrain` the
    PretrainConfig defaults; `paper_dataset` is the paper's data set this task reproduces (None: not in the
    paper, a stand-in)."""
    name: str
    build: Callable[..., TaskData]   # build(data_dir=..., seed=...) -> TaskData (on the CPU)
    finetune: dict
    pretrain: dict
    title: str
    paper_dataset: str | None
    default_model: str


# Fine-tuning: toy = paper C.1: RMSProp 5e-4, ×0.95 every 100 steps, 1500 steps, batch 32 (the paper does not give
# the batch size; 32 does not reproduce its baseline rows: results.md). Images = C.2.5's Adam 1e-4, CPU epochs. digits is not
# in the paper: a tiny offline CI task; its numbers are sized so a trial takes seconds on one CPU core.
# Pretraining: toy = C.1: RMSProp 1e-2, ×0.9 every 500 steps, 10 000 steps, batch 32. Images = C.2.5: Adam 1e-4
# for 200-400 epochs (CPU-sized here). digits (~720 old-train images) converges in seconds at Adam 1e-3.
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("toy", make_toy,
             finetune=dict(optimizer="rmsprop", lr=5e-4, scheduler="step", step_size=100, gamma=0.95, steps=1500,
                           batch_size=32, eval_every=100),
             pretrain=dict(optimizer="rmsprop", lr=1e-2, steps=10_000, batch_size=32, scheduler="step",
                           step_size=500, gamma=0.9),
             title="2-D toy regression sin(10|x|)", paper_dataset="2-D toy regression sin(10|x|)",
             default_model="mlp"),
    TaskSpec("digits", make_digits,
             finetune=dict(optimizer="adam", lr=1e-3, scheduler="none", epochs=20, batch_size=64),
             pretrain=dict(optimizer="adam", lr=1e-3, epochs=60, batch_size=64),
             title="sklearn digits 0–4 → 5–9", paper_dataset=None, default_model="mlp"),
    TaskSpec("fmnist", make_fmnist,
             finetune=dict(optimizer="adam", lr=1e-4, scheduler="none", epochs=10, batch_size=128),
             pretrain=dict(optimizer="adam", lr=1e-4, epochs=20, batch_size=128),
             title="Fashion-MNIST 0–4 → 5–9", paper_dataset=None, default_model="resnet18"),
    TaskSpec("cifar", make_cifar,
             finetune=dict(optimizer="adam", lr=1e-4, scheduler="none", epochs=10, batch_size=128),
             pretrain=dict(optimizer="adam", lr=1e-4, epochs=20, batch_size=128),
             title="CIFAR-10 → CIFAR-100", paper_dataset="CIFAR-10 → CIFAR-100", default_model="resnet18"),
)}


# Readings of what C.1 leaves open about the toy (activation, where "LayerNorm after every layer except the last"
# sits, the batch sizes, whether "×0.95 every 100 steps" counts batches or PROFIT's main steps): TrialConfig's
# `toy_variant` fills these knobs (knobs set explicitly win). "today" is the project's original reading; the
# readings study (sweeps/table1_regime.yaml, docs/results.md) ranks them against the paper's baseline rows.
_TODAY = dict(activation="relu", layernorm="before_act", batch_size=32, pretrain_batch_size=32,
              lr_schedule_unit="main")
TOY_VARIANTS: dict[str, dict] = {
    "today": _TODAY,
    "ln_after": {**_TODAY, "layernorm": "after_act"},
    "no_ln": {**_TODAY, "layernorm": "none"},
    "tanh": {**_TODAY, "activation": "tanh"},
    "tanh_ln_after": {**_TODAY, "activation": "tanh", "layernorm": "after_act"},
    "gelu": {**_TODAY, "activation": "gelu"},
    "gelu_ln_after": {**_TODAY, "activation": "gelu", "layernorm": "after_act"},
    "batch_8": {**_TODAY, "batch_size": 8, "pretrain_batch_size": 8},
    "batch_256": {**_TODAY, "batch_size": 256, "pretrain_batch_size": 256},
    "decay_per_batch": {**_TODAY, "lr_schedule_unit": "batch"},
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _subsample(s: Split, limit: int, rng: np.random.Generator) -> Split:
    if len(s) <= limit:
        return s
    idx = torch.from_numpy(np.sort(rng.choice(len(s), size=limit, replace=False)))
    return Split(s.x[idx], s.y[idx])


def get_task(name: str, *, data_dir=None, device="cpu", seed=0, limit: int | None = None) -> TaskData:
    """Build task `name` on `device`. `seed` drives data generation/splits; `limit` subsamples every split."""
    spec = task_spec(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a whole number >= 1 (got {limit!r}); leave it unset for the full data")
    task = spec.build(data_dir=data_dir, seed=seed)
    if limit is not None:
        rng = _rng(seed, 100)
        task = replace(task, **{k: _subsample(getattr(task, k), limit, rng) for k in SPLITS})
    return task.to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: TaskData, split: str, batch_size: int | None = None) -> tuple[float, float]:
    """(metric, mean loss) of `model(x, task=head)` on `split` ("old_val", "new_test", ...; head = its prefix).

    Classification: (accuracy in [0, 1], cross-entropy); regression: (MSE, MSE).
    Eval mode while measuring; each module's own train/eval flag is restored afterwards (so e.g. a frozen
    BatchNorm kept in eval mode by a method stays that way).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    head, data = split.split("_")[0], getattr(task, split)
    if batch_size is None:  # CPU: large batches spill the caches (1024 is ~2.4x slower per image than 256)
        batch_size = 1024 if data.x.device.type == "cuda" else 256
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        loss_sum, correct = 0.0, 0
        for i in range(0, len(data), batch_size):
            x, y = data.x[i:i + batch_size], data.y[i:i + batch_size]
            out = model(x, task=head).float()
            if task.kind == "classification":
                loss_sum += F.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
            else:
                loss_sum += F.mse_loss(out, y, reduction="sum").item()
    finally:
        for m, mode in modes:
            m.training = mode
    n = data.y.numel()
    loss = loss_sum / n
    return (correct / n if task.kind == "classification" else loss), loss
