"""Early exit on the pretrained CIFAR-10 ResNet-56, exactly as a user types it (defaults only).

    python bench/early_exit.py [--datasets cifar10-jpeg cifar10-lossless] [--variants default latency onnx-latency]

For each data set: fit and calibrate on its train split, evaluate on its whole test split.
Variants: ``default`` (the command as a user types it), ``latency`` (the same with
``--set options.cost=latency``: exits costed in measured batch-1 time, written to the folder
with a ``-latency`` suffix), ``onnx-latency`` (the same costs measured in onnxruntime with one
thread, as ``bench/export.py`` runs it: ``--set options.latency_runtime=onnxruntime --set
options.latency_threads=1``, suffix ``-onnx-latency``). Writes bench/results/early_exit.json
(rows of runs not repeated are kept) and copies each run's report.png next to it.
"""

from __future__ import annotations

import argparse
import shutil

from common import OUT, RESULTS, SHARED, accuracy_fields, machine, run_cli, with_earlier_rows, write_result

VARIANTS = {
    "default": [],
    "latency": ["--set", "options.cost=latency"],
    "onnx-latency": [
        *("--set", "options.cost=latency"),
        *("--set", "options.latency_runtime=onnxruntime"),
        *("--set", "options.latency_threads=1"),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=["cifar10-jpeg", "cifar10-lossless"])
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--weights", default=str(SHARED / "models" / "resnet56-4bfd9763.th"))
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    args = parser.parse_args()
    rows = []
    for name, variant in [(n, v) for n in args.datasets for v in args.variants]:
        suffix = "" if variant == "default" else f"-{variant}"
        out = OUT / f"early-exit-{args.model}-{name}{suffix}"
        command = [
            args.model,
            "--strategy",
            "early-exit",
            "--weights",
            args.weights,
            "--data",
            str(SHARED / "data" / name),
            *VARIANTS[variant],
        ]
        report, seconds = run_cli(command, out)
        shutil.copy(out / "report.png", RESULTS / f"early_exit_{args.model}_{name}{suffix}.png")
        rows.append(
            {
                "data": name,
                "variant": variant,
                "command": "dynconvert " + " ".join(command),
                **accuracy_fields(report),
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
    # keep the rows of runs not repeated this time
    rows = with_earlier_rows("early_exit", rows, "runs", key=lambda r: (r["data"], r.get("variant", "default")))
    write_result("early_exit", {"machine": machine(), "runs": rows})


if __name__ == "__main__":
    main()
