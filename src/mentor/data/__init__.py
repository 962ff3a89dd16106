"""Data sources: registered by name, each returns train/val datasets and a description."""

from mentor.data import (  # noqa: F401  (registers the data sources)
    generative,
    images,
    prompts,
    text,
    xtok,
)
from mentor.data.sources import DATASETS, DataBundle, DataInfo, TensorDataset, build_data
from mentor.data.text import TextDataset, TokenBlocks, text_collate

__all__ = [
    "DATASETS",
    "DataBundle",
    "DataInfo",
    "TensorDataset",
    "TextDataset",
    "TokenBlocks",
    "build_data",
    "text_collate",
]
