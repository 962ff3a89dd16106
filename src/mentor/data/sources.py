"""Dataset sources. Every item is a dict with ``inputs`` (or ``input_ids``), ``labels`` and
``index`` (a stable example id, used by cached teachers)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mentor.registry import Registry

DATASETS: Registry[Any] = Registry("data source")


@dataclass
class DataInfo:
    """What builders and the engine need to know about a dataset."""

    task: str = "classification"  # classification | causal_lm | embedding
    in_features: int | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    class_names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # model spec whose tokenizer produced input_ids
    vocab_size: int | None = None  # token ids are < vocab_size (token data)
    max_length: int | None = None  # padded sequence length (token data)


@dataclass
class DataBundle:
    """Train and held-out datasets plus their description."""

    train: Dataset
    val: Dataset
    info: DataInfo
    collate: Callable[[list[Any]], dict[str, Any]] | None = None  # None: default_collate


class TensorDataset(Dataset):
    """In-memory (inputs, labels) pairs; ``index`` is the position in the full dataset."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        """Wrap aligned tensors; ``ids`` are the stable example ids."""
        if not (len(inputs) == len(labels) == len(ids)):
            raise ValueError("inputs, labels and ids must have the same length")
        self.inputs, self.labels, self.ids = inputs, labels, ids

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[i], "labels": self.labels[i], "index": self.ids[i]}


def class_counts_line(names: list[str], counts: Any, noun: str = "examples") -> str:
    """``data: 1,780 examples, 5 classes: business 408, ...`` (first 10 classes shown).

    Classes without examples are listed at the end, so an untrained class is never silent.
    """
    counts = [int(c) for c in counts]
    shown = ", ".join(f"{n} {c:,}" for n, c in zip(names[:10], counts[:10]))
    more = f", ... (+{len(names) - 10} more)" if len(names) > 10 else ""
    line = f"data: {sum(counts):,} {noun}, {len(names)} classes: {shown}{more}"
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        tail = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        line += f"; no examples of {len(empty)} class{'es' if len(empty) > 1 else ''}: {tail}"
    return line


def report_classes(names: list[str], counts: Any, noun: str = "examples") -> None:
    """Print the class -> count line of a labelled dataset to stderr (once per load)."""
    from rich.markup import escape

    from mentor._console import err

    err.print(escape(class_counts_line(names, counts, noun)), highlight=False, soft_wrap=True)


def check_positive(key: str, value: Any, optional: bool = True) -> None:
    """Refuse a count parameter (``data.params.<key>``) that is not a positive integer."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"data.params.{key}={value!r}: use a positive integer")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic shuffled train/val index split."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _bundle_from_arrays(
    x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int, info: DataInfo
) -> DataBundle:
    tr, va = split_indices(len(x), val_fraction, seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    ids = torch.arange(len(x))
    return DataBundle(
        TensorDataset(xt[tr], yt[tr], ids[tr]), TensorDataset(xt[va], yt[va], ids[va]), info
    )


@DATASETS.register("sklearn")
def sklearn_toy(
    *, name: str = "digits", standardize: bool = True, val_fraction: float = 0.2, seed: int = 0
) -> DataBundle:
    """scikit-learn toy sets (digits, iris, wine, breast_cancer), standardised features."""
    from sklearn import datasets

    loaders = {
        "digits": datasets.load_digits,
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
    }
    if name not in loaders:
        raise ValueError(f"data.params.name={name!r}: choose one of {', '.join(loaders)}")
    ds = loaders[name]()
    x, y = ds.data.astype(np.float32), ds.target.astype(np.int64)
    if standardize:
        # statistics of the training split only, so nothing leaks from held-out data
        tr, _ = split_indices(len(x), val_fraction, seed)
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        x = (x - mu) / sd
    info = DataInfo(
        task="classification",
        in_features=x.shape[1],
        input_shape=(x.shape[1],),
        num_classes=int(y.max()) + 1,
        class_names=[str(c) for c in getattr(ds, "target_names", range(int(y.max()) + 1))],
    )
    return _bundle_from_arrays(x, y, val_fraction, seed, info)


@DATASETS.register("random")
def random_classification(
    *,
    n: int = 512,
    in_features: int = 16,
    num_classes: int = 4,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataBundle:
    """Synthetic Gaussian-cluster classification data (for tests and benchmarks)."""
    g = np.random.default_rng(seed)
    centers = g.normal(size=(num_classes, in_features)) * 2
    y = g.integers(0, num_classes, size=n)
    x = centers[y] + g.normal(size=(n, in_features))
    info = DataInfo(
        task="classification",
        in_features=in_features,
        input_shape=(in_features,),
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
    )
    return _bundle_from_arrays(x.astype(np.float32), y, val_fraction, seed, info)


def build_data(
    source: str,
    params: dict[str, Any],
    val_fraction: float,
    seed: int,
    *,
    tokenizer: str | None = None,
) -> DataBundle:
    """Build the dataset named ``source`` (errors name ``data.source`` / ``data.params``).

    Text sources tokenise with ``params["tokenizer"]`` or, when absent, the ``tokenizer``
    given here (``mentor.assembly`` passes the teacher's model). Every classification source
    also takes ``labeled`` (a count or a fraction): only that many training examples keep their
    label, the rest are an unlabelled pool (see :func:`keep_labels`).
    """
    import inspect

    fn = DATASETS.get(source)
    sig = inspect.signature(fn)
    valid = [p for p in sig.parameters if p not in ("val_fraction", "seed")] + ["labeled"]
    unknown = [k for k in params if k not in valid]
    if unknown and not any(v.kind is v.VAR_KEYWORD for v in sig.parameters.values()):
        from mentor.registry import did_you_mean

        raise ValueError(
            f"data.params for source {source!r} has no parameter {unknown[0]!r}."
            f"{did_you_mean(unknown[0], valid)} Valid parameters: {', '.join(valid)}"
        )
    kw = dict(params)
    labeled = kw.pop("labeled", None)
    if tokenizer is not None and "tokenizer" in sig.parameters and kw.get("tokenizer") is None:
        kw["tokenizer"] = tokenizer
    bundle = fn(**kw, val_fraction=val_fraction, seed=seed)
    if labeled is not None:
        bundle = keep_labels(bundle, labeled, seed, source)
    return bundle


def labeled_count(labeled: Any, n: int) -> int:
    """``data.params.labeled`` as a number of examples: a count ``N`` or a fraction in (0, 1)."""
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float, np.integer, np.floating)):
        raise ValueError(
            f"data.params.labeled={labeled!r}: give a number of labelled examples (e.g. 500) or "
            "a fraction of the training set (e.g. 0.05)"
        )
    if isinstance(labeled, (float, np.floating)) and not float(labeled).is_integer():
        if not 0.0 < labeled < 1.0:
            raise ValueError(
                f"data.params.labeled={labeled}: a fraction must be in (0, 1); use a whole "
                "number for a count"
            )
        return max(1, int(round(float(labeled) * n)))
    k = int(labeled)
    if k < 0:
        raise ValueError(f"data.params.labeled={k}: use 0 (no labels) or more")
    if k > n:
        raise ValueError(
            f"data.params.labeled={k} is larger than the training set ({n:,} examples): use at "
            f"most {n:,}, or a fraction"
        )
    return k


def labeled_positions(labels: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Positions of ``k`` examples to keep labelled: a seeded draw, stratified by class.

    Each class gets its share of ``k`` (largest remainders first), so a small labelled set
    still covers every class it can.
    """
    y = np.asarray(labels)
    order = np.random.default_rng(seed + 104_729).permutation(len(y))
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * k / len(y)
    take = np.floor(quota).astype(int)
    rest = k - int(take.sum())
    for c in np.argsort(-(quota - take), kind="stable")[:rest]:
        take[c] += 1
    keep = []
    for c, t in zip(classes, take):
        keep.extend(order[y[order] == c][:t].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


def keep_labels(bundle: DataBundle, labeled: Any, seed: int, source: str = "") -> DataBundle:
    """A copy of ``bundle`` whose training set keeps the labels of ``labeled`` examples only.

    The others become the unlabelled pool: their label is ``-100`` (ignored by label terms such
    as ``ce``; teacher terms still see them). Held-out data keeps its labels (it measures the
    student). ``labeled``: a count, or a fraction of the training set.
    """
    import copy

    train = bundle.train
    if bundle.info.task != "classification":
        raise ValueError(
            f"data.params.labeled applies to classification data; source {source!r} gives "
            f"{bundle.info.task} data"
        )
    labels = getattr(train, "labels", None)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"data.params.labeled: the training set of source {source!r} does not keep its "
            "labels in one tensor, so a labelled part cannot be set aside"
        )
    k = labeled_count(labeled, len(labels))
    keep = labeled_positions(labels, k, seed)
    hidden = torch.full_like(labels, -100)
    hidden[torch.as_tensor(keep, dtype=torch.long)] = labels[torch.as_tensor(keep)]
    part = copy.copy(train)
    part.labels = hidden
    extra = {**bundle.info.extra, "labeled": k, "unlabeled": len(labels) - k}
    info = dataclasses.replace(bundle.info, extra=extra)
    return dataclasses.replace(bundle, train=part, info=info)


def labeled_mask(data: Dataset) -> torch.Tensor | None:
    """Which training examples have a label (None: the dataset keeps no label tensor)."""
    labels = getattr(data, "labels", None)
    if not isinstance(labels, torch.Tensor):
        return None
    return labels != -100
