"""Do the converted models run under torch.compile? Same outputs, and how many graph breaks.

    python bench/compile_check.py [MODEL_DIR ...] [--backends aot_eager inductor]

For each conversion folder (default: the cifar_resnet56 ones under bench/out), compiles the
dynamic model with each backend, runs a batch of 8 random images and a single image, and
compares with the uncompiled model. Every run-time decision (an exit taken, a block kept) needs
a value from the data, so dynamo breaks the graph there: the compiled pieces are the segments
and blocks between decisions. Writes bench/results/compile.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import OUT, machine, write_result

import dynconvert

DEFAULT_DIRS = [
    "early-exit-cifar_resnet56-cifar10-jpeg",
    "skipnet-cifar_resnet56-cifar10-jpeg-default",
    "blockdrop-cifar_resnet56-cifar10-jpeg-default",
]


def check(folder: Path, backend: str) -> dict:
    dyn = dynconvert.load(folder).eval()
    x = torch.randn(8, *dyn.preprocess.input_size, generator=torch.Generator().manual_seed(0))
    reference, reference_one = dyn(x), dyn(x[:1])
    torch._dynamo.reset()
    started = time.perf_counter()
    compiled = torch.compile(dyn, backend=backend)
    out, out_one = compiled(x), compiled(x[:1])
    seconds = time.perf_counter() - started
    explained = torch._dynamo.explain(dyn)(x)
    return {
        "model_dir": folder.name,
        "backend": backend,
        "max_abs_diff": max(float((out - reference).abs().max()), float((out_one - reference_one).abs().max())),
        "graph_breaks": explained.graph_break_count,
        "graphs": explained.graph_count,
        "first_calls_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    args = parser.parse_args()
    folders = args.folders or [OUT / name for name in DEFAULT_DIRS]
    rows = []
    for folder in folders:
        for backend in args.backends:
            row = check(folder, backend)
            rows.append(row)
            print(
                f"{row['model_dir']} {backend}: max diff {row['max_abs_diff']:.1e}, "
                f"{row['graph_breaks']} graph breaks, {row['first_calls_seconds']:.0f} s"
            )
    write_result("compile", {"machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
