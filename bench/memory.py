"""Peak memory of a conversion as the training set grows.

    python bench/memory.py [--samples 10000 40000] [--strategy early-exit] [--epochs 1]

Runs ``dynconvert tf_efficientnet_lite0 --strategy STRATEGY --weights LITE0 --data tiny-imagenet
--set data.max_train_samples=N`` once per N, as a user would (a fresh process, an empty
decoded-image cache), and samples every 0.2 s the resident memory of the whole process tree
(the conversion and its DataLoader workers; pages shared between them are counted in each,
so the figure errs high). Memory depends on how much data passes through, not on how often,
so the runs train ``--epochs`` epochs and evaluate on ``--eval-samples`` images to stay short.
Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import OUT, SHARED, machine, write_result

import dynconvert

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):  # the process ended while being read
            continue
    return total


def peak_rss(command: list[str], env: dict) -> tuple[int, float]:
    """(peak resident bytes of the command's process tree, wall seconds)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"the conversion failed (exit {code}): {' '.join(command)}")
    return peak, time.perf_counter() - started


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
            *(sys.executable, "-m", "dynconvert.cli", "tf_efficientnet_lite0", "--strategy", args.strategy),
            *("--weights", str(weights), "--data", str(SHARED / "data" / "tiny-imagenet")),
            *("--out", str(out), "--force", "-q"),
            *("--set", f"data.max_train_samples={samples}", "--set", f"train.epochs={args.epochs}"),
            *("--set", f"data.max_eval_samples={args.eval_samples}"),
        ]
        with tempfile.TemporaryDirectory() as cache:
            peak, seconds = peak_rss(command, {**os.environ, "DYNCONVERT_CACHE": cache})
        runs.append({"train_samples": samples, "peak_rss_gb": round(peak / 1e9, 3), "seconds": round(seconds, 1)})
        print(runs[-1], flush=True)
    growth = runs[-1]["peak_rss_gb"] / runs[0]["peak_rss_gb"] - 1.0
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
