"""What stops a training stage: a loss that is no longer finite."""

from __future__ import annotations

import torch

from dynconvert.errors import DynconvertError


class NonFiniteLoss(DynconvertError):
    """The training loss became NaN or infinite."""


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop with a clear error when the loss is NaN or infinite (the pipeline says what was kept)."""
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"the training loss became {loss.item()} ({where}); lower train.lr or check the data")
