"""A torch Dataset over rows of the memory-mapped image cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class CachedXrayDataset(Dataset):
    """Items are ``(image, label)``: ``(1, S, S)`` uint8 tensor and a float32 scalar (1 = PNEUMONIA).

    Pixels stay uint8 until the model's own preprocessing (see ``XrayClassifier.preprocess``), so
    batches are 4x smaller on their way to the device and the normalisation travels with the
    checkpoint. The cache file is opened lazily per process: a memmap must not be pickled into
    DataLoader workers (that would copy the whole array).
    """

    def __init__(self, pixels_path: str | Path, rows: np.ndarray, labels: np.ndarray) -> None:
        if len(rows) != len(labels):
            raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
        self.pixels_path = str(pixels_path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
        self._pixels: np.ndarray | None = None

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.load(self.pixels_path, mmap_mode="r")
        return self._pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(self.pixels[self.rows[index]]))
        return image.unsqueeze(0), self.labels[index]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pixels"] = None
        return state
