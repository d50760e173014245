"""Peak memory of a conversion as the training set grows.

    python bench/memory.py [--samples 10000 40000] [--strategy early-exit] [--epochs 1]

Runs ``dynconvert tf_efficientnet_lite0 --strategy STRATEGY --weights LITE0 --data tiny-imagenet
--set data.max_train_samples=N`` once per N, as a user would (a fresh process, an empty
decoded-image cache), and samples every second the memory of the whole process tree (the
conversion and its DataLoader workers): the proportional set size (PSS: each page shared
between processes counted once, split among them, so the tree's total is what it occupies),
and the sum of their resident sets (RSS: a shared page counted in every process that maps it,
an upper bound). Memory depends on how much data passes through, not on how often, so the runs
train ``--epochs`` epochs and evaluate on ``--eval-samples`` images to stay short. Where
``bench/lite0.py`` has run the strategy's default conversion (all 40,000 training images, all
10,000 validation images), its peak, sampled the same way, is recorded beside the runs
(``default_conversion``) with the growth to it from the first run: an upper bound on what the
training set adds, since that run also evaluates on ten times as many images. Writes
bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import OUT, RESULTS, lite0_command, machine, run_cli_with_memory, write_result

import dynconvert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--strategy", default="early-exit")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-samples", type=int, default=1000)
    args = parser.parse_args()
    runs = []
    for samples in args.samples:
        out = OUT / f"memory-{args.strategy}-{samples}"
        command = lite0_command(
            args.strategy,
            "-q",
            *("--set", f"data.max_train_samples={samples}", "--set", f"train.epochs={args.epochs}"),
            *("--set", f"data.max_eval_samples={args.eval_samples}"),
        )
        _, _, gigabytes = run_cli_with_memory(command, out)
        runs.append({"train_samples": samples, **gigabytes})
        print(runs[-1], flush=True)
    growth = runs[-1]["peak_pss_gb"] / runs[0]["peak_pss_gb"] - 1.0
    default = default_conversion(args.strategy)
    if default is not None:
        default["growth_from_first_run"] = round(default["peak_pss_gb"] / runs[0]["peak_pss_gb"] - 1.0, 4)
        print(f"the default conversion ({default['train_samples']} training images): {default}")
    write_result(
        "memory",
        {
            "command": " ".join(["python", "bench/memory.py", *sys.argv[1:]]),
            "model": "tf_efficientnet_lite0, ImageNet-1k weights",
            "data": "tiny-imagenet: class-stratified training samples; validation for evaluation",
            "strategy": args.strategy,
            "runs": runs,
            "growth": round(growth, 4),
            **({"default_conversion": default} if default else {}),
            "machine": machine(),
            "dynconvert": dynconvert.__version__,
        },
    )
    print(f"peak memory grows {growth:+.1%} from {args.samples[0]} to {args.samples[-1]} training images")


def default_conversion(strategy: str) -> dict | None:
    """The peak memory of ``bench/lite0.py``'s default run of ``strategy``, where it ran."""
    path = RESULTS / "lite0.json"
    if not path.is_file():
        return None
    for run in json.loads(path.read_text())["runs"]:
        if run["strategy"] == strategy:
            splits = run["splits"]
            return {
                "train_samples": splits["fit_samples"] + splits["calibration_samples"],
                "eval_samples": run["evaluated_samples"],
                "peak_pss_gb": run["peak_pss_gb"],
                "peak_rss_sum_gb": run["peak_rss_sum_gb"],
                "command": run["command"],
            }
    return None


if __name__ == "__main__":
    main()
