"""Taking rows out of a batch and putting them back, in the batch's memory format.

Rows are selected by index (``index_select``, ``index_copy_``) rather than by boolean mask: a
mask costs a search for its true entries at every use, and a gather by mask copies a feature
map several times slower than ``index_select`` with the indices found once.
"""

from __future__ import annotations

import torch


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-d tensor laid out that way, else the contiguous format."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def select_rows(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` (indices) of ``h``, in ``h``'s memory format (channels-last stays so)."""
    selected = h.index_select(0, rows)
    fmt = memory_format_of(h)
    return selected if fmt is torch.contiguous_format else selected.contiguous(memory_format=fmt)


def rows_where(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a 1-d boolean ``mask``."""
    return mask.nonzero().squeeze(1)
