"""Cost of a model on this machine: parameters, size on disk, latency and throughput."""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from mentor.models import model_outputs


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo when available)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What cost figures were measured on."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
        "dtype": "float32",
    }


# A model with at least this fraction of exactly-zero weights counts as sparse: eval then
# reports its sparsity and compressed size.
SPARSE_FRACTION = 0.01


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def size_on_disk(model: nn.Module, compressed: bool = False) -> int | tuple[int, int]:
    """Bytes of the model's weights saved as safetensors (and, with ``compressed``, that file
    zlib-compressed at level 1: what a sparse model's zeros save in storage or download)."""
    import zlib

    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        save_model(model, str(path))
        size = path.stat().st_size
        if not compressed:
            return size
        z, packed = zlib.compressobj(1), 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                packed += len(z.compress(chunk))
        return size, packed + len(z.flush())


def weight_sparsity(model: nn.Module) -> dict[str, float | int]:
    """Exact zeros among the weight matrices (parameters with 2 or more dimensions)."""
    total = zeros = 0
    seen: set[int] = set()
    for p in model.parameters():
        if p.dim() < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        zeros += int((p.detach() == 0).sum())
    return {"zero_fraction": zeros / max(1, total), "nonzero_weights": total - zeros}


@torch.no_grad()
def time_batches(
    model: nn.Module,
    data: Dataset,
    batch_size: int,
    *,
    collate: Callable[[list[Any]], dict[str, Any]] = default_collate,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: float = 8.0,
) -> dict[str, float]:
    """Median/min/max seconds of a forward pass on one batch of ``batch_size`` examples."""
    model.eval()
    idx = [i % len(data) for i in range(batch_size)]
    batch = collate([data[i] for i in idx])
    for _ in range(warmup):
        model_outputs(model, batch)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        model_outputs(model, batch)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > max_seconds and len(times) >= 3:
            break
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "n": len(times),
    }


@torch.no_grad()
def items_per_second(
    model: nn.Module,
    data: Dataset,
    collate: Callable[[list[Any]], dict[str, Any]] = default_collate,
    batch_size: int = 32,
    repeats: int = 3,
) -> float:
    """Examples per second at ``batch_size`` (median of ``repeats`` after one warm-up)."""
    model.eval()
    batch = collate([data[i] for i in range(min(batch_size, len(data)))])
    n = len(batch["index"])
    model_outputs(model, batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model_outputs(model, batch)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def measure_cost(
    model: nn.Module,
    data: Dataset,
    *,
    collate: Callable[[list[Any]], dict[str, Any]] = default_collate,
    throughput_batch: int = 64,
    compressed: bool | None = None,
) -> dict[str, Any]:
    """Parameters, size, latency per example at batch 1, throughput at a larger batch.

    ``compressed``: also zlib-compress the weights (``compressed_bytes``). By default only for
    a sparse model (1% or more of its weights exactly zero), where the zeros save storage: on a
    dense 135M-parameter model compression costs ~8 s and saves nothing worth reporting.
    """
    b1 = time_batches(model, data, 1, collate=collate)
    bn = time_batches(model, data, throughput_batch, collate=collate, repeats=3)
    sparsity = weight_sparsity(model)
    if compressed is None:
        compressed = sparsity["zero_fraction"] >= SPARSE_FRACTION
    if compressed:
        size, packed = size_on_disk(model, compressed=True)  # type: ignore[misc]
    else:
        size, packed = size_on_disk(model), None
    return {
        "params": parameter_count(model),
        **sparsity,
        "size_bytes": size,
        "compressed_bytes": packed,
        "latency_ms": b1["median"] * 1e3,
        "latency_ms_range": [b1["min"] * 1e3, b1["max"] * 1e3],
        "throughput_per_s": throughput_batch / bn["median"],
        "throughput_batch": throughput_batch,
    }
