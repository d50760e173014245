"""Does shrinking the prepared native-size input equal resizing the original image?

    python bench/resize_paths.py [--per-class 5] [--sizes 112 168]

The resolution cascade prepares each image once at the model's native size and shrinks it
per stage (antialiased, in the model's interpolation). This compares, for EfficientNet-Lite0
(ImageNet-1k weights) on the first images of each Tiny-ImageNet validation class (200-way,
logits restricted by WordNet id), the accuracy at each size of both paths:

- original: the 64 px original resized and centre-cropped straight to the size;
- shrunk: prepared at 224 px as the conversion does, then shrunk as a stage does.

Writes bench/results/resize_paths.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import RESULTS, SHARED, machine

import dynconvert
from dynconvert.config import ModelConfig
from dynconvert.convert.build import build_model
from dynconvert.strategies.cascade.model import InputAdapter
from dynconvert.toolkit.classes import match_classes
from dynconvert.toolkit.data import Preprocess, _decode, normalize


def prepared(files: list, prep: Preprocess) -> torch.Tensor:
    """The images of ``files`` decoded, resized and cropped as ``prep`` says, normalised."""
    images = [torch.from_numpy(_decode({"path": str(f)}, prep)).permute(2, 0, 1) for f, _ in files]
    return normalize(torch.stack(images), prep)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 168])
    args = parser.parse_args()
    folder = SHARED / "data" / "tiny-imagenet" / "validation"
    weights = SHARED / "models" / "imagenet" / "tf_efficientnet_lite0.safetensors"
    model = build_model(ModelConfig(name="tf_efficientnet_lite0", weights=str(weights))).eval()
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    keep = torch.tensor(match_classes(wnids, model, 1000).indices)
    files = [(f, c) for c, w in enumerate(wnids) for f in sorted((folder / w).iterdir())[: args.per_class]]
    labels = torch.tensor([c for _, c in files])
    native = Preprocess.from_model(model)
    started = time.perf_counter()
    results = {}
    with torch.inference_mode():
        for size in args.sizes:
            direct = Preprocess(**{**native.__dict__, "input_size": (3, size, size)})
            shrink = InputAdapter(native, native, (size, size))
            hits = {"original": 0, "shrunk": 0}
            for start in range(0, len(files), 100):
                chunk = files[start : start + 100]
                y = labels[start : start + 100]

                for path, x in (("original", prepared(chunk, direct)), ("shrunk", shrink(prepared(chunk, native)))):
                    hits[path] += int((model(x)[:, keep].argmax(1) == y).sum())
            results[str(size)] = {k: v / len(files) for k, v in hits.items()}
            print(size, results[str(size)], flush=True)
    payload = {
        "command": " ".join(["python", "bench/resize_paths.py", *sys.argv[1:]]),
        "data": f"tiny-imagenet validation, first {args.per_class} images of each of 200 classes ({len(files)})",
        "model": "tf_efficientnet_lite0, ImageNet-1k weights, 200-way",
        "accuracy": results,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "dynconvert": dynconvert.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "resize_paths.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
