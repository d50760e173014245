"""onnxruntime latency of exported static and dynamic models, on the same inputs.

    python bench/export.py [MODEL_DIR ...] [--images 300] [--repeats 3] [--rounds 3] [--threads 1]

Each MODEL_DIR is a conversion's output folder (default: the cifar_resnet56 early-exit,
BlockDrop and SkipNet conversions under bench/out; named folders replace their own rows and keep
the other models' rows). For each: the static network (through
dynconvert.export.export_static_onnx, prepared for onnxruntime's blocked layout as the dynamic
graphs are; and, for reference, through torch.onnx.export alone: ``static_plain``) and the
dynamic one in both export forms (gather, cond) are exported to ONNX under
bench/out/onnx/NAME/ (the dynamic ones through dynconvert.export_onnx, so each passes the
check first), then timed in onnxruntime (CPU) on the evaluation split's real images:
one image at a time and in batches of 64, interleaved model by model, each input timed
``--repeats`` times and the fastest kept (other processes on the machine only ever add time).
The whole timing is repeated ``--rounds`` times (this shared machine changes speed from minute to
minute): each time ratio is the median over the rounds, with the range beside it. Reports the
FLOPs ratio of the same images, each form's time ratio against the prepared static export and
the quotient.
Writes bench/results/export.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import OUT, conversion_id, machine, repo_relative, with_earlier_rows, write_result

import dynconvert
from dynconvert.convert.build import build_model
from dynconvert.export import export_static_onnx
from dynconvert.export.check import ort_session
from dynconvert.export.graphs import FORMS
from dynconvert.toolkit.data import load_conversion_data, normalize

DEFAULT_DIRS = [
    "early-exit-cifar_resnet56-cifar10-jpeg",
    "blockdrop-cifar_resnet56-cifar10-jpeg-default",
    "skipnet-cifar_resnet56-cifar10-jpeg-default",
]
TARGET = 1.2  # time ratio at batch 1 at most this times the FLOPs ratio


def fastest_total(sessions: dict, batches: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Sum over ``batches`` of each session's fastest of ``repeats`` runs, in ms per batch."""
    totals = dict.fromkeys(sessions, 0.0)
    for x in batches:
        best = dict.fromkeys(sessions, float("inf"))
        for _ in range(repeats):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"x": x})
                best[key] = min(best[key], time.perf_counter() - start)
        for key in sessions:
            totals[key] += best[key]
    return {key: total / len(batches) * 1e3 for key, total in totals.items()}


@torch.inference_mode()
def measure(folder: Path, images: int, repeats: int, threads: int, rounds: int) -> dict:
    dyn = dynconvert.load(folder).eval()
    data = load_conversion_data(dyn.recipe.data, dyn.preprocess, dyn.recipe.seed).evaluation
    x = normalize(data.images[: max(images, 512)], dyn.preprocess)
    target = OUT / "onnx" / folder.name
    target.mkdir(parents=True, exist_ok=True)
    paths = {"static": target / "static.onnx", "static_plain": target / "static-plain.onnx"}
    static = build_model(dyn.recipe.model_configs()[-1])
    export_static_onnx(static, paths["static"], x[:2], overwrite=True)
    export_static_onnx(static, paths["static_plain"], x[:2], overwrite=True, prepare=False)
    checks = {}
    with torch.inference_mode(False):
        for form in FORMS:
            paths[form] = target / f"dynamic-{form}.onnx"
            checks[form] = dynconvert.export_onnx(dyn, paths[form], form=form, images=x[:512], overwrite=True)
    strategy = dynconvert.get_strategy(dyn.recipe.strategy).from_options(dyn.recipe.options)
    default = strategy.export_graph(dyn, x[:1]).form
    records = torch.cat([dyn.route(x[i : i + 64]).decisions for i in range(0, images, 64)])[:images]
    flops_ratio = float(dyn.flops_of(records).mean()) / dyn.static_flops()
    sessions = {key: ort_session(path, threads) for key, path in paths.items()}
    xs = x.numpy()
    for session in sessions.values():  # warm-up
        for i in range(20):
            session.run(None, {"x": xs[i : i + 1]})
        session.run(None, {"x": xs[:64]})
    result = {
        "model_dir": repo_relative(folder),
        "conversion": conversion_id(folder),
        "strategy": dyn.recipe.strategy,
        "model": dyn.recipe.model.name,
        "images": images,
        "default_form": default,
        "flops_ratio": flops_ratio,
        "check": {
            form: {k: c[k] for k in ("passed", "max_abs_logit_diff", "decisions_identical", "samples")}
            for form, c in checks.items()
        },
    }
    for name, batches in (
        ("batch1", [xs[i : i + 1] for i in range(images)]),
        ("batch64", [xs[i : i + 64] for i in range(0, 512, 64)]),
    ):
        per_round = [fastest_total(sessions, batches, repeats) for _ in range(rounds)]
        result[name] = {"ms": {key: statistics.median(r[key] for r in per_round) for key in sessions}, "rounds": rounds}
        for form in FORMS:
            ratios = [r[form] / r["static"] for r in per_round]
            result[name][form] = {
                "time_ratio": statistics.median(ratios),
                "time_ratio_range": [min(ratios), max(ratios)],
                "time_ratio_over_flops_ratio": statistics.median(ratios) / flops_ratio,
            }
    batch1 = result["batch1"][default]
    result["target_met"] = batch1["time_ratio"] <= TARGET * flops_ratio
    result["target_met_every_round"] = batch1["time_ratio_range"][1] <= TARGET * flops_ratio
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over the inputs; ratios are their median, with the range"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    folders = args.folders or [OUT / name for name in DEFAULT_DIRS]
    results = []
    for folder in folders:
        r = measure(folder, args.images, args.repeats, args.threads, args.rounds)
        results.append(r)
        print(
            f"{r['strategy']:>10}: FLOPs {r['flops_ratio']:.3f}; default form {r['default_form']}; "
            + "; ".join(
                f"{form} b1 {r['batch1'][form]['time_ratio']:.3f} b64 {r['batch64'][form]['time_ratio']:.3f}"
                for form in FORMS
            )
            + f"; static b1 {r['batch1']['ms']['static']:.2f} ms"
            + f" (plain export {r['batch1']['ms']['static_plain']:.2f}); target met: {r['target_met']}"
            + f" (every round: {r['target_met_every_round']})"
        )
    info = {**machine(), "onnxruntime": onnxruntime.__version__, "onnxruntime_threads": args.threads}
    target = f"batch-1 time ratio <= {TARGET} x FLOPs ratio"
    if args.folders:  # the models named were re-measured; the others keep their rows
        results = with_earlier_rows("export", results)
    write_result("export", {"machine": info, "target": target, "results": results})


if __name__ == "__main__":
    main()
