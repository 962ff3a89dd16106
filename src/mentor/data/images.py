"""Image data from IDX files (``.gz`` ok) or NumPy arrays; Fashion-MNIST with a digits fallback."""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from mentor.data.sources import DATASETS, DataBundle, DataInfo, TensorDataset, split_indices

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{p} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{p}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _load_array(path: str | Path) -> np.ndarray:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"image data file {p} does not exist")
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    return read_idx(p)


def _as_images(x: np.ndarray) -> torch.Tensor:
    x = x.astype(np.float32)
    if x.max() > 1.5:
        x = x / 255.0
    if x.ndim == 3:  # [N, H, W] -> [N, 1, H, W]
        x = x[:, None]
    return torch.from_numpy((x - 0.5) / 0.5)


def image_bundle(
    x: np.ndarray,
    y: np.ndarray,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    limit: int | None = None,
    val_limit: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> DataBundle:
    """Images in [-1, 1] as ``[N, C, H, W]``; the given test split or a seeded split."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    xt, yt = _as_images(x), torch.as_tensor(y.astype(np.int64))
    if x_val is None:
        tr, va = split_indices(len(xt), val_fraction, seed)
        ids = torch.arange(len(xt))
        parts = [(xt[tr], yt[tr], ids[tr]), (xt[va], yt[va], ids[va])]
    else:
        xv, yv = _as_images(x_val), torch.as_tensor(np.asarray(y_val).astype(np.int64))
        parts = [
            (xt, yt, torch.arange(len(xt))),
            (xv, yv, torch.arange(len(xt), len(xt) + len(xv))),
        ]
    g = np.random.default_rng(seed + 1)
    for k, lim in ((0, limit), (1, val_limit)):
        if lim is not None and lim < len(parts[k][0]):
            keep = torch.as_tensor(np.sort(g.permutation(len(parts[k][0]))[:lim]))
            parts[k] = tuple(t[keep] for t in parts[k])
    n_cls = int(max(int(yt.max()), int(parts[1][1].max()))) + 1
    info = DataInfo(
        task="classification",
        in_features=int(np.prod(xt.shape[1:])),
        input_shape=tuple(xt.shape[1:]),
        num_classes=n_cls,
        class_names=class_names or [str(i) for i in range(n_cls)],
    )
    return DataBundle(TensorDataset(*parts[0]), TensorDataset(*parts[1]), info)


@DATASETS.register("idx")
def idx_images(
    *,
    images: str,
    labels: str,
    test_images: str | None = None,
    test_labels: str | None = None,
    limit: int | None = None,
    val_limit: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Images and labels from IDX (.gz ok) or .npy files; held-out = test files if given."""
    xv = _load_array(test_images) if test_images else None
    yv = _load_array(test_labels) if test_labels else None
    if (xv is None) != (yv is None):
        raise ValueError("give both data.params.test_images and test_labels, or neither")
    return image_bundle(
        _load_array(images),
        _load_array(labels),
        x_val=xv,
        y_val=yv,
        limit=limit,
        val_limit=val_limit,
        val_fraction=val_fraction,
        seed=seed,
    )


def find_fashion_mnist(path: str | None = None) -> Path | None:
    """The folder holding the Fashion-MNIST IDX files: ``path``, $FASHION_MNIST, Debian's."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    for d in (path, os.environ.get("FASHION_MNIST"), *FASHION_MNIST_DIRS):
        if not d:
            continue
        cand = Path(d).expanduser()
        for sub in (cand, cand / "usr/share/datasets/fashion-mnist"):
            if all((sub / n).exists() for n in names):
                return sub
    return None


@DATASETS.register("fashion_mnist")
def fashion_mnist(
    *,
    path: str | None = None,
    limit: int | None = None,
    val_limit: int | None = None,
    fallback: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``), else scikit-learn digits as images.

    Looked up at ``path``, ``$FASHION_MNIST`` and ``/usr/share/datasets/fashion-mnist`` (a
    folder where the .deb was unpacked with ``dpkg -x`` works too). Held-out = the test set.
    """
    d = find_fashion_mnist(path)
    if d is None:
        hint = (
            "install it with `apt-get install dataset-fashion-mnist`, or without root: "
            "`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR` "
            "and set data.params.path=DIR"
        )
        if not fallback:
            raise FileNotFoundError(f"Fashion-MNIST not found; {hint}")
        warnings.warn(
            f"Fashion-MNIST not found, using scikit-learn digits (8x8) instead; {hint}",
            stacklevel=2,
        )
        from sklearn.datasets import load_digits

        ds = load_digits()
        return image_bundle(
            ds.images / 16.0,
            ds.target,
            limit=limit,
            val_limit=val_limit,
            val_fraction=val_fraction,
            seed=seed,
        )
    b = image_bundle(
        read_idx(d / "train-images-idx3-ubyte.gz"),
        read_idx(d / "train-labels-idx1-ubyte.gz"),
        x_val=read_idx(d / "t10k-images-idx3-ubyte.gz"),
        y_val=read_idx(d / "t10k-labels-idx1-ubyte.gz"),
        limit=limit,
        val_limit=val_limit,
        seed=seed,
        class_names=FASHION_CLASSES,
    )
    b.info.extra["source"] = str(d)
    return b


__all__ = ["find_fashion_mnist", "image_bundle", "read_idx"]
