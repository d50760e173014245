"""Rows of one shape and dtype in a flat file on disk, read by row index.

The decoded-image cache and the cache of what a frozen backbone computes are ``RowFile``s:
rows are read with positioned reads into the batch being built, never through a memory map,
so the process holds only the rows it asked for, however large the file (the operating
system's page cache, which is not the process's memory, keeps the hot parts).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


class RowFile:
    """``count`` rows of ``shape`` and ``dtype`` (a numpy dtype name) at ``path``.

    Index it like a tensor's first dimension (an int, a slice, a list or a tensor of rows) to
    get a tensor; ``write(start, rows)`` puts rows in place (any process, any order).
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: str, count: int):
        self.path = Path(path)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.count = int(count)
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._fd: int | None = None
        self._pid: int | None = None

    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, ...], dtype: str, count: int) -> RowFile:
        """A new file of ``count`` zero rows (sparse where the file system allows)."""
        rows = cls(path, shape, dtype, count)
        rows.path.parent.mkdir(parents=True, exist_ok=True)
        with open(rows.path, "wb") as fh:
            fh.truncate(rows.row_bytes * rows.count)
        return rows

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:  # a DataLoader worker opens its own descriptor
        return {**self.__dict__, "_fd": None, "_pid": None}

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDWR), os.getpid()
        return self._fd

    def close(self) -> None:
        """Close the file descriptor (reopened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def write(self, start: int, rows: torch.Tensor | np.ndarray) -> None:
        """Write ``rows`` (``n x shape``) as rows ``start .. start + n - 1``."""
        data = np.ascontiguousarray(rows.numpy() if isinstance(rows, torch.Tensor) else rows, dtype=self.dtype)
        if data.shape[1:] != self.shape or start < 0 or start + len(data) > self.count:
            raise ValueError(f"rows of shape {data.shape} do not fit {self.count} rows of {self.shape} at {start}")
        os.pwrite(self._descriptor(), memoryview(data).cast("B"), start * self.row_bytes)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        rows = _as_rows(index, self.count)
        out = np.empty((len(rows), *self.shape), dtype=self.dtype)
        flat = memoryview(out).cast("B")
        fd = self._descriptor()
        # one read per run of consecutive rows: a slice is a single read, a shuffled batch one per row
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            want = (last - first) * self.row_bytes
            got = os.preadv(
                fd, [flat[first * self.row_bytes : last * self.row_bytes]], int(rows[first]) * self.row_bytes
            )
            if got != want:
                raise OSError(f"'{self.path}' is shorter than its {self.count} rows: delete it to rebuild it")
        return torch.from_numpy(out)


def _as_rows(index, count: int) -> np.ndarray:
    """Row numbers (int64, in the given order) from a slice, a list or a tensor."""
    if isinstance(index, slice):
        return np.arange(count, dtype=np.int64)[index]
    rows = index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    rows = rows.astype(np.int64, copy=False).reshape(-1)
    if len(rows) and (rows.min() < -count or rows.max() >= count):
        raise IndexError(f"row index out of range for {count} rows")
    return np.where(rows < 0, rows + count, rows)
