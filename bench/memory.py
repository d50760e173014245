"""Peak memory of a conversion as the training set grows.

    python bench/memory.py [--samples 10000 40000] [--strategy early-exit] [--epochs 1]

Runs ``dynconvert tf_efficientnet_lite0 --strategy STRATEGY --weights LITE0 --data tiny-imagenet
--set data.max_train_samples=N`` once per N, as a user would (a fresh process, an empty
decoded-image cache), and samples every second the memory of the whole process tree (the
conversion and its DataLoader workers): the proportional set size (PSS: each page shared
between processes counted once, split among them, so the tree's total is what it occupies),
and the sum of their resident sets (RSS: a shared page counted in every process that maps it,
an upper bound). Memory depends on how much data passes through, not on how often, so the runs
train ``--epochs`` epochs and evaluate on ``--eval-samples`` images to stay short. Writes
bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import sys

from common import OUT, SHARED, machine, run_cli_with_memory, write_result

import dynconvert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--strategy", default="early-exit")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-samples", type=int, default=1000)
    args = parser.parse_args()
    weights = SHARED / "models" / "imagenet" / "tf_efficientnet_lite0.safetensors"
    runs = []
    for samples in args.samples:
        out = OUT / f"memory-{args.strategy}-{samples}"
        command = [
            *("tf_efficientnet_lite0", "--strategy", args.strategy),
            *("--weights", str(weights), "--data", str(SHARED / "data" / "tiny-imagenet"), "-q"),
            *("--set", f"data.max_train_samples={samples}", "--set", f"train.epochs={args.epochs}"),
            *("--set", f"data.max_eval_samples={args.eval_samples}"),
        ]
        _, _, gigabytes = run_cli_with_memory(command, out)
        runs.append({"train_samples": samples, **gigabytes})
        print(runs[-1], flush=True)
    growth = runs[-1]["peak_pss_gb"] / runs[0]["peak_pss_gb"] - 1.0
    write_result(
        "memory",
        {
            "command": " ".join(["python", "bench/memory.py", *sys.argv[1:]]),
            "model": "tf_efficientnet_lite0, ImageNet-1k weights",
            "data": "tiny-imagenet: class-stratified training samples; validation for evaluation",
            "strategy": args.strategy,
            "runs": runs,
            "growth": round(growth, 4),
            "machine": machine(),
            "dynconvert": dynconvert.__version__,
        },
    )
    print(f"peak memory grows {growth:+.1%} from {args.samples[0]} to {args.samples[-1]} training images")


if __name__ == "__main__":
    main()
