"""The fair baseline for joint fine-tuning: the static network fine-tuned on the same data for the same time.

    python bench/static_finetune.py [--seconds S]

BlockDrop's joint fine-tuning (``bench/block_skip.py --strategy blockdrop --variants finetune``)
trains the backbone together with the policy. Part of any accuracy it gains may come from the
training alone (the pretrained ResNet-56 never saw these JPEG images). This script gives the
static ResNet-56 the same chance: the same fit split, the same optimiser settings (AdamW at
``options.backbone_lr``, weight decay, a cosine schedule over the budget, BatchNorm statistics frozen, cross-entropy
plus self-distillation from the original network as in joint fine-tuning) for the same wall-clock
time: by default the fine-tuning run's conversion time minus the default run's (read from
bench/results/blockdrop.json). Evaluates on the whole test split; writes
bench/results/static_finetune.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from common import RESULTS, SHARED, machine, write_result
from tqdm.auto import tqdm

from dynconvert.convert.build import build_model
from dynconvert.convert.evaluate import evaluate_static
from dynconvert.recipe import build_recipe, strategy_config
from dynconvert.toolkit.data import Preprocess, load_conversion_data
from dynconvert.toolkit.train import distillation_loss, map_batches, train_batches


def joint_finetune_seconds() -> float:
    runs = {r["variant"]: r for r in json.loads((RESULTS / "blockdrop.json").read_text())["runs"]}
    return runs["finetune"]["conversion_seconds"] - runs["default"]["conversion_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, help="training budget (default: joint fine-tuning's time)")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else joint_finetune_seconds()
    overrides = [
        f"model.weights={SHARED / 'models' / 'resnet56-4bfd9763.th'}",
        f"data.path={SHARED / 'data' / 'cifar10-jpeg'}",
    ]
    recipe = build_recipe(None, "cifar_resnet56", "blockdrop", overrides)
    cfg = recipe.train
    backbone_lr = strategy_config(recipe).backbone_lr  # the joint fine-tuning's rate (a BlockDrop option)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model).eval()
    prep = Preprocess.from_model(model)
    data = load_conversion_data(recipe.data, prep, recipe.seed)
    before = evaluate_static(model, data.evaluation, prep, recipe.data.batch_size, recipe.device)
    (teacher,) = map_batches(model, data.fit, prep, recipe.data.batch_size, recipe.device, "teacher logits")
    student = copy.deepcopy(model).eval()  # BatchNorm statistics stay as they are, as in joint fine-tuning
    params = [p for p in student.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=backbone_lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(data.fit) / cfg.batch_size)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    started, steps, epochs = time.perf_counter(), 0, 0.0
    with tqdm(total=int(seconds), desc="static fine-tuning", unit="s") as bar:
        while time.perf_counter() - started < seconds:
            order = torch.randperm(len(data.fit), generator=generator)
            for images, labels, index, _ in train_batches(data.fit, prep, cfg.batch_size, recipe.device, order):
                out = student(images)
                loss = distillation_loss(out, labels, teacher[index], cfg.distill_temperature, cfg.distill_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                progress = min(1.0, (time.perf_counter() - started) / seconds)
                for group in optimizer.param_groups:  # cosine schedule over the time budget
                    group["lr"] = backbone_lr * 0.5 * (1 + math.cos(math.pi * progress))
                optimizer.step()
                steps += 1
                bar.n = min(int(time.perf_counter() - started), int(seconds))
                bar.refresh()
                if time.perf_counter() - started >= seconds:
                    break
            epochs = steps / steps_per_epoch
    trained = time.perf_counter() - started
    after = evaluate_static(student.eval(), data.evaluation, prep, recipe.data.batch_size, recipe.device)
    result = {
        "machine": machine(),
        "data": "cifar10-jpeg",
        "fit_split": data.fit.name,
        "fit_images": len(data.fit),
        "evaluation_split": data.evaluation.name,
        "evaluated_samples": len(data.evaluation),
        "budget_seconds": seconds,
        "trained_seconds": trained,
        "steps": steps,
        "epochs": epochs,
        "static_accuracy": before["accuracy"],
        "finetuned_static_accuracy": after["accuracy"],
    }
    write_result("static_finetune", result)
    print(
        f"static {100 * before['accuracy']:.2f}% -> fine-tuned {100 * after['accuracy']:.2f}% "
        f"after {epochs:.2f} epochs in {trained / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
