"""SkipNet and BlockDrop on the pretrained CIFAR-10 ResNet-56, as a user types them.

    python bench/block_skip.py --strategy skipnet [--variants default recurrent]
    python bench/block_skip.py --strategy blockdrop

"default" is the command with defaults only (the built-in recipe); other variants add one
``--set`` (``recurrent``: ``options.gate=recurrent``; ``hybrid-rl``, for SkipNet:
``options.rl_epochs=1``; ``finetune``, for BlockDrop: ``options.finetune_epochs=1``). Rows of
variants not run are kept from the previous results. Fits and calibrates on the train split,
evaluates on the whole test split. Writes bench/results/STRATEGY.json and each run's report.png.
"""

from __future__ import annotations

import argparse
import shutil

from common import OUT, RESULTS, SHARED, accuracy_fields, machine, run_cli, with_earlier_rows, write_result

VARIANTS = {
    "default": [],
    "recurrent": ["--set", "options.gate=recurrent"],
    # SkipNet: the relaxed stage, then one epoch of the hybrid RL stage
    "hybrid-rl": ["--set", "options.rl_epochs=1"],
    # BlockDrop: the curriculum, then one epoch of joint fine-tuning of the policy and the backbone
    "finetune": ["--set", "options.finetune_epochs=1"],
}


def row(variant: str, command: list[str], report: dict, seconds: float) -> dict:
    dynamic = report["dynamic"]
    return {
        "variant": variant,
        "command": "dynconvert " + " ".join(command),
        **accuracy_fields(report),
        "controller_mflops": report["inserted_flops"] / 1e6,
        "blocks_used_mean": dynamic["blocks_used_mean"],
        "blocks_used_std": dynamic["blocks_used_std"],
        "blocks_total": dynamic["blocks_total"],
        "blocks_used_histogram": dynamic["blocks_used_histogram"],
        "block_execution_rate": dynamic["block_execution_rate"],
        "distinct_policies": dynamic["distinct_policies"],
        "latency_batch1": report["latency"],
        "calibration_check": report["calibration_check"],
        "calibration_sweep": report["calibration"]["sweep"],
        "conversion_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", choices=["skipnet", "blockdrop"], required=True)
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--data", default="cifar10-jpeg")
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--weights", default=str(SHARED / "models" / "resnet56-4bfd9763.th"))
    args = parser.parse_args()
    rows = []
    for variant in args.variants:
        out = OUT / f"{args.strategy}-{args.model}-{args.data}-{variant}"
        command = [args.model, "--strategy", args.strategy, "--weights", args.weights]
        command += ["--data", str(SHARED / "data" / args.data), *VARIANTS[variant]]
        report, seconds = run_cli(command, out)
        shutil.copy(out / "report.png", RESULTS / f"{args.strategy}_{args.model}_{variant}.png")
        rows.append(row(variant, command, report, seconds))
        print(
            f"{args.strategy} {variant}: {100 * report['static']['accuracy']:.2f}% -> "
            f"{100 * report['dynamic']['accuracy']:.2f}%, FLOPs ratio {report['flops_ratio']:.3f}, "
            f"{seconds / 60:.1f} min"
        )
    # keep the rows of variants not run this time
    rows = with_earlier_rows(args.strategy, rows, "runs", key=lambda r: r["variant"])
    write_result(args.strategy, {"machine": machine(), "data": args.data, "runs": rows})


if __name__ == "__main__":
    main()
