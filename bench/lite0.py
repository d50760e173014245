"""EfficientNet-Lite0 (ImageNet-1k weights) on Tiny-ImageNet, exactly as a user types it.

    python bench/lite0.py [--strategies early-exit skipnet blockdrop]

For each strategy: ``dynconvert tf_efficientnet_lite0 --strategy S --weights LITE0 --data
tiny-imagenet`` with defaults only (the family's built-in recipe), an empty decoded-image cache,
fitting and calibrating on the training folder and evaluating on all 10,000 validation images,
200-way (the logits restricted to the data set's classes). Records the accuracy of the static
and the dynamic model, the loss against the best point of the conversion's own sweep on the
evaluation split, the FLOPs ratio (inserted parts included), the wall-clock time and the peak
memory of the whole process tree (DataLoader workers included). Writes bench/results/lite0.json
(rows of strategies not run this time are kept) and copies each run's report.png next to it.
"""

from __future__ import annotations

import argparse
import shutil

from common import (
    OUT,
    RESULTS,
    SHARED,
    accuracy_fields,
    lite0_command,
    machine,
    run_cli_with_memory,
    with_earlier_rows,
    write_result,
)

STRATEGIES = ("early-exit", "skipnet", "blockdrop")


def summary(report: dict) -> dict:
    """What the dynamic model did, in the strategy's own terms."""
    dynamic = report["dynamic"]
    keys = ("exit_histogram", "blocks_used_mean", "blocks_total", "block_execution_rate", "distinct_policies")
    return {k: dynamic[k] for k in keys if k in dynamic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args()
    rows = []
    for strategy in args.strategies:
        out = OUT / f"{strategy}-tf_efficientnet_lite0-tiny-imagenet"
        command = lite0_command(strategy)
        report, seconds, memory = run_cli_with_memory(command, out)
        plot = f"{strategy.replace('-', '_')}_tf_efficientnet_lite0_tiny-imagenet.png"
        shutil.copy(out / "report.png", RESULTS / plot)
        rows.append(
            {
                "strategy": strategy,
                "command": "dynconvert " + " ".join(command).replace(str(SHARED), "../shared"),
                "classes": {k: report["classes"][k] for k in ("how", "data_classes", "model_classes")},
                **accuracy_fields(report),
                "static_mflops": report["static"]["flops"] / 1e6,
                "inserted_mflops": report["inserted_flops"] / 1e6,
                "dynamic": summary(report),
                "calibration_check": report["calibration_check"],
                "conversion_seconds": seconds,
                **memory,
            }
        )
        print(
            f"{strategy}: {100 * report['static']['accuracy']:.2f}% -> {100 * report['dynamic']['accuracy']:.2f}% "
            f"({100 * report['accuracy_drop_vs_best_point']:.2f} pt below the best sweep point), FLOPs ratio "
            f"{report['flops_ratio']:.3f}, {seconds / 60:.1f} min, peak PSS {memory['peak_pss_gb']} GB",
            flush=True,
        )
    rows = with_earlier_rows("lite0", rows, "runs", key=lambda r: r["strategy"])
    write_result("lite0", {"machine": machine(), "data": "tiny-imagenet", "runs": rows})


if __name__ == "__main__":
    main()
