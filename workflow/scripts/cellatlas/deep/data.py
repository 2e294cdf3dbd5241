"""The data path: batches cut from a sparse matrix in bulk, and the seeded splits.

A per-cell ``Dataset.__getitem__`` costs one Python call, one sparse row slice and one small
tensor per cell, then a collate: at 100,000 cells that loop, not the model, is the epoch.
Here a batch is one vectorized gather from the CSR arrays (held as tensors, on the
accelerator when they fit), so a batch costs a handful of kernel launches whatever its size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import lightning.pytorch as L
import numpy as np
import scipy.sparse as sp
import torch

log = logging.getLogger(__name__)

#: share of the accelerator's free memory the training matrix may take when ``on_device="auto"``
DEVICE_FRACTION = 0.5


@dataclass
class CSRTensors:
    """A CSR matrix as three tensors (int64 index arrays, float32 values) on one device."""

    indptr: torch.Tensor
    indices: torch.Tensor
    data: torch.Tensor
    n_cols: int

    @classmethod
    def from_scipy(cls, X, device: torch.device | str = "cpu") -> CSRTensors:
        X = sp.csr_matrix(X, dtype=np.float32)
        X.sum_duplicates()
        return cls(
            torch.from_numpy(X.indptr.astype(np.int64)).to(device),
            torch.from_numpy(X.indices.astype(np.int64)).to(device),
            torch.from_numpy(X.data).to(device),
            X.shape[1],
        )

    @property
    def n_rows(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indptr, self.indices, self.data))

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Dense ``(len(rows), n_cols)`` float32 tensor of the given rows, built on this device."""
        rows = rows.to(self.indptr.device)
        starts = self.indptr[rows]
        counts = self.indptr[rows + 1] - starts
        out = torch.zeros(rows.numel(), self.n_cols, dtype=self.data.dtype, device=self.data.device)
        total = int(counts.sum())
        if total == 0:
            return out
        which = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts, output_size=total)
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(total, device=rows.device) - offsets[which] + starts[which]
        out[which, self.indices[pos]] = self.data[pos]
        return out


@dataclass
class DenseTensors:
    """A dense matrix (images) as one float32 tensor, with :class:`CSRTensors`' interface."""

    data: torch.Tensor

    @classmethod
    def from_numpy(cls, X, device: torch.device | str = "cpu") -> DenseTensors:
        return cls(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).to(device))

    @property
    def n_rows(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.data[rows.to(self.data.device)]


class SparseBatches:
    """An iterable of batches ``(x, y, batch_code)`` over ``rows`` of a :class:`CSRTensors`.

    ``shuffle`` permutes the rows each epoch from ``seed`` and the epoch number (same seed, same
    order). Under data parallel training every process takes an equal share of each epoch's
    permutation (padded like ``DistributedSampler``), so all processes run the same number of steps.
    """

    def __init__(self, X: CSRTensors | DenseTensors, rows: np.ndarray, *, y: np.ndarray | None = None, covariate: np.ndarray | None = None,
                 batch_size: int = 256, shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        device = X.data.device
        self.X = X
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
        self.y = None if y is None else torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
        self.covariate = None if covariate is None else torch.as_tensor(np.asarray(covariate, dtype=np.int64), device=device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def _order(self) -> torch.Tensor:
        rows = self.rows
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            rows = rows[torch.randperm(rows.numel(), generator=g).to(rows.device)]
            self.epoch += 1
        if self.world_size > 1:
            n = rows.numel()
            pad = math.ceil(n / self.world_size) * self.world_size - n
            if pad:  # like DistributedSampler: repeat rows until every process has as many
                rows = torch.cat([rows, rows.repeat(math.ceil(pad / n))[:pad]])
            rows = rows[self.rank::self.world_size]
        return rows

    def _starts(self, n: int) -> list[int]:
        starts = list(range(0, n, self.batch_size))
        if len(starts) > 1 and n - starts[-1] == 1:
            # a batch of one cell has no batch statistics (BatchNorm): it joins the batch before
            starts.pop()
        return starts

    def __len__(self) -> int:
        return len(self._starts(math.ceil(self.rows.numel() / self.world_size)))

    def __iter__(self):
        order = self._order()
        starts = self._starts(order.numel())
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else order.numel()
            idx = order[start:stop]
            x = self.X.rows(idx)
            y = self.y[idx] if self.y is not None else torch.empty(0, dtype=torch.long, device=x.device)
            c = self.covariate[idx] if self.covariate is not None else torch.empty(0, dtype=torch.long, device=x.device)
            yield x, y, c


def validation_split(n_rows: int, *, y: np.ndarray | None, groups: np.ndarray | None, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Positions ``(fit, val)`` into ``range(n_rows)`` and how they were made.

    Grouped (whole donors in validation, stratified by class where there are classes) when there
    are at least ``1 / fraction`` groups, so early stopping rewards what generalizes to new donors;
    otherwise a stratified (or plain) random share of cells.
    """
    from sklearn.model_selection import (
        GroupShuffleSplit,
        ShuffleSplit,
        StratifiedGroupKFold,
        StratifiedShuffleSplit,
    )

    if fraction <= 0 or n_rows < 10:
        return np.arange(n_rows), np.empty(0, dtype=np.int64), "none"
    index = np.arange(n_rows)
    n_splits = max(2, round(1 / fraction))
    if groups is not None and len(np.unique(groups)) >= n_splits:
        if y is not None:
            fit, val = next(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(index, y, groups))
        else:
            fit, val = next(GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(index, groups=groups))
        return fit, val, "grouped"
    if y is not None and np.bincount(np.unique(y, return_inverse=True)[1]).min() >= 2:
        fit, val = next(StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(index, y))
        return fit, val, "stratified"
    fit, val = next(ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(index))
    return fit, val, "random"


class CellDataModule(L.LightningDataModule):
    """Cells of one matrix, split into training and validation rows in :meth:`setup`.

    Parameters
    ----------
    X
        cells x features, sparse (held as CSR tensors) or dense (held as it is).
    y
        integer class codes (classifier) or None (autoencoder).
    covariate
        integer batch codes given to the model, or None.
    groups
        donor (or sample) of each cell: validation holds out whole groups when there are enough.
    on_device
        hold the matrix on the accelerator: ``"auto"`` (when it takes under half the free
        memory), ``True`` or ``False`` (batches are built on the CPU and copied).
    """

    def __init__(self, X, *, y: np.ndarray | None = None, covariate: np.ndarray | None = None,
                 groups: np.ndarray | None = None, val_fraction: float = 0.1, batch_size: int = 256, seed: int = 0,
                 on_device: bool | str = "auto"):
        super().__init__()
        self.X = X
        self.y, self.covariate, self.groups = y, covariate, groups
        self.val_fraction, self.batch_size, self.seed, self.on_device = val_fraction, batch_size, seed, on_device
        self.fit_rows = self.val_rows = None
        self.split_kind = None
        self.device = torch.device("cpu")

    def _choose_device(self) -> torch.device:
        root = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if root.type == "cpu" or self.on_device is False:
            return torch.device("cpu")
        if self.on_device is True:
            return root
        nbytes = self.X.nnz * 12 + self.X.shape[0] * 8 if sp.issparse(self.X) else self.X.size * 4
        free = torch.cuda.mem_get_info(root)[0] if root.type == "cuda" else 0
        if nbytes < DEVICE_FRACTION * free:
            return root
        log.info("matrix (%.2f GiB) does not fit in half of the free accelerator memory; batches are built on the CPU",
                 nbytes / 2**30)
        return torch.device("cpu")

    def split(self) -> None:
        """Make the training/validation split (once; seeded)."""
        if self.fit_rows is None:
            self.fit_rows, self.val_rows, self.split_kind = validation_split(
                self.X.shape[0], y=self.y, groups=self.groups, fraction=self.val_fraction, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        self.split()
        # called again once the Trainer is attached: only then is the accelerator known
        device = self._choose_device()
        if getattr(self, "tensors", None) is not None and device == self.device:
            return
        self.device = device
        # images are dense: held as they are (as CSR they would take three times the memory)
        self.tensors = (CSRTensors.from_scipy(self.X, self.device) if sp.issparse(self.X)
                        else DenseTensors.from_numpy(self.X, self.device))
        log.info("%d training and %d validation cells (%s split); matrix on %s (%.1f MiB)", len(self.fit_rows),
                 len(self.val_rows), self.split_kind, self.device, self.tensors.nbytes / 2**20)

    def _batches(self, rows, shuffle: bool, shard: bool) -> SparseBatches:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if (shard and self.trainer) else (0, 1)
        return SparseBatches(self.tensors, rows, y=self.y, covariate=self.covariate, batch_size=self.batch_size,
                             shuffle=shuffle, seed=self.seed, rank=rank, world_size=world)

    def train_dataloader(self) -> SparseBatches:
        return self._batches(self.fit_rows, shuffle=True, shard=True)

    def val_dataloader(self):
        # not sharded: every process scores the whole validation set, so no gather is needed
        return self._batches(self.val_rows, shuffle=False, shard=False) if len(self.val_rows) else []
