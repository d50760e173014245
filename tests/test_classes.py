"""A data set whose classes are a subset of the model's (an ImageNet image folder named by
WordNet id, or classes named as the model's labels): matched by name, logits restricted for
the static and the converted model alike; and caps that sample every class of a sorted folder."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import make_colour_images

import dynconvert
from dynconvert.toolkit.classes import ClassSubset, match_classes
from dynconvert.toolkit.data import stratified_sample

WNIDS = ["n01443537", "n01440764", "n01484850"]  # goldfish, tench, great white shark: ImageNet-1k 1, 0, 2


@pytest.fixture(scope="module")
def imagenet_model():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).eval()


def test_wordnet_ids_are_matched_to_the_models_outputs(imagenet_model):
    match = match_classes(WNIDS, imagenet_model, 1000)
    assert match.indices == [1, 0, 2] and match.how == "WordNet ids"


def test_label_names_are_matched_too(imagenet_model):
    match = match_classes(["goldfish", "Tench", "great white shark"], imagenet_model, 1000)
    assert match.indices == [1, 0, 2] and match.how == "label names"


def test_names_that_match_nothing_get_one_error_with_examples_of_both_sides(imagenet_model):
    with pytest.raises(dynconvert.DynconvertError) as error:
        match_classes(["n01443537", "red", "blue"], imagenet_model, 1000)
    message = str(error.value)
    assert "2 of the data set's 3 classes" in message and "'red'" in message
    assert "'n01440764'" in message and "'tench'" in message


def test_as_many_classes_as_the_model_are_taken_as_they_are(imagenet_model):
    assert match_classes([f"c{i}" for i in range(1000)], imagenet_model, 1000) is None


def test_restricted_logits_are_the_models_own_at_those_classes(imagenet_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full, restricted = imagenet_model(x), ClassSubset(imagenet_model, [1, 0, 2])(x)
    assert torch.equal(restricted, full[:, [1, 0, 2]])


def test_a_cap_on_a_folder_sorted_by_class_samples_every_class():
    labels = torch.arange(200).repeat_interleave(200)  # 40,000 images, sorted by class
    chosen = stratified_sample(labels, 1000, seed=3)
    counts = torch.bincount(labels[chosen], minlength=200)
    assert len(set(chosen.tolist())) == 1000 and counts.min() == counts.max() == 5
    assert not torch.equal(chosen, stratified_sample(labels, 1000, seed=4)), "the sample follows the seed"


@pytest.fixture(scope="module")
def wordnet_folder(tmp_path_factory):
    """An image folder sorted by class, its three folders named by ImageNet WordNet ids."""
    root = tmp_path_factory.mktemp("wordnet")
    for split, n, seed in (("train", 36, 5), ("validation", 12, 6)):
        images, labels = make_colour_images(n, seed, side=32)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / WNIDS[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:03d}.jpg")
    return root


def test_conversion_on_a_subset_folder_restricts_logits_and_reloads(wordnet_folder, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, pretrained_cfg_overlay={"input_size": (3, 32, 32)})
    out = tmp_path / "out"
    dyn = dynconvert.convert(
        [model, model],
        strategy="cascade",
        data=str(wordnet_folder),
        out=out,
        model_name="resnet18",
        data__max_train_samples=24,
        evaluate__latency_samples=0,
    )
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == {  # the folder's classes in sorted order: tench, goldfish, shark
        "indices": [0, 1, 2],
        "how": "WordNet ids",
        "data_classes": 3,
        "model_classes": 1000,
    }
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert dyn(x).shape == (4, 3)
        assert torch.equal(dyn.route(x).logits, dynconvert.load(out, model=[model, model]).route(x).logits)
