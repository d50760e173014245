"""Exit heads: small classifiers that read an intermediate feature and predict the classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.runtime.modules import DynModule


class ExitHead(DynModule):
    """Pool a feature map (or pick/average tokens), then a LayerNorm and a small MLP.

    The head is split in two so a frozen backbone's features can be cached: ``features``
    has no parameters, ``classify`` holds everything that is trained.

    Args:
        feature_shape: shape of one sample's input feature, ``(C, H, W)`` or ``(T, D)``.
        num_classes: classes to predict.
        pool: output side of the adaptive average pooling for spatial maps.
        hidden: width of the hidden layer (0 for a linear head).
        tokens: for token sequences, ``"cls"`` (first token) or ``"mean"``.
        channels_last: spatial maps arrive as ``(H, W, C)`` (timm's NHWC models).
    """

    def __init__(
        self,
        feature_shape: tuple[int, ...],
        num_classes: int,
        pool: int = 4,
        hidden: int = 256,
        tokens: str = "mean",
        channels_last: bool = False,
    ):
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        self.spatial = len(feature_shape) == 3
        self.channels_last = channels_last
        self.tokens = tokens
        if self.spatial:
            channels, height, width = self._chw(feature_shape)
            self.pool_hw = (min(pool, height), min(pool, width))
            in_features = channels * self.pool_hw[0] * self.pool_hw[1]
        elif len(feature_shape) == 2:
            in_features = feature_shape[1]
        else:
            raise ValueError(f"an exit head reads (C, H, W) maps or (T, D) tokens, got shape {feature_shape}")
        layers: list[nn.Module] = [nn.LayerNorm(in_features)]
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes)]
        else:
            layers.append(nn.Linear(in_features, num_classes))
        self.classifier = nn.Sequential(*layers)
        self.in_features = in_features

    def _chw(self, shape):
        return (shape[2], shape[0], shape[1]) if self.channels_last else tuple(shape)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The parameter-free part: pooled, flattened features (cacheable)."""
        if self.spatial:
            if self.channels_last:
                x = x.permute(0, 3, 1, 2)
            return F.adaptive_avg_pool2d(x, self.pool_hw).flatten(1)
        return x[:, 0] if self.tokens == "cls" else x.mean(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The trained part: logits from pooled features."""
        # the classifier's layers called as functions: at batch 1 a head's few small products
        # cost less than the module calls around them, and every exit reached pays for a head
        norm, *layers = self.classifier
        h = F.layer_norm(features, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        for layer in layers:
            h = F.linear(h, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else F.gelu(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))
