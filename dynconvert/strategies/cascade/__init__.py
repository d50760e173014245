"""Cascades: whole pretrained models run cheapest first, each sample handed on only while unsure."""

from dynconvert.strategies.cascade.model import CascadeModel
from dynconvert.strategies.cascade.strategy import Cascade, CascadeConfig

__all__ = ["Cascade", "CascadeConfig", "CascadeModel"]
