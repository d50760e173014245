"""Data loading on the tiny parquet data set: splits, decoding, the on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dynconvert.errors import DynconvertError
from dynconvert.recipe import DataConfig
from dynconvert.toolkit.data import Preprocess, SourceImages, load_conversion_data, normalize
from dynconvert.toolkit.rowfile import RowFile
from dynconvert.toolkit.train import batches

PREP = Preprocess(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_splits_and_decoded_images(tiny_data):
    data = load_conversion_data(DataConfig(path=str(tiny_data)), PREP, seed=0)
    assert (len(data.fit), len(data.calibration), len(data.evaluation)) == (86, 10, 48)
    assert data.evaluation.name == "test" and data.calibration.name == "train[held-out 10]"
    assert data.num_classes == 3 and data.class_names == ["red", "green", "blue"]
    images = data.evaluation.images[:]
    assert images.dtype == torch.uint8 and images.shape == (48, 3, 32, 32)
    # the fixture's promise: the class is the dominant colour
    for split in (data.fit, data.calibration, data.evaluation):
        assert torch.equal(split.images[:].float().mean((2, 3)).argmax(1), split.labels)
    # held-out calibration images are not in the fit split
    fit = {bytes(img.numpy()) for img in data.fit.images[:]}
    assert not any(bytes(img.numpy()) in fit for img in data.calibration.images[:])


def test_decoded_pixels_are_cached_under_dynconvert_cache(tiny_data):
    cache = Path(os.environ["DYNCONVERT_CACHE"])
    assert "dynconvert-tests-" in str(cache)  # never ~/.cache during tests
    config = DataConfig(path=str(tiny_data), max_eval_samples=20)
    first = load_conversion_data(config, PREP)
    entries = set(cache.glob("*.u8"))
    assert entries
    again = load_conversion_data(config, PREP)
    assert set(cache.glob("*.u8")) == entries
    assert torch.equal(first.evaluation.images[:], again.evaluation.images[:]) and len(again.evaluation) == 20


def _counting_decodes(monkeypatch) -> list[int]:
    import dynconvert.toolkit.data as data_module

    calls, decode = [], data_module._decode
    monkeypatch.setattr(data_module, "_decode", lambda item, prep: calls.append(1) or decode(item, prep))
    return calls


def _read_twice(split) -> torch.Tensor:
    passes = [torch.cat([x for x, _, _ in batches(split, PREP, 16, "cpu")]) for _ in range(2)]
    assert torch.equal(passes[0], passes[1])
    return passes[0]


def test_without_the_cache_every_pass_decodes_and_nothing_is_kept(tiny_data, monkeypatch):
    calls = _counting_decodes(monkeypatch)
    data = load_conversion_data(DataConfig(path=str(tiny_data), cache=False, workers=0), PREP)
    assert not calls, "loading reads labels only"
    assert isinstance(data.evaluation.images, SourceImages)
    assert not any(isinstance(v, (list, torch.Tensor)) for v in vars(data.evaluation.images).values())
    _read_twice(data.evaluation)
    assert len(calls) == 2 * len(data.evaluation)


def test_with_the_cache_each_image_is_decoded_once_into_a_file_read_by_rows(tiny_data, monkeypatch, tmp_path):
    monkeypatch.setenv("DYNCONVERT_CACHE", str(tmp_path))
    calls = _counting_decodes(monkeypatch)
    data = load_conversion_data(DataConfig(path=str(tiny_data), workers=0, max_eval_samples=30), PREP)
    assert len(calls) == len(data.fit) + len(data.calibration) + len(data.evaluation)
    calls.clear()
    rows = data.evaluation.images
    assert isinstance(rows, RowFile) and rows.path.stat().st_size == 30 * 3 * 32 * 32
    _read_twice(data.evaluation)
    assert not calls


def test_decoding_in_worker_processes_gives_the_same_batches(tiny_data):
    alone = load_conversion_data(DataConfig(path=str(tiny_data), cache=False, workers=0), PREP)
    shared = load_conversion_data(DataConfig(path=str(tiny_data), cache=False, workers=2), PREP)
    assert torch.equal(_read_twice(alone.calibration), _read_twice(shared.calibration))


def test_row_file_reads_rows_in_any_order(tmp_path):
    rows = RowFile.create(tmp_path / "rows.f32", (2, 3), "float32", 10)
    data = torch.arange(60, dtype=torch.float32).view(10, 2, 3)
    rows.write(0, data[:4])
    rows.write(4, data[4:])
    order = torch.tensor([7, 8, 9, 0, 3, 2])
    assert torch.equal(rows[order], data[order])
    assert torch.equal(rows[2:6], data[2:6]) and torch.equal(rows[5], data[5])
    with pytest.raises(IndexError):
        rows[torch.tensor([10])]


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


def test_backbone_outputs_go_to_disk_and_a_resumed_run_opens_them_again(tiny_data, tmp_path):
    from dynconvert.toolkit.checkpoint import Checkpointer
    from dynconvert.toolkit.train import map_batches

    split = load_conversion_data(DataConfig(path=str(tiny_data), workers=0), PREP).evaluation
    runs = []

    def compute(folder):
        runs.append(folder)
        return map_batches(lambda x: (x.mean((2, 3)), x[:, :, :2, :2]), split, PREP, 16, "cpu", "f", to_disk=folder)

    first = Checkpointer(tmp_path / "work", "recipe-a").cached_rows("features", compute)
    assert all(isinstance(f, RowFile) for f in first) and [f.shape for f in first] == [(3,), (3, 2, 2)]
    x = normalize(split.images[:], PREP)
    torch.testing.assert_close(first[0][:], x.mean((2, 3)))
    again = Checkpointer(tmp_path / "work", "recipe-a", resume=True).cached_rows("features", compute)
    assert len(runs) == 1 and torch.equal(again[1][:], first[1][:])
    Checkpointer(tmp_path / "work", "recipe-b").cached_rows("features", compute)
    assert len(runs) == 2, "another recipe's cache is not trusted"
    assert Checkpointer.disabled().cached_rows("features", compute)[0].shape == (48, 3)


def test_decoding_in_workers_leaves_the_global_random_state_alone(tiny_data):
    # else a conversion would train differently depending on whether the cache was warm
    split = load_conversion_data(DataConfig(path=str(tiny_data), cache=False, workers=2), PREP).evaluation
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _read_twice(split)
    assert torch.equal(torch.rand(3), expected)
