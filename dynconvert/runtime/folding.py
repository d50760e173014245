"""Weights folded for inference, cached while nothing can change them.

At batch 1 an inserted module's time is in its number of operations, not their FLOPs, so in
eval mode some fold two operations into one (a BatchNorm into the convolution before it, a skip
connection into its correction). The folded weights are computed once under inference mode,
where nothing trains, and computed again when a tensor they come from is written in place.
"""

from __future__ import annotations

import torch

from dynconvert.runtime.modules import DynModule


def batchnorm_scale_shift(bn: torch.nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """A BatchNorm in eval mode as ``x * scale + shift``, per channel (affine or not)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    scale = 1 / std if bn.weight is None else bn.weight / std
    shift = -bn.running_mean * scale
    return scale, shift if bn.bias is None else bn.bias + shift


class FoldsForInference(DynModule):
    """Base of inserted modules with folded weights: subclasses give ``_fold_sources`` (the
    tensors the folding reads) and ``_fold`` (the folded weights, or None where nothing folds).

    Loading a state, moving the module and switching mode forget the folding; an in-place change
    to a source tensor is seen through its version. Replacing a parameter or a layer by another
    object is not: switch mode (``.eval()``) after doing so.
    """

    def __init__(self):
        super().__init__()
        self._folding: tuple = (None, None, None)  # (watched tensors, their versions, folded weights)
        # loading writes into the same tensors, and under inference mode leaves no version behind
        self.register_load_state_dict_post_hook(lambda module, keys: module._forget_folding())

    def _fold_sources(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _fold(self):
        raise NotImplementedError

    def _forget_folding(self) -> None:
        self._folding = (None, None, None)

    def train(self, mode: bool = True):
        self._forget_folding()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._forget_folding()
        return super()._apply(fn, recurse)

    def cached_folding(self):
        """The folded weights, cached; None outside inference mode and while torch.compile or
        torch.export traces (they cannot ask about inference mode), where nothing is cached."""
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return None
        # checking the versions costs a few microseconds; walking the module for its tensors
        # would cost as much as several small convolutions at batch 1
        watched, versions, folded = self._folding
        if watched is not None and [t._version for t in watched] == versions:
            return folded
        # inference tensors (a model loaded or moved under inference mode) keep no version and
        # cannot be written in place outside inference mode: only the others are watched
        watched = [t for t in self._fold_sources() if not t.is_inference()]
        folded = self._fold()
        self._folding = (watched, [t._version for t in watched], folded)
        return folded

    def folded(self):
        """The folded weights: cached under inference mode, computed afresh elsewhere (so that
        torch.compile and torch.export trace the folding itself)."""
        cached = self.cached_folding()
        return self._fold() if cached is None else cached


def foldings_held(modules) -> tuple:
    """What :func:`foldings_unchanged` compares against: each module's cached folding as it is
    now, and every tensor those foldings watch with its version, in one flat list."""
    foldings = tuple(getattr(m, "_folding", None) for m in modules)
    watched = [t for f in foldings if f is not None and f[0] is not None for t in f[0]]
    return foldings, watched, [t._version for t in watched]


def foldings_unchanged(modules, held: tuple) -> bool:
    """Whether every one of ``modules`` still holds the folding it held when ``held`` was taken
    (:func:`foldings_held`): not forgotten (a load, a move or a mode switch) nor recomputed, no
    tensor it was folded from written in place since, and no forward hook added. One check for
    many modules, where asking each for its folding would walk the same checks one call at a time."""
    foldings, watched, versions = held
    if len(modules) != len(foldings):
        return False
    for module, folding in zip(modules, foldings):
        if getattr(module, "_folding", None) is not folding or module._forward_hooks or module._forward_pre_hooks:
            return False
    return [t._version for t in watched] == versions
