"""Exit heads: small classifiers that read an intermediate feature and predict the classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.runtime.folding import FoldsForInference, batchnorm_scale_shift

NORMS = ("layer", "batch")
ACTIVATIONS = ("gelu", "relu")


class ExitHead(FoldsForInference):
    """Pool a feature map (or pick/average tokens), normalise, then a small MLP.

    The head is split in two so a frozen backbone's features can be cached: ``features``
    has no parameters, ``classify`` holds everything that is trained.

    Args:
        feature_shape: shape of one sample's input feature, ``(C, H, W)`` or ``(T, D)``.
        num_classes: classes to predict.
        pool: output side of the average pooling for spatial maps.
        hidden: width of the hidden layer (0 for a linear head).
        tokens: for token sequences, ``"cls"`` (first token) or ``"mean"``.
        channels_last: spatial maps arrive as ``(H, W, C)`` (timm's NHWC models).
        norm: ``"layer"`` (LayerNorm, per sample) or ``"batch"`` (BatchNorm over the training
            features; in eval it folds into the first linear layer, one operation fewer).
        activation: ``"gelu"`` or ``"relu"``.
    """

    def __init__(
        self,
        feature_shape: tuple[int, ...],
        num_classes: int,
        pool: int = 4,
        hidden: int = 256,
        tokens: str = "mean",
        channels_last: bool = False,
        norm: str = "layer",
        activation: str = "gelu",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown head norm '{norm}': choose one of {', '.join(NORMS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown head activation '{activation}': choose one of {', '.join(ACTIVATIONS)}")
        self.feature_shape = tuple(feature_shape)
        self.spatial = len(feature_shape) == 3
        self.channels_last = channels_last
        self.tokens = tokens
        self.norm = norm
        self.activation = activation
        self.pool_kernel = None
        if self.spatial:
            channels, height, width = self._chw(feature_shape)
            self.pool_hw = (min(pool, height), min(pool, width))
            if height % self.pool_hw[0] == 0 and width % self.pool_hw[1] == 0:
                # the same averages as adaptive pooling, by a cheaper kernel
                self.pool_kernel = (height // self.pool_hw[0], width // self.pool_hw[1])
            in_features = channels * self.pool_hw[0] * self.pool_hw[1]
        elif len(feature_shape) == 2:
            in_features = feature_shape[1]
        else:
            raise ValueError(f"an exit head reads (C, H, W) maps or (T, D) tokens, got shape {feature_shape}")
        layers: list[nn.Module] = [nn.LayerNorm(in_features) if norm == "layer" else nn.BatchNorm1d(in_features)]
        act = nn.GELU() if activation == "gelu" else nn.ReLU()
        if hidden:
            layers += [nn.Linear(in_features, hidden), act, nn.Linear(hidden, num_classes)]
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
            if self.pool_kernel is not None:
                return F.avg_pool2d(x, self.pool_kernel).flatten(1)
            return F.adaptive_avg_pool2d(x, self.pool_hw).flatten(1)
        return x[:, 0] if self.tokens == "cls" else x.mean(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The trained part: logits from pooled features."""
        # every layer called as a function: at batch 1 a head's few small products cost less
        # than the module calls around them, and every exit reached pays for a head
        if self.norm == "batch" and not self.training:
            # the BatchNorm folded into the first layer (cached under inference mode)
            return self._classify_folded(features, self.folded())
        norm, first, *rest = self.classifier
        if self.norm == "batch":
            h = F.linear(norm(features), first.weight, first.bias)
        else:
            h = F.layer_norm(features, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            h = F.linear(h, first.weight, first.bias)
        for layer in rest:
            h = F.linear(h, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else self._activate(h)
        return h

    def single_sample_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` for one sample ``x``, through :meth:`single_sample_form`."""
        function, args = self.single_sample_form()
        return function(x, *args)

    def single_sample_form(self) -> tuple:
        """``(function, args)`` with ``function(x, *args) == self(x)`` for a batch of one: the same
        operations on the cached folded weights, as one straight-line function without the module
        and method calls around them (at batch 1 their Python weighs on a head's time, most when
        the head runs cold). The early-exit runtime asks once and calls it while the folding
        holds. Where the folding is not cached (outside inference mode, a LayerNorm head) or hooks
        must see the call, ``function`` is the head itself."""
        if self.norm != "batch" or self.training or self._forward_hooks or self._forward_pre_hooks:
            return self, ()
        layers = self.cached_folding()
        if layers is None:
            return self, ()
        plain_pool = self.spatial and not self.channels_last and self.pool_kernel is not None
        if plain_pool and len(layers) == 2 and self.activation == "relu":
            return _pooled_mlp_logits, (self.pool_kernel, *layers[0], *layers[1])
        return self._logits_from_folded, (layers,)

    def _logits_from_folded(self, x: torch.Tensor, layers) -> torch.Tensor:
        return self._classify_folded(self.features(x), layers)

    def _classify_folded(self, features: torch.Tensor, layers) -> torch.Tensor:
        """Logits from pooled features through the folded ``(weight, bias)`` layers."""
        h = features
        for weight, bias in layers[:-1]:
            h = self._activate(F.linear(h, weight, bias))
        return F.linear(h, *layers[-1])

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h) if self.activation == "gelu" else F.relu(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def _linear_layers(self) -> list[nn.Linear]:
        return [layer for layer in self.classifier if isinstance(layer, nn.Linear)]

    def _fold_sources(self) -> list[torch.Tensor]:
        norm = self.classifier[0]
        linear = [t for layer in self._linear_layers() for t in (layer.weight, layer.bias)]
        return [norm.weight, norm.bias, norm.running_mean, norm.running_var, *linear]

    def _fold(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of every linear layer, the evaluation-mode BatchNorm folded into the first."""
        norm, (first, *rest) = self.classifier[0], self._linear_layers()
        scale, shift = batchnorm_scale_shift(norm)
        folded = (first.weight * scale, first.bias + first.weight @ shift)
        return [folded, *((layer.weight, layer.bias) for layer in rest)]


def _pooled_mlp_logits(x, kernel, weight1, bias1, weight2, bias2) -> torch.Tensor:
    """Logits of a pooled two-layer ReLU head on folded weights (see
    :meth:`ExitHead.single_sample_form`); the hidden layer's ReLU is taken in place."""
    hidden = F.linear(F.avg_pool2d(x, kernel).flatten(1), weight1, bias1).relu_()
    return F.linear(hidden, weight2, bias2)
