"""The reference's training-data pattern, for bench_data.py only: a pandas `.loc` look-up and
one `.npy` read per row, bins averaged in a Python loop, a torch DataLoader with no workers.
Nothing here is used by the library.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd  # the naive loader only; pandas comes with mlflow
import torch
from torch.utils.data import DataLoader, Dataset


class NaiveDataset(Dataset):
    """The reference's training Dataset: DataFrame look-ups and a file read per item."""

    def __init__(self, list_csv: Path, feature_root: Path, length: int) -> None:
        self.df = pd.read_csv(list_csv)
        # The reference reads the list's paths as they stand; re-root them once, up front.
        self.df["path"] = [str(feature_root / Path(p).name) for p in self.df["path"]]
        self.length = length

    def __len__(self) -> int:
        return self.df.shape[0]

    def __getitem__(self, index: int):
        features = np.load(self.df.loc[index]["path"])
        features, length = length_handling(features, self.length)
        return torch.tensor(features), self.df.loc[index]["label"], length


def length_handling(features: np.ndarray, length: int) -> tuple[np.ndarray, int]:
    """Bin means in a Python loop when longer, zero padding when shorter (DESIGN §1.4)."""
    if features.shape[0] <= length:
        pad = ((0, length - features.shape[0]), (0, 0))
        return np.pad(features, pad, mode="constant", constant_values=0), features.shape[0]
    out = np.zeros((length, features.shape[1]), dtype=np.float32)
    edges = np.linspace(0, len(features), length + 1, dtype=np.int32)
    for i in range(length):
        if edges[i] != edges[i + 1]:
            out[i, :] = np.mean(features[edges[i] : edges[i + 1], :], 0)
        else:
            out[i, :] = features[edges[i], :]
    return out, length


def epoch(dataset: NaiveDataset, batch_size: int, seed: int) -> int:
    """One shuffled pass; returns the number of rows read."""
    torch.manual_seed(seed)
    rows = 0
    for features, _, _ in DataLoader(dataset, batch_size=batch_size, shuffle=True):
        rows += features.shape[0]
    return rows
