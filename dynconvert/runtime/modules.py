"""What the runtime shares: the base class of every module dynconvert inserts (tracing treats
them as leaves), and how a runtime model's ``forward`` runs its ``route``."""

import torch
from torch import nn


class DynModule(nn.Module):
    """Marker base class for inserted modules (exit heads, gates, policy networks)."""


def route_for_forward(model: nn.Module, x: torch.Tensor):
    """``model.route(x)`` as a runtime model's ``forward`` runs it: in eval mode under inference
    mode (entered only where it is not on already), in training mode in the caller's grad mode."""
    if not model.training and torch.is_inference_mode_enabled():
        return model.route(x)
    with torch.inference_mode(not model.training):
        return model.route(x)
