"""Tiny CIFAR-10/100 files in torchvision's python-pickle layout, for tests (no download, no md5)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _fake_images(rng, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """uint8 [N, 3072] rows (CHW order) whose mean colour depends on the label, so a model can learn something."""
    colours = rng.uniform(40, 215, size=(n_classes, 3, 1))
    pixels = colours[labels] + rng.normal(0, 30, size=(len(labels), 3, 1024))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _batch(rng, n: int, n_classes: int, label_key: str) -> dict:
    labels = np.arange(n) % n_classes  # every class present even in tiny files
    rng.shuffle(labels)
    d = {b"data": _fake_images(rng, labels, n_classes), label_key.encode(): labels.tolist(),
         b"filenames": [f"img{i}.png".encode() for i in range(n)]}
    if label_key == "fine_labels":
        d[b"coarse_labels"] = (labels // 5).tolist()
    return d


def write_fake_cifar(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) and root/cifar-100-python/
    (train, test, meta) with n_train / n_test images per dataset; returns root."""
    root, rng = Path(root), np.random.default_rng(seed)
    c10, c100 = root / "cifar-10-batches-py", root / "cifar-100-python"
    c10.mkdir(parents=True, exist_ok=True)
    c100.mkdir(parents=True, exist_ok=True)
    sizes = [n_train // 5 + (i < n_train % 5) for i in range(5)]
    for i, n in enumerate(sizes, 1):
        _dump(c10 / f"data_batch_{i}", _batch(rng, n, 10, "labels"))
    _dump(c10 / "test_batch", _batch(rng, n_test, 10, "labels"))
    _dump(c10 / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    _dump(c100 / "train", _batch(rng, n_train, 100, "fine_labels"))
    _dump(c100 / "test", _batch(rng, n_test, 100, "fine_labels"))
    _dump(c100 / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                          "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return root
