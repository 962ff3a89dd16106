"""Image data from IDX files (``.gz`` ok) or NumPy arrays; Fashion-MNIST with a digits fallback."""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from mentor.data.sources import (
    DATASETS,
    DataBundle,
    DataInfo,
    TensorDataset,
    check_positive,
    report_classes,
    split_indices,
)

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
    if not p.is_file():
        raise FileNotFoundError(f"IDX file {p} does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # not gzip, truncated download, unreadable
        raise ValueError(f"cannot read {p} ({e}); is it a complete IDX file (.gz ok)?") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{p} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{p} is truncated: its IDX header is incomplete")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=_IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{p}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _load_array(path: str | Path, key: str = "images") -> np.ndarray:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"image data file {p} does not exist; set data.params.{key}")
    if p.is_dir():
        raise ValueError(f"{p} is a folder, not a file; set data.params.{key}")
    if p.suffix == ".npy":
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(
                f"cannot read {p} as a NumPy array ({e}); data.params.{key} must be a "
                f".npy of numbers (np.save) or an IDX file"
            ) from None
    return read_idx(p)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer class labels 0..K-1, one per image; refuses anything that would be silently cast."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must be one integer per image, got shape {y.shape}")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise ValueError(
                f"{where}: label {y[bad[0]].item()!r} at index {bad[0]} is not an integer class "
                f"({len(bad)} such labels); labels are class indices 0..K-1"
            )
    elif y.dtype.kind not in "iub":
        raise ValueError(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    neg = np.flatnonzero(y < 0)
    if len(neg):
        raise ValueError(
            f"{where}: label {int(y[neg[0]])} at index {neg[0]} is negative ({len(neg)} such "
            f"labels); labels are class indices 0..K-1"
        )
    return y


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
    where: str = "the image data",
    val_where: str = "the held-out image data",
) -> DataBundle:
    """Images in [-1, 1] as ``[N, C, H, W]``; the given test split or a seeded split.

    Labels are integer class indices 0..K-1 (K = ``len(class_names)`` or the largest + 1);
    fractional, negative or out-of-range labels and fewer than two classes are refused with
    an error naming ``where``. The class -> count table is printed to stderr.
    """
    check_positive("limit", limit)
    check_positive("val_limit", val_limit)
    if len(x) == 0:
        raise ValueError(f"{where} has no images")
    if len(x) != len(y):
        raise ValueError(f"{where}: {len(x)} images but {len(y)} labels")
    y = _labels(y, where)
    if len(np.unique(y)) < 2:
        only = class_names[y[0]] if class_names and y[0] < len(class_names) else str(y[0])
        raise ValueError(
            f"{where} has one class, {only!r} ({len(y):,} images): one-class data trains to "
            f"accuracy 1.0; labelled data needs at least two classes"
        )
    xt, yt = _as_images(x), torch.as_tensor(y)
    if x_val is not None:
        if y_val is None or len(x_val) != len(y_val):
            n_y = "no" if y_val is None else len(y_val)
            raise ValueError(f"{val_where}: {len(x_val)} images but {n_y} labels")
        if len(x_val) == 0:
            raise ValueError(f"{val_where} has no images")
        y_val = _labels(y_val, val_where)
    if x_val is None:
        tr, va = split_indices(len(xt), val_fraction, seed)
        ids = torch.arange(len(xt))
        parts = [(xt[tr], yt[tr], ids[tr]), (xt[va], yt[va], ids[va])]
    else:
        xv, yv = _as_images(x_val), torch.as_tensor(y_val)
        parts = [
            (xt, yt, torch.arange(len(xt))),
            (xv, yv, torch.arange(len(xt), len(xt) + len(xv))),
        ]
    g = np.random.default_rng(seed + 1)
    for k, lim in ((0, limit), (1, val_limit)):
        if lim is not None and lim < len(parts[k][0]):
            keep = torch.as_tensor(np.sort(g.permutation(len(parts[k][0]))[:lim]))
            parts[k] = tuple(t[keep] for t in parts[k])
    top = int(y.max()) if x_val is None else max(int(y.max()), int(np.max(y_val)))
    n_cls = len(class_names) if class_names else top + 1
    if top >= n_cls:
        raise ValueError(
            f"{where}: label {top} is out of range for the {n_cls} classes "
            f"({', '.join(class_names or [])}); labels are class indices 0..{n_cls - 1}"
        )
    names = list(class_names) if class_names else [str(i) for i in range(n_cls)]
    counts = np.bincount(torch.cat([parts[0][1], parts[1][1]]).numpy(), minlength=n_cls)
    report_classes(names, counts, noun="images")
    info = DataInfo(
        task="classification",
        in_features=int(np.prod(xt.shape[1:])),
        input_shape=tuple(xt.shape[1:]),
        num_classes=n_cls,
        class_names=names,
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
    if bool(test_images) != bool(test_labels):
        raise ValueError("give both data.params.test_images and test_labels, or neither")
    xv = _load_array(test_images, "test_images") if test_images else None
    yv = _load_array(test_labels, "test_labels") if test_labels else None
    return image_bundle(
        _load_array(images, "images"),
        _load_array(labels, "labels"),
        x_val=xv,
        y_val=yv,
        limit=limit,
        val_limit=val_limit,
        val_fraction=val_fraction,
        seed=seed,
        where=f"{images} + {labels}",
        val_where=f"{test_images} + {test_labels}",
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
        where=f"Fashion-MNIST train files in {d}",
        val_where=f"Fashion-MNIST t10k files in {d}",
    )
    b.info.extra["source"] = str(d)
    return b


__all__ = ["find_fashion_mnist", "image_bundle", "read_idx"]
