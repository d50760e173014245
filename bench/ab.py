"""Two revisions of dynconvert timed against each other on one saved conversion.

    python bench/ab.py MODEL_DIR --base REV [--head REV] [--images 300] [--rounds 6]
                       [--block 10] [--batch 1]

Whether a runtime change makes the model faster is a question two separate runs of
bench/speed.py cannot answer on a machine whose speed moves by several percent from one run to
the next. Here each revision runs in a worker process of its own, with its checkout first on
PYTHONPATH (``git worktree`` for a revision; ``--head`` defaults to this working tree), and both
load the same conversion and the same evaluation images. The workers take turns, ``--block``
calls at a time, so both see the same machine state, and only one runs at a time; which one goes
first alternates from block to block. Each round passes over all the images; per round the mean
ms per call of each side and their ratio (head / base) are reported, then the median ratio.
Writes bench/results/ab-BASE-HEAD.json (short commits; HEAD is the working tree's commit
when ``--head`` is not given). A revision compared with itself shows what the harness can
resolve on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, repo_relative, write_result


def worker(model_dir: str, images: int, batch: int) -> None:
    """Load the conversion with the dynconvert on PYTHONPATH, then answer ``run START STOP``
    lines with the seconds that calling the model on those inputs took."""
    import torch

    import dynconvert

    try:
        from dynconvert.toolkit.data import load_conversion_data, normalize
    except ImportError:  # revisions from before the toolkit moved out of convert/
        from dynconvert.convert.data import load_conversion_data, normalize

    with torch.inference_mode():
        dyn = dynconvert.load(model_dir).eval()
        data = load_conversion_data(dyn.recipe.data, dyn.preprocess, dyn.recipe.seed).evaluation
        x = normalize(data.images[:images], dyn.preprocess)
        for i in range(0, min(20 * batch, len(x)), batch):  # warm-up
            dyn(x[i : i + batch])
        ready = {
            "ready": str(Path(dynconvert.__file__).parent.parent),
            "data": dyn.recipe.data.path,
            "split": data.name,
        }
        print(json.dumps(ready), flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                return
            _, start, stop = line.split()
            begin = time.perf_counter()
            for i in range(int(start), int(stop), batch):
                dyn(x[i : i + batch])
            print(time.perf_counter() - begin, flush=True)


class Worker:
    """A worker process for one checkout of dynconvert."""

    def __init__(self, checkout: Path, model_dir: Path, images: int, batch: int):
        env = dict(os.environ, PYTHONPATH=f"{checkout}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        args = [sys.executable, __file__, str(model_dir), "--worker", "--images", str(images), "--batch", str(batch)]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = json.loads(self.process.stdout.readline())
        if Path(self.ready["ready"]).resolve() != checkout.resolve():
            raise SystemExit(f"the worker for {checkout} imported dynconvert from {self.ready['ready']}")

    def run(self, start: int, stop: int) -> float:
        self.process.stdin.write(f"run {start} {stop}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait()


def commit_of(rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", rev], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--base", help="git revision to compare against")
    parser.add_argument("--head", default=None, help="git revision (default: this working tree)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=10, help="calls per turn")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(str(args.model_dir), args.images, args.batch)
    if not args.base:
        parser.error("--base REV is required")
    model_dir = args.model_dir.resolve()
    with tempfile.TemporaryDirectory() as scratch:
        checkouts = {}
        for side, rev in (("base", args.base), ("head", args.head)):
            if rev is None:
                checkouts[side] = REPO
                continue
            checkouts[side] = Path(scratch) / side
            subprocess.run(["git", "worktree", "add", "--detach", str(checkouts[side]), rev], cwd=REPO, check=True)
        try:
            rounds, images = compare(checkouts, model_dir, args)
        finally:
            for checkout in checkouts.values():
                if checkout != REPO:
                    subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=REPO, check=True)
    ratios = [r["ratio"] for r in rounds]
    result = {
        "machine": machine(),
        "model_dir": repo_relative(model_dir),
        "base": {"rev": args.base, "commit": commit_of(args.base)},
        "head": {"rev": args.head or "working tree", "commit": commit_of(args.head or "HEAD")},
        **images,
        "images": args.images,
        "batch": args.batch,
        "block": args.block,
        "rounds": rounds,
        "median_ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }
    path = write_result(f"ab-{result['base']['commit'][:7]}-{result['head']['commit'][:7]}", result)
    print(f"head / base: median {result['median_ratio']:.3f} (rounds {min(ratios):.3f} to {max(ratios):.3f})")
    print(f"wrote {path}")


def compare(checkouts: dict[str, Path], model_dir: Path, args) -> tuple[list[dict], dict]:
    """Rounds of both workers taking turns over the images; mean ms per call of each side. Each
    round starts a fresh pair of workers, in the other order than the round before, so that
    whatever a process's start does to its speed (which one started first, where its memory
    landed) varies from round to round and the median sees through it."""
    calls = args.block * args.batch
    stop = args.images // args.batch * args.batch
    rounds, images = [], {}
    for number in range(args.rounds):
        sides = ("base", "head") if number % 2 == 0 else ("head", "base")
        workers = {side: Worker(checkouts[side], model_dir, args.images, args.batch) for side in sides}
        try:
            images = {key: workers["base"].ready[key] for key in ("data", "split")}
            totals = {"base": 0.0, "head": 0.0}
            for turn, start in enumerate(range(0, stop, calls)):
                for side in sides if turn % 2 == 0 else sides[::-1]:
                    totals[side] += workers[side].run(start, min(start + calls, stop))
        finally:
            for w in workers.values():
                w.close()
        per_call = {side: total / (stop // args.batch) * 1e3 for side, total in totals.items()}
        ratio = per_call["head"] / per_call["base"]
        rounds.append(
            {"base_ms": per_call["base"], "head_ms": per_call["head"], "ratio": ratio, "started_first": sides[0]}
        )
        print(
            f"base {per_call['base']:.3f} ms, head {per_call['head']:.3f} ms, ratio {ratio:.3f}, "
            f"{sides[0]} started first"
        )
    return rounds, images


if __name__ == "__main__":
    main()
