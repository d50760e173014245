"""Cascades as a user types them: of two pretrained models, and of one model's input sizes.

    python bench/cascade.py [--kind models|resolution]

``models``: ``dynconvert cifar_resnet20 cifar_resnet56 --strategy cascade --weights W20 W56
--data cifar10-jpeg``, evaluated on the whole test split. ``resolution``: ``dynconvert
tf_efficientnet_lite0 --strategy resolution --weights LITE0 --data tiny-imagenet``, evaluated on
all 10,000 validation images, 200-way (the ImageNet-1k logits restricted to Tiny-ImageNet's
classes). Thresholds (and whether to average the stages' probabilities) are chosen on held-out
training images. Records each model or size alone on the evaluation split beside the cascade,
the loss against the reference (the last model, or the native size) and against the most
accurate point of the cascade's own sweep, and the conversion's wall time. Writes
bench/results/cascade.json or resolution.json (one row per variant: ``--set KEY=VALUE`` runs a
variant of the default recipe, kept beside the default's row) and the default's curve as a
PNG beside it.
"""

from __future__ import annotations

import argparse
import shutil

from common import OUT, RESULTS, SHARED, accuracy_fields, machine, run_cli, with_earlier_rows, write_result

MODELS = SHARED / "models"
KINDS = {
    "models": {
        "name": "cascade",
        "command": [
            *("cifar_resnet20", "cifar_resnet56", "--strategy", "cascade", "--weights"),
            *(str(MODELS / "resnet20-12fca82f.th"), str(MODELS / "resnet56-4bfd9763.th")),
            *("--data", str(SHARED / "data" / "cifar10-jpeg")),
        ],
        "out": "cascade-cifar_resnet20+56-cifar10-jpeg",
        "data": "cifar10-jpeg",
        "plot": "cascade_cifar_resnet20+56.png",
    },
    "resolution": {
        "name": "resolution",
        "command": [
            *("tf_efficientnet_lite0", "--strategy", "resolution", "--weights"),
            str(MODELS / "imagenet" / "tf_efficientnet_lite0.safetensors"),
            *("--data", str(SHARED / "data" / "tiny-imagenet")),
        ],
        "out": "resolution-tf_efficientnet_lite0-tiny-imagenet",
        "data": "tiny-imagenet",
        "plot": "resolution_tf_efficientnet_lite0_tiny-imagenet.png",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=sorted(KINDS), default="models")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a recipe override: a variant of the default"
    )
    args = parser.parse_args()
    kind = KINDS[args.kind]
    variant = " ".join(args.overrides) or "default"
    command = [*kind["command"], *[a for o in args.overrides for a in ("--set", o)]]
    out = OUT / (kind["out"] + ("-" + "-".join(o.replace("=", "_") for o in args.overrides) if args.overrides else ""))
    report, seconds = run_cli(command, out)
    if not args.overrides:  # the README's curve is the default's
        shutil.copy(out / "report.png", RESULTS / kind["plot"])
    alone = {p["label"]: p for p in report["sweep_on_evaluation"] if "label" in p}
    calibration = report["calibration"]
    result = {
        "variant": variant,
        "data": kind["data"],
        "command": "dynconvert " + " ".join(command),
        "classes": report["classes"],
        **accuracy_fields(report),
        "stage_histogram": report["dynamic"]["stage_histogram"],
        "alone": {name: {"accuracy": p["accuracy"], "flops_ratio": p["flops_ratio"]} for name, p in alone.items()},
        "combine": calibration["combine"],
        "agreement": calibration.get("agreement"),
        "rules_tried": calibration.get("rules_tried"),
        "calibration_stage_accuracy": calibration["calibration_stage_accuracy"],
        "batchnorm_images": calibration.get("batchnorm_images"),
        "temperatures": calibration["temperatures"],
        "chosen_on_calibration": calibration["chosen"],
        "calibration_check": report["calibration_check"],
        "latency_batch1": report["latency"],
        "conversion_seconds": seconds,
    }
    runs = with_earlier_rows(kind["name"], [result], field="runs", key=lambda r: r["variant"])
    write_result(kind["name"], {"machine": machine(), "runs": runs})
    best_alone = max(p["accuracy"] for p in alone.values())
    print(
        f"{kind['name']}: reference {100 * result['static_accuracy']:.2f}% -> "
        f"{100 * result['dynamic_accuracy']:.2f}% ({result['accuracy_change_points']:+.2f} pt; best alone "
        f"{100 * best_alone:.2f}%), FLOPs ratio {result['flops_ratio']:.3f}, {seconds / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
