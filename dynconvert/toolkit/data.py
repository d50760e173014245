"""Image classification data: find the columns, sample by class, read images lazily.

No step holds a decoded split in memory. Images are decoded, resized and centre-cropped to
the model's input size in DataLoader worker processes, batch by batch. With ``data.cache``
(the default) each image is decoded once into a flat file of uint8 rows on disk
(``$DYNCONVERT_CACHE``, default ``~/.cache/dynconvert``) that later passes and later runs
read by row; without it every pass decodes from the data set. Normalisation happens per
batch in :func:`normalize`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dynconvert.config import DataConfig
from dynconvert.errors import DynconvertError
from dynconvert.progress import progress_bar
from dynconvert.toolkit import distributed
from dynconvert.toolkit.rowfile import RowFile

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
    """The images and integer labels of one split.

    ``images`` is indexed by rows and gives uint8 ``N x C x H x W`` batches: a ``RowFile`` (the
    decoded-image cache on disk), a ``SourceImages`` (decoded from the data set on demand), a
    ``RowView`` of either, or a tensor. Nothing holds the decoded split in memory but a tensor.
    ``workers``: processes that decode batches of a split read from the data set itself.
    """

    images: Any
    labels: torch.Tensor
    name: str
    workers: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor | slice, name: str) -> ImageSplit:
        """Rows ``index`` of this split (a view: nothing is read)."""
        index = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index)
        images = self.images[index] if isinstance(self.images, torch.Tensor) else RowView(self.images, index)
        return ImageSplit(images, self.labels[index], name, self.workers)


class RowView:
    """Rows ``index`` of another row source, read through it on demand."""

    def __init__(self, base, index: torch.Tensor):
        if isinstance(base, RowView):  # a view of a view reads the first source directly
            base, index = base.base, base.index[index]
        self.base, self.index = base, torch.as_tensor(index, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self.base[int(self.index[index])]
        return self.base[self.index[index if not isinstance(index, list) else torch.tensor(index)]]


class SourceImages:
    """The images of a data set split (a ``datasets.Dataset`` with undecoded images), decoded
    and brought to the model's input size on demand, row by row: no row is kept."""

    def __init__(self, raw, column: str, prep: Preprocess):
        self.raw, self.column, self.prep = raw, column, prep

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return self[[int(index)]][0]
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).reshape(-1)
        items = self.raw[rows.tolist()][self.column] if len(rows) else []
        _, height, width = self.prep.input_size
        out = torch.empty((len(items), 3, height, width), dtype=torch.uint8)
        for i, item in enumerate(items):
            out[i] = torch.from_numpy(_decode(item, self.prep)).permute(2, 0, 1)
        return out


def read_batches(split: ImageSplit, batches: list[torch.Tensor]):
    """Yield ``(rows, uint8 images)`` for each tensor of row indices in ``batches``: decoded in
    ``split.workers`` DataLoader processes when the images come from the data set itself."""
    if split.workers == 0 or _read_cheaply(split.images) or len(batches) <= 1:
        for rows in batches:
            yield rows, split.images[rows]
        return
    # a generator of its own: the workers' seeds would otherwise be drawn from the global one,
    # and a conversion would train differently depending on whether the cache was warm
    loader = torch.utils.data.DataLoader(
        _Batches(split.images, batches),
        batch_size=None,
        shuffle=False,
        num_workers=split.workers,
        generator=torch.Generator().manual_seed(0),
    )
    yield from zip(batches, loader)


class _Batches(torch.utils.data.Dataset):
    """Batch ``k`` of a list of row batches: what a DataLoader worker decodes at once."""

    def __init__(self, images, batches: list[torch.Tensor]):
        self.images, self.batches = images, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.images[self.batches[k]]


def _read_cheaply(images) -> bool:
    """Whether rows come from memory or the decoded cache (no decoding to share out)."""
    base = images.base if isinstance(images, RowView) else images
    return not isinstance(base, SourceImages)


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


def decode_split(
    dataset, image_column: str, label_column: str, prep: Preprocess, name: str, limit=None, seed: int = 0, **how
):
    """One split as an :class:`ImageSplit` whose images are read lazily.

    ``limit`` caps the images by a class-stratified, seeded sample (``stratified_sample``).
    ``how``: ``cache`` (default True) decodes every image once into a ``RowFile`` under
    ``$DYNCONVERT_CACHE`` that later passes and later runs read; without it each pass decodes
    from the data set. ``workers`` decode in parallel (DataLoader processes).
    """
    import datasets

    cache, workers = how.get("cache", True), how.get("workers", 0)
    if limit is not None and limit < len(dataset):
        labels = torch.tensor(np.asarray(dataset[label_column]), dtype=torch.long)
        dataset = dataset.select(stratified_sample(labels, limit, seed).tolist())
    raw = dataset.cast_column(image_column, datasets.Image(decode=False))
    labels = torch.tensor(np.asarray(raw[label_column]), dtype=torch.long)
    source = SourceImages(raw, image_column, prep)
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not cache or not fingerprint:
        return ImageSplit(source, labels, name, workers)
    key = repr((fingerprint, image_column, label_column, prep.input_size, prep.crop_pct, prep.interpolation))
    path = _cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.u8"
    rows = RowFile(path, tuple(prep.input_size), "uint8", len(source))
    if not path.is_file() or path.stat().st_size != rows.row_bytes * len(source):
        # a missing or damaged entry is rebuilt, never trusted
        fill_cache(ImageSplit(source, labels, name, workers), path, rows.shape)
    return ImageSplit(rows, labels, name, workers)


def fill_cache(split: ImageSplit, path: Path, shape: tuple[int, ...]) -> None:
    """Decode every image of ``split`` (``shape`` each) into a ``RowFile`` at ``path``: written under a
    temporary name and moved into place when complete. Under torchrun the ranks on one machine
    decode their shares into one file (the cache folder may be the machine's own; the
    temporary name is, so machines sharing the folder never write into one another's file)."""
    partial = path.with_name(f"{path.name}.{socket.gethostname()}.partial")
    first = distributed.local_rank() == 0
    if first:
        RowFile.create(partial, shape, "uint8", len(split))
    distributed.barrier()
    rows = RowFile(partial, shape, "uint8", len(split))
    mine = distributed.my_local_rows(len(split))
    with progress_bar(total=len(mine), desc=f"decode {split.name}", unit="img", mininterval=1.0) as bar:
        for index, images in read_batches(split, list(mine.split(64))):
            # a rank's rows are contiguous: each batch is one run of them
            rows.write(int(index[0]), images)
            bar.update(len(index))
    rows.close()
    distributed.barrier()
    if first:
        os.replace(partial, path)
    distributed.barrier()


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


def data_workers(config: DataConfig) -> int:
    """DataLoader processes that decode images: the recipe's ``data.workers``, else one per CPU
    core this process may use, at most 8."""
    if config.workers is not None:
        return config.workers
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


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
    how = {"cache": config.cache, "workers": data_workers(config)}
    fit = decode_split(dsd[fit_name], image_col, label_col, prep, fit_name, config.max_train_samples, seed, **how)
    evaluation = decode_split(
        dsd[eval_name], image_col, label_col, prep, eval_name, config.max_eval_samples, seed, **how
    )
    if cal_name:
        calibration = decode_split(
            dsd[cal_name], image_col, label_col, prep, cal_name, config.max_eval_samples, seed, **how
        )
    else:
        order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed))
        n_cal = max(1, int(round(len(fit) * config.calibration_fraction)))
        calibration = fit.subset(order[:n_cal], f"{fit_name}[held-out {n_cal}]")
        fit = fit.subset(order[n_cal:], f"{fit_name}[{len(fit) - n_cal} not held out]")
    for split in (fit, calibration, evaluation):
        if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
            raise DynconvertError(f"split '{split.name}' has labels outside 0..{num_classes - 1}")
    return ConversionData(fit, calibration, evaluation, num_classes, list(label_feature.names))
