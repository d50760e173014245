"""Shared fixtures: a tiny colour-coded image data set on disk, caches kept out of ~/.cache,
tiny models, and the shared real assets (skipped where absent)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports `datasets` or `tqdm`: keep every cache of the test session in a
# temporary folder, never touch the network, and keep progress bars out of the output.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="dynconvert-tests-"))
os.environ["DYNCONVERT_CACHE"] = str(_SESSION_TMP / "dynconvert-cache")
os.environ["HF_DATASETS_CACHE"] = str(_SESSION_TMP / "hf-datasets")
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(_SESSION_TMP / "hypothesis")
os.environ.setdefault("MPLCONFIGDIR", str(_SESSION_TMP / "matplotlib"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from threads, and several threads on a busy machine make every
# convolution wait for the slowest core (a hundredfold slowdown on 2 shared cores).
torch.set_num_threads(int(os.environ.get("DYNCONVERT_TEST_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["red", "green", "blue"]
N_TRAIN, N_TEST, SIDE = 96, 48, 32


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


# overrides that keep a whole conversion on the tiny data set within a few seconds
TINY_RUN = dict(
    model__pretrained=False,
    model__num_classes=3,
    train__batch_size=32,
    data__batch_size=32,
    evaluate__latency_samples=2,
)


def convert_tiny(strategy: str, data, weights, out, **kwargs):
    """A ``cifar_resnet20`` conversion on tiny data with ``TINY_RUN`` settings; ``kwargs`` add recipe keys."""
    import dynconvert

    return dynconvert.convert(
        "cifar_resnet20",
        strategy=strategy,
        data=str(data),
        out=out,
        model__weights=str(weights),
        **TINY_RUN,
        **kwargs,
    )


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    np.random.seed(0)


def make_colour_images(n: int, seed: int, side: int = SIDE):
    """``n`` RGB images whose class (0 red, 1 green, 2 blue) is the dominant colour, plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    labels = [i % len(CLASS_NAMES) for i in range(n)]
    rng.shuffle(labels)
    images = []
    for label in labels:
        pixels = rng.integers(0, 90, size=(side, side, 3))
        pixels[..., label] += rng.integers(120, 166)
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB"))
    return images, labels


def write_image_parquet(folder: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """A Hugging Face parquet data set (``train.parquet``, ``test.parquet``) with ``img`` and ``label``."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = make_colour_images(n, seed)
        ds = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        ds.to_parquet(str(folder / f"{split}.parquet"))
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Folder with train.parquet (96 images) and test.parquet (48), 32x32, 3 colour classes."""
    return write_image_parquet(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A seeded random cifar_resnet20 (3 classes) saved as a plain state dict.

    Conversions of a model without pretrained weights need a file, so that loading rebuilds
    the same backbone.
    """
    import timm

    import dynconvert  # noqa: F401  (registers the CIFAR ResNets)

    torch.manual_seed(1234)
    model = timm.create_model("cifar_resnet20", num_classes=3)
    path = tmp_path_factory.mktemp("weights") / "cifar_resnet20-3cls.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared real assets: ``$DYNCONVERT_SHARED``, default ``<repo>/../shared``; skip when absent."""
    path = Path(os.environ.get("DYNCONVERT_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared assets folder {path} not found (set DYNCONVERT_SHARED)")
    return path


def shared_file(shared_dir: Path, relative: str) -> Path:
    """A file under the shared folder, or skip the test."""
    path = shared_dir / relative
    if not path.is_file():
        pytest.skip(f"shared asset {path} not found")
    return path


@pytest.fixture
def prepare_early_exit():
    """``prepare(model, **overrides) -> EarlyExitModel``, as ``convert_recipe`` calls the strategy.

    ``overrides`` are dotted recipe keys (``{"options.fractions": [0.3, 0.6]}``); the model
    is put in eval mode and keeps its own number of classes.
    """
    from dynconvert.recipe import build_recipe, strategy_config
    from dynconvert.strategies import get_strategy
    from dynconvert.toolkit.data import Preprocess

    def prepare(model, name: str = "cifar_resnet20", overrides: dict | None = None):
        recipe = build_recipe(model=name, overrides={"model.pretrained": False, **(overrides or {})})
        strategy = get_strategy(recipe.strategy)
        config = strategy_config(recipe, strategy)
        prep = Preprocess.from_model(model)
        example = torch.randn(2, *prep.input_size)
        model.eval()
        dyn = strategy(config).prepare([model], recipe, example, model.num_classes)
        dyn.recipe, dyn.preprocess = recipe, prep  # as the pipeline records them (export reads both)
        return dyn

    return prepare


@pytest.fixture(scope="session")
def tiny_imagenet_style_data(tmp_path_factory) -> Path:
    """An imagefolder with ``train`` (12 images) and ``validation`` (6) of odd sizes, as JPEG."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, n, seed in (("train", 12, 3), ("validation", 6, 4)):
        images, labels = make_colour_images(n, seed, side=40)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.resize((48, 40)).save(folder / f"{i}.jpg")
    return root
