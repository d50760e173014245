"""Early exit on the pretrained CIFAR-10 ResNet-56, exactly as a user types it (defaults only).

    python bench/early_exit.py [--datasets cifar10-jpeg cifar10-lossless]

For each data set: fit and calibrate on its train split, evaluate on its whole test split.
Writes bench/results/early_exit.json and copies each run's report.png next to it.
"""

from __future__ import annotations

import argparse
import shutil

from common import OUT, RESULTS, SHARED, machine, run_cli, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=["cifar10-jpeg", "cifar10-lossless"])
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--weights", default=str(SHARED / "models" / "resnet56-4bfd9763.th"))
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        out = OUT / f"early-exit-{args.model}-{name}"
        command = [
            args.model,
            "--strategy",
            "early-exit",
            "--weights",
            args.weights,
            "--data",
            str(SHARED / "data" / name),
        ]
        report, seconds = run_cli(command, out)
        shutil.copy(out / "report.png", RESULTS / f"early_exit_{args.model}_{name}.png")
        rows.append(
            {
                "data": name,
                "command": "dynconvert " + " ".join(command),
                "splits": report["splits"],
                "evaluated_samples": report["evaluated_samples"],
                "static_accuracy": report["static"]["accuracy"],
                "dynamic_accuracy": report["dynamic"]["accuracy"],
                "accuracy_change_points": 100 * report["accuracy_change"],
                "flops_ratio": report["flops_ratio"],
                "static_mflops": report["static"]["flops"] / 1e6,
                "inserted_mflops": report["inserted_flops"] / 1e6,
                "exit_histogram": report["dynamic"]["exit_histogram"],
                "latency_batch1": report["latency"],
                "calibration_check": report["calibration_check"],
                "conversion_seconds": seconds,
            }
        )
        print(
            f"{name}: {100 * report['static']['accuracy']:.2f}% -> {100 * report['dynamic']['accuracy']:.2f}%, "
            f"FLOPs ratio {report['flops_ratio']:.3f}, {seconds / 60:.1f} min"
        )
    write_result("early_exit", {"machine": machine(), "runs": rows})


if __name__ == "__main__":
    main()
