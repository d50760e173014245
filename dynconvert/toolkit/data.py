"""Image classification data: find the columns, decode every image once, cache the pixels.

Images are decoded, resized and centre-cropped to the model's input size once, kept as a
uint8 tensor ``(N, C, H, W)`` and cached on disk (``$DYNCONVERT_CACHE``, default
``~/.cache/dynconvert``), so later runs and later steps of one run skip the decoding.
Normalisation happens per batch in :func:`normalize`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynconvert.config import DataConfig
from dynconvert.errors import DynconvertError
from dynconvert.files import replaced_on_success
from dynconvert.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class Preprocess:
    """How images are brought to the model: size, crop fraction, mean and std (timm's data config)."""

    input_size: tuple[int, int, int]
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> Preprocess:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        return cls(
            input_size=tuple(cfg["input_size"]),
            crop_pct=float(cfg.get("crop_pct", 1.0)),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=cfg.get("interpolation", "bilinear"),
        )


@dataclass
class ImageSplit:
    """Decoded images (uint8, ``N x C x H x W``) and integer labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | slice, name: str) -> ImageSplit:
        return ImageSplit(self.images[index], self.labels[index], name)


def normalize(images: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 images to the model's normalised float input."""
    mean = torch.tensor(prep.mean, device=images.device).view(1, -1, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=images.device).view(1, -1, 1, 1) * 255.0
    return (images.float() - mean) / std


def open_dataset(config: DataConfig):
    """``datasets.load_dataset`` on a local folder or a hub name, with a clear error."""
    import datasets

    if not config.path:
        raise DynconvertError("no data set given: pass --data PATH_OR_NAME or set data.path in the recipe")
    try:
        return datasets.load_dataset(config.path)
    except Exception as exc:
        raise DynconvertError(
            f"could not load data set '{config.path}' ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "pass a local folder that datasets.load_dataset understands (parquet, imagefolder) or a hub name"
        ) from None


def find_columns(features, config: DataConfig) -> tuple[str, str]:
    """The image and label column names: from the recipe, else by feature type."""
    import datasets

    def pick(kind, wanted):
        if wanted:
            if wanted not in features:
                raise DynconvertError(f"data set has no column '{wanted}'; columns: {', '.join(features)}")
            return wanted
        found = [k for k, f in features.items() if isinstance(f, kind)]
        if not found:
            what = "an Image" if kind is datasets.Image else "a ClassLabel"
            option = "image_column" if kind is datasets.Image else "label_column"
            raise DynconvertError(
                f"data set has no column of {what} feature (columns: {', '.join(features)}); "
                f"name it with --set data.{option}=NAME"
            )
        return found[0]

    return pick(datasets.Image, config.image_column), pick(datasets.ClassLabel, config.label_column)


def first_image_size(config: DataConfig, probe: int = 8) -> tuple[int, int] | None:
    """(height, width) of the training images when the first ``probe`` share it, else None."""
    import datasets

    dsd = open_dataset(config)
    split = dsd[choose_splits(list(dsd.keys()), config)[0]]
    image_col, _ = find_columns(split.features, config)
    raw = split.cast_column(image_col, datasets.Image(decode=False))
    sizes = set()
    for i in range(min(probe, len(raw))):
        item = raw[i][image_col]
        data = item.get("bytes")
        with Image.open(io.BytesIO(data) if data else item["path"]) as img:
            sizes.add((img.size[1], img.size[0]))
    return sizes.pop() if len(sizes) == 1 else None


def choose_splits(available: list[str], config: DataConfig) -> tuple[str, str | None, str]:
    """(fit split, calibration split or None to hold out part of fit, evaluation split)."""
    if config.train_split not in available:
        raise DynconvertError(f"data set has no split '{config.train_split}'; splits: {', '.join(available)}")
    validation = next((s for s in ("validation", "valid", "val") if s in available), None)
    evaluation = config.eval_split or ("test" if "test" in available else validation)
    if evaluation is None or evaluation not in available:
        raise DynconvertError(f"data set has no evaluation split (splits: {', '.join(available)}); set data.eval_split")
    calibration = config.calibration_split
    if calibration is None and validation and validation != evaluation:
        calibration = validation
    return config.train_split, calibration, evaluation


def stratified_sample(labels: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``limit`` samples drawn so that every class keeps its share (to within
    one sample), in a seeded order: the cap of a folder sorted by class still covers every class."""
    n = len(labels)
    if limit >= n:
        return torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[order]
    grouped = torch.argsort(shuffled, stable=True)  # by class, the seeded order kept within each
    counts = torch.bincount(shuffled)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[grouped] = torch.arange(n) - starts[shuffled[grouped]]
    # the k-th of a class of c samples sits at (k + 1/2) / c: taking the lowest positions first
    # takes from every class in proportion
    position = (rank.double() + 0.5) / counts[shuffled].double()
    chosen = order[torch.argsort(position, stable=True)[:limit]]
    return torch.sort(chosen).values


def decode_split(dataset, image_column: str, label_column: str, prep: Preprocess, name: str, limit=None, seed: int = 0):
    """Decode one split into an :class:`ImageSplit`, using the on-disk cache when enabled.

    ``limit`` caps the images by a class-stratified, seeded sample (``stratified_sample``)."""
    import datasets

    if limit is not None and limit < len(dataset):
        labels = torch.tensor(np.asarray(dataset[label_column]), dtype=torch.long)
        dataset = dataset.select(stratified_sample(labels, limit, seed).tolist())
    fingerprint = getattr(dataset, "_fingerprint", None)
    key = hashlib.sha256(repr((fingerprint, image_column, label_column, prep.input_size, prep.crop_pct)).encode())
    cache_file = _cache_dir() / f"{key.hexdigest()[:24]}.pt" if fingerprint else None
    if cache_file and cache_file.is_file():
        try:
            stored = torch.load(cache_file, weights_only=True)
            return ImageSplit(stored["images"], stored["labels"], name)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    labels = torch.tensor(np.asarray(raw[label_column]), dtype=torch.long)
    _, height, width = prep.input_size
    images = torch.empty((len(raw), 3, height, width), dtype=torch.uint8)
    column = raw[image_column]
    for i, item in enumerate(progress_bar(column, desc=f"decode {name}", unit="img", mininterval=1.0)):
        images[i] = torch.from_numpy(_decode(item, prep)).permute(2, 0, 1)
    if cache_file:
        with replaced_on_success(cache_file) as partial:
            torch.save({"images": images, "labels": labels}, partial)
    return ImageSplit(images, labels, name)


def _decode(item, prep: Preprocess) -> np.ndarray:
    data = item.get("bytes") if isinstance(item, dict) else None
    source = io.BytesIO(data) if data else item["path"]
    with Image.open(source) as img:
        img = img.convert("RGB")
        _, height, width = prep.input_size
        if img.size != (width, height):
            scale_h, scale_w = int(height / prep.crop_pct), int(width / prep.crop_pct)
            ratio = max(scale_w / img.size[0], scale_h / img.size[1])
            resample = Image.BICUBIC if prep.interpolation == "bicubic" else Image.BILINEAR
            img = img.resize(
                (max(width, round(img.size[0] * ratio)), max(height, round(img.size[1] * ratio))), resample
            )
            left, top = (img.size[0] - width) // 2, (img.size[1] - height) // 2
            img = img.crop((left, top, left + width, top + height))
        return np.array(img, dtype=np.uint8)


def _cache_dir() -> Path:
    return Path(os.environ.get("DYNCONVERT_CACHE", Path.home() / ".cache" / "dynconvert"))


@dataclass
class ConversionData:
    """The three splits of one conversion and where each came from."""

    fit: ImageSplit
    calibration: ImageSplit
    evaluation: ImageSplit
    num_classes: int
    class_names: list[str]


def load_conversion_data(config: DataConfig, prep: Preprocess, seed: int = 0) -> ConversionData:
    """Load, decode and split the data: fit, calibration (held out of fit unless the data
    has a validation split) and evaluation."""
    dsd = open_dataset(config)
    fit_name, cal_name, eval_name = choose_splits(list(dsd.keys()), config)
    image_col, label_col = find_columns(dsd[fit_name].features, config)
    label_feature = dsd[fit_name].features[label_col]
    num_classes = label_feature.num_classes
    fit = decode_split(dsd[fit_name], image_col, label_col, prep, fit_name, config.max_train_samples, seed)
    evaluation = decode_split(dsd[eval_name], image_col, label_col, prep, eval_name, config.max_eval_samples, seed)
    if cal_name:
        calibration = decode_split(dsd[cal_name], image_col, label_col, prep, cal_name, config.max_eval_samples, seed)
    else:
        order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed))
        n_cal = max(1, int(round(len(fit) * config.calibration_fraction)))
        calibration = fit.subset(order[:n_cal], f"{fit_name}[held-out {n_cal}]")
        fit = fit.subset(order[n_cal:], f"{fit_name}[{len(fit) - n_cal} not held out]")
    for split in (fit, calibration, evaluation):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            raise DynconvertError(f"split '{split.name}' has labels outside 0..{num_classes - 1}")
    return ConversionData(fit, calibration, evaluation, num_classes, list(label_feature.names))
