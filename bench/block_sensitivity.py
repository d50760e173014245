"""How much a frozen backbone tolerates dropped residual blocks, without any learning.

    python bench/block_sensitivity.py [--images 2000]

On the calibration part of cifar10-jpeg's train split (held out exactly as a conversion holds it
out), drops each residual block of the pretrained ResNet-56 alone, leaving the bare shortcut (no
skip correction), then the k least harmful together, and records the accuracy lost. Writes
bench/results/block_sensitivity.json.
"""

from __future__ import annotations

import argparse

import torch
from common import SHARED, machine, write_result

from dynconvert.convert.build import build_model
from dynconvert.recipe import build_recipe, strategy_config
from dynconvert.strategies import get_strategy
from dynconvert.toolkit.data import Preprocess, load_conversion_data, normalize


@torch.inference_mode()
def accuracy(dyn, x, y, keep) -> float:
    return float((dyn.run_fixed(x, keep).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    overrides = [
        f"model.weights={SHARED / 'models' / 'resnet56-4bfd9763.th'}",
        f"data.path={SHARED / 'data' / 'cifar10-jpeg'}",
        "options.skip_correction=none",  # a bare shortcut where the dropped block was
    ]
    recipe = build_recipe(None, "cifar_resnet56", "skipnet", overrides)
    model = build_model(recipe.model)
    prep = Preprocess.from_model(model)
    split = load_conversion_data(recipe.data, prep, recipe.seed).calibration
    strategy = get_strategy("skipnet")
    dyn = strategy.prepare(model, recipe, strategy_config(recipe), torch.randn(2, *prep.input_size), 10)
    x, y = normalize(split.images[: args.images], prep), split.labels[: args.images]
    n = dyn.num_blocks
    full = accuracy(dyn, x, y, [True] * n)
    single = [full - accuracy(dyn, x, y, [j != i for j in range(n)]) for i in range(n)]
    order = sorted(range(n), key=lambda i: single[i])
    cumulative = []
    for k in range(1, 11):
        keep = [i not in order[:k] for i in range(n)]
        cumulative.append({"dropped": k, "blocks": order[:k], "accuracy_drop": full - accuracy(dyn, x, y, keep)})
    names = [u for u, d in zip(dyn.plan["units"], dyn.droppable) if d]
    write_result(
        "block_sensitivity",
        {
            "machine": machine(),
            "data": "cifar10-jpeg",
            "split": split.name,
            "images": len(y),
            "static_accuracy": full,
            "single_block_drop": dict(zip(names, single)),
            "least_harmful_dropped_together": cumulative,
        },
    )
    print(f"static {full:.4f}; single-block drops: min {min(single):.4f}, median {sorted(single)[n // 2]:.4f}")
    for row in cumulative:
        print(f"drop {row['dropped']} least harmful blocks: -{row['accuracy_drop']:.4f}")


if __name__ == "__main__":
    main()
