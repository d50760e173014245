"""Where a resolution cascade's batch-1 time goes: the model alone at each stage's size, and
the antialiased resize that brings the prepared input to it.

    python bench/resolution_stages.py [MODEL_DIR] [--images 50] [--rounds 5]

MODEL_DIR is a resolution conversion's output folder (default: bench/out's Lite0 one). On the
CPU in channels-last, as the conversion runs there, each stage (resize and model) and each part
alone is timed at batch 1 on the evaluation split's first images, in turns over ``--rounds``
rounds; the median per image is kept. Shows how far each size's time falls short of its FLOPs.
Writes bench/results/resolution_stages.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import OUT, machine, write_result

import dynconvert
from dynconvert.toolkit.data import load_conversion_data, normalize


def per_image_ms(fn, images: torch.Tensor) -> float:
    with torch.inference_mode():
        fn(images[:1])
        start = time.perf_counter()
        for i in range(len(images)):
            fn(images[i : i + 1])
    return 1000 * (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=OUT / "resolution-tf_efficientnet_lite0-tiny-imagenet")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dyn = dynconvert.load(args.folder).eval()
    split = load_conversion_data(dyn.recipe.data, dyn.preprocess, dyn.recipe.seed).evaluation
    x = normalize(split.images[: args.images], dyn.preprocess).contiguous(memory_format=torch.channels_last)
    parts = {}
    for k, stage in enumerate(dyn.stages):
        size = "x".join(map(str, dyn.plan["stage_input_sizes"][k]))
        adapter, network = (stage[0], stage[1]) if isinstance(stage, torch.nn.Sequential) else (None, stage)
        parts[f"stage {size}"] = stage
        if adapter is not None:
            parts[f"resize to {size}"] = adapter
            small = adapter(x[:1])
            parts[f"model at {size}"] = lambda images, network=network, small=small: network(small)
    times = {name: [] for name in parts}
    for _ in range(args.rounds):
        for name, fn in parts.items():
            times[name].append(per_image_ms(fn, x))
    medians = {name: statistics.median(t) for name, t in times.items()}
    static = medians[f"stage {'x'.join(map(str, dyn.plan['stage_input_sizes'][-1]))}"]
    flops = {f"stage {'x'.join(map(str, s))}": f for s, f in zip(dyn.plan["stage_input_sizes"], dyn.stage_flops)}
    rows = {
        name: {
            "ms": round(ms, 3),
            "time_vs_native": round(ms / static, 3),
            "flops_vs_native": round(flops[name] / dyn.static_flops(), 3) if name in flops else None,
        }
        for name, ms in medians.items()
    }
    for name, row in rows.items():
        print(f"{name:>20}: {row['ms']:7.2f} ms  time {row['time_vs_native']:.3f}  FLOPs {row['flops_vs_native']}")
    write_result(
        "resolution_stages",
        {
            "command": " ".join(["python", "bench/resolution_stages.py", *sys.argv[1:]]),
            "folder": args.folder.name,
            "images": args.images,
            "rounds": args.rounds,
            "batch": 1,
            "memory_format": "channels_last",
            "parts": rows,
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
