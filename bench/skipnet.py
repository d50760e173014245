"""SkipNet on the pretrained CIFAR-10 ResNet-56, as a user types it: defaults (feed-forward
gates), and the same with the recurrent gate.

    python bench/skipnet.py [--gates feedforward recurrent] [--data cifar10-jpeg]

Fits and calibrates on the train split, evaluates on the whole test split. Writes
bench/results/skipnet.json and copies each run's report.png next to it.
"""

from __future__ import annotations

import argparse
import shutil

from common import OUT, RESULTS, SHARED, machine, run_cli, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gates", nargs="+", default=["feedforward", "recurrent"])
    parser.add_argument("--data", default="cifar10-jpeg")
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--weights", default=str(SHARED / "models" / "resnet56-4bfd9763.th"))
    args = parser.parse_args()
    rows = []
    for gate in args.gates:
        out = OUT / f"skipnet-{args.model}-{args.data}-{gate}"
        command = [
            args.model,
            "--strategy",
            "skipnet",
            "--weights",
            args.weights,
            "--data",
            str(SHARED / "data" / args.data),
        ]
        if gate != "feedforward":  # the built-in recipe's default
            command += ["--set", f"options.gate={gate}"]
        report, seconds = run_cli(command, out)
        shutil.copy(out / "report.png", RESULTS / f"skipnet_{args.model}_{gate}.png")
        dynamic = report["dynamic"]
        rows.append(
            {
                "gate": gate,
                "data": args.data,
                "command": "dynconvert " + " ".join(command),
                "splits": report["splits"],
                "evaluated_samples": report["evaluated_samples"],
                "static_accuracy": report["static"]["accuracy"],
                "dynamic_accuracy": dynamic["accuracy"],
                "accuracy_change_points": 100 * report["accuracy_change"],
                "flops_ratio": report["flops_ratio"],
                "gate_mflops": report["inserted_flops"] / 1e6,
                "blocks_used_mean": dynamic["blocks_used_mean"],
                "blocks_used_std": dynamic["blocks_used_std"],
                "blocks_total": dynamic["blocks_total"],
                "block_execution_rate": dynamic["block_execution_rate"],
                "distinct_policies": dynamic["distinct_policies"],
                "latency_batch1": report["latency"],
                "calibration_check": report["calibration_check"],
                "conversion_seconds": seconds,
            }
        )
        print(
            f"{gate}: {100 * report['static']['accuracy']:.2f}% -> {100 * dynamic['accuracy']:.2f}%, "
            f"FLOPs ratio {report['flops_ratio']:.3f}, {seconds / 60:.1f} min"
        )
    write_result("skipnet", {"machine": machine(), "runs": rows})


if __name__ == "__main__":
    main()
