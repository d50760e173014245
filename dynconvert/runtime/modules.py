"""Base class of every module dynconvert inserts; tracing treats them as leaves."""

from torch import nn


class DynModule(nn.Module):
    """Marker base class for inserted modules (exit heads, gates, policy networks)."""
