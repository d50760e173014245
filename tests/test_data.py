"""Data loading on the tiny parquet data set: splits, decoding, the on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dynconvert.errors import DynconvertError
from dynconvert.recipe import DataConfig
from dynconvert.toolkit.data import Preprocess, load_conversion_data

PREP = Preprocess(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_splits_and_decoded_images(tiny_data):
    data = load_conversion_data(DataConfig(path=str(tiny_data)), PREP, seed=0)
    assert (len(data.fit), len(data.calibration), len(data.evaluation)) == (86, 10, 48)
    assert data.evaluation.name == "test" and data.calibration.name == "train[held-out 10]"
    assert data.num_classes == 3 and data.class_names == ["red", "green", "blue"]
    images = data.evaluation.images
    assert images.dtype == torch.uint8 and images.shape == (48, 3, 32, 32)
    # the fixture's promise: the class is the dominant colour
    for split in (data.fit, data.calibration, data.evaluation):
        assert torch.equal(split.images.float().mean((2, 3)).argmax(1), split.labels)
    # held-out calibration images are not in the fit split
    fit = {bytes(img.numpy()) for img in data.fit.images}
    assert not any(bytes(img.numpy()) in fit for img in data.calibration.images)


def test_decoded_pixels_are_cached_under_dynconvert_cache(tiny_data):
    cache = Path(os.environ["DYNCONVERT_CACHE"])
    assert "dynconvert-tests-" in str(cache)  # never ~/.cache during tests
    config = DataConfig(path=str(tiny_data), max_eval_samples=20)
    first = load_conversion_data(config, PREP)
    entries = set(cache.glob("*.pt"))
    assert entries
    again = load_conversion_data(config, PREP)
    assert set(cache.glob("*.pt")) == entries
    assert torch.equal(first.evaluation.images, again.evaluation.images) and len(again.evaluation) == 20


@pytest.mark.parametrize(
    "config,expected",
    [
        (dict(image_column="image"), "no column 'image'"),
        (dict(train_split="training"), "no split 'training'"),
        (dict(eval_split="validation"), "no evaluation split"),
    ],
)
def test_data_errors_name_the_problem(tiny_data, config, expected):
    with pytest.raises(DynconvertError, match=expected):
        load_conversion_data(DataConfig(path=str(tiny_data), **config), PREP)


def test_missing_data_folder(tmp_path):
    with pytest.raises(DynconvertError, match="could not load data set"):
        load_conversion_data(DataConfig(path=str(tmp_path / "nope")), PREP)
