"""Data sources: registered by name, each returns train/val datasets and a description."""

from mentor.data.sources import DATASETS, DataBundle, DataInfo, TensorDataset, build_data

__all__ = ["DATASETS", "DataBundle", "DataInfo", "TensorDataset", "build_data"]
