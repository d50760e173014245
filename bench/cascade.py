"""The model cascade of the two pretrained CIFAR-10 ResNets, as a user types it.

    python bench/cascade.py [--data cifar10-jpeg]

``dynconvert cifar_resnet20 cifar_resnet56 --strategy cascade --weights W20 W56 --data DATA``:
thresholds (and whether to average the stages' probabilities) chosen on a fifth of the train
split held out, evaluation on the whole test split. Records each model alone on the test split
beside the cascade, the loss against ResNet-56 alone and against the most accurate point of the
cascade's own sweep, and the conversion's wall time. Writes bench/results/cascade.json and
bench/results/cascade_cifar_resnet20+56.png (the report's curve, each model alone marked).
"""

from __future__ import annotations

import argparse
import shutil

from common import OUT, RESULTS, SHARED, machine, run_cli, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="cifar10-jpeg")
    args = parser.parse_args()
    models = SHARED / "models"
    command = ["cifar_resnet20", "cifar_resnet56", "--strategy", "cascade", "--weights"]
    command += [str(models / "resnet20-12fca82f.th"), str(models / "resnet56-4bfd9763.th")]
    command += ["--data", str(SHARED / "data" / args.data)]
    out = OUT / f"cascade-cifar_resnet20+56-{args.data}"
    report, seconds = run_cli(command, out)
    shutil.copy(out / "report.png", RESULTS / "cascade_cifar_resnet20+56.png")
    alone = {p["label"]: p for p in report["sweep_on_evaluation"] if "label" in p}
    calibration = report["calibration"]
    result = {
        "machine": machine(),
        "data": args.data,
        "command": "dynconvert " + " ".join(command),
        "splits": report["splits"],
        "evaluated_samples": report["evaluated_samples"],
        "reference_accuracy": report["static"]["accuracy"],
        "dynamic_accuracy": report["dynamic"]["accuracy"],
        "accuracy_change_points": 100 * report["accuracy_change"],
        "accuracy_drop_vs_best_point_points": 100 * report["accuracy_drop_vs_best_point"],
        "flops_ratio": report["flops_ratio"],
        "stage_histogram": report["dynamic"]["stage_histogram"],
        "models_alone": {
            name: {"accuracy": p["accuracy"], "flops_ratio": p["flops_ratio"]} for name, p in alone.items()
        },
        "combine": calibration["combine"],
        "combine_tried": calibration["combine_tried"],
        "temperatures": calibration["temperatures"],
        "chosen_on_calibration": calibration["chosen"],
        "calibration_check": report["calibration_check"],
        "latency_batch1": report["latency"],
        "conversion_seconds": seconds,
    }
    write_result("cascade", result)
    print(
        f"cascade: ResNet-56 alone {100 * result['reference_accuracy']:.2f}% -> "
        f"{100 * result['dynamic_accuracy']:.2f}% "
        f"({result['accuracy_change_points']:+.2f} pt), FLOPs ratio {result['flops_ratio']:.3f}, {seconds / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
