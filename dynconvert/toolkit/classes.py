"""A data set whose classes are a subset of the model's: matched by name, logits restricted.

Image folders name their classes by WordNet id (``n01443537``); timm's ImageNet label
information maps the model's outputs to WordNet ids and to descriptions ("goldfish, Carassius
auratus"). A data set with as many classes as the model is taken as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dynconvert.errors import DynconvertError


@dataclass
class ClassMatch:
    """Which model output each data set class is (``indices[k]`` for data class ``k``), and how
    they were matched."""

    indices: list[int]
    how: str

    def describe(self, model_classes: int) -> dict:
        return {**asdict(self), "data_classes": len(self.indices), "model_classes": model_classes}


class ClassSubset(nn.Module):
    """A classifier whose logits are restricted to some of its classes, in the data set's order.

    It keeps the wrapped model's pretrained configuration, so preprocessing is resolved as for
    the model itself.
    """

    def __init__(self, model: nn.Module, indices: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long), persistent=False)
        self.num_classes = len(indices)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.indices)


def model_label_names(model: nn.Module, num_classes: int) -> tuple[list[str], list[str]] | None:
    """(WordNet ids, descriptions) of the model's outputs, from timm's label information; None
    when the model's label set is not known to timm."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model) if getattr(model, "pretrained_cfg", None) else None
    if subset is None and num_classes == 1000:
        subset = "imagenet-1k"
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None
    names = info.label_names()
    return list(names), [info.label_name_to_description(n) for n in names]


def match_classes(data_names: list[str], model: nn.Module, num_classes: int) -> ClassMatch | None:
    """Match a data set's class names to the model's outputs; None when it has as many classes.

    By WordNet id (image folder names), else by name: a data class equal to the model's label
    description or to its first comma-separated part. Raises ``DynconvertError`` with examples of
    both sides when some class matches nothing.
    """
    if len(data_names) == num_classes:
        return None
    labels = model_label_names(model, num_classes)
    if labels is None:
        raise DynconvertError(
            f"the data set has {len(data_names)} classes and the model {num_classes}, and the model's class "
            "names are unknown (timm has no label information for it); convert with a data set of the model's "
            "classes, or a model built for the data set's (--set model.num_classes=N)"
        )
    wnids, descriptions = labels
    position = {w: i for i, w in enumerate(wnids)}
    if all(n in position for n in data_names):
        return ClassMatch([position[n] for n in data_names], "WordNet ids")
    by_name = {}
    for i, description in enumerate(descriptions):
        by_name.setdefault(description.lower(), i)
        by_name.setdefault(description.split(",")[0].strip().lower(), i)
    if all(n.lower() in by_name for n in data_names):
        return ClassMatch([by_name[n.lower()] for n in data_names], "label names")
    unmatched = [n for n in data_names if n not in position and n.lower() not in by_name]
    names = ", ".join(repr(d.split(",")[0]) for d in descriptions[:2])
    raise DynconvertError(
        f"{len(unmatched)} of the data set's {len(data_names)} classes match none of the model's {num_classes} "
        f"(e.g. {', '.join(repr(n) for n in unmatched[:3])}); the model's classes are WordNet ids such as "
        f"{', '.join(repr(w) for w in wnids[:2])} or names such as {names}"
    )
