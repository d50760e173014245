"""Saved FLOPs against saved time: static and dynamic models measured side by side.

    python bench/speed.py [MODEL_DIR ...] [--images 512] [--rounds 3] [--block 25]
                          [--memory-format channels_last] [--device cuda] [--replot]

Each MODEL_DIR is a conversion's output folder (default: every folder under bench/out that
holds a model; named folders replace their own rows and keep the other models' rows). In one
process, on the evaluation split's real images, the static network and the dynamic one are
timed interleaved: at batch 1 in turns of ``--block`` images (each model runs a few images in a
row, warm, as it would serving alone, while the turns keep both under the same machine load;
``batch1``) and also image by image (``batch1_alternating``: each model starts every image with
the other's code and weights in the caches, which no deployment does and which costs the model
with more distinct small operations more); batch by batch at batch 64, over whole batches only
and in three times as many rounds (a pass is a handful of calls, so a noisier figure per round).
Reports the mean time per image (batch 1) and per batch of 64, the time ratio beside the FLOPs
ratio of the same images, and their quotient (efficiency: 1.0 means every saved FLOP became saved
time), beside the accuracy change: the conversion's (``report.json``, its whole evaluation split)
and the one on the timed images. Both models run in the same memory format: PyTorch's default (contiguous) unless
``--memory-format channels_last`` (written to speed-channels_last.json). Early-exit models are
also timed in throughput mode (``route_stream``: all images at once, every segment in full
batches) against the static model over the same images in batches. At batch 1 the backbone
parts each image's decisions select are also timed alone, without exit heads, gates or policy
network (``batch1_decisions_free``): the time ratio the model would reach if its decisions were
free, so the gap to the FLOPs ratio splits into what the decisions cost and what the backbone's
uneven FLOP rate costs. For block-skipping models with skip corrections the kept blocks are
also timed with every skipped block as its bare shortcut (``batch1_stand_ins_free``: no
controller and no correction; outputs not the model's): the decisions-free gap splits again into
what the corrections cost and what the kept blocks cost by themselves. The whole backbone run
the same way (``batch1_full_depth``, the first 100 images) is timed against the static network
as well: how the dynamic model's way of running the same layers compares by itself, apart from
anything skipped. For early-exit models the FLOP
rate of each backbone segment is recorded at batch 1 and on a whole batch (``segments_batch1``,
``segments_batch64``): exits save the late segments, so their rate against the early ones is what
the quotient pays. Writes
bench/results/speed.json and bench/results/speed.png (bars per model, the time ratio each target
allows marked over its bar; ``--replot`` redraws the PNG from the JSON without measuring).

On a GPU (``--device cuda``, the default where one is present) both models and the images
live on the GPU, every call is timed with CUDA events (from before the call is issued to after
its last kernel) and the results go to speed-cuda.json / speed-cuda.png; where there is none,
the JSON says the GPU was not measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from common import OUT, RESULTS, conversion_id, machine, repo_relative, with_earlier_rows, write_result

import dynconvert
from dynconvert.convert.build import build_model
from dynconvert.runtime.block_skip import BlockSkipModel
from dynconvert.runtime.corrections import SkipCorrection
from dynconvert.runtime.early_exit import EarlyExitModel
from dynconvert.runtime.flat_graph import runners_for
from dynconvert.strategies.early_exit_latency import early_exit_latency
from dynconvert.toolkit.data import load_conversion_data, normalize

# images the whole-backbone pass is timed on each round: its ratio needs no more to settle
FULL_DEPTH_IMAGES = 100
# the batched passes (batch 64, stream) are timed this many times per round
BATCHED_ROUNDS_PER_ROUND = 3
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def timed(fn, x) -> float:
    """Seconds one call ``fn(x)`` takes: CUDA events on a GPU, the wall clock on a CPU."""
    return timed_call(fn, x)[0]


def timed_call(fn, x) -> tuple[float, object]:
    """``(seconds, fn(x))``: the time of one call, as :func:`timed` measures it, and its result."""
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    start = time.perf_counter()
    out = fn(x)
    return time.perf_counter() - start, out


def batch1_ms(static, dynamic_for, x: torch.Tensor, block: int = 1) -> dict[str, float]:
    """Mean ms per image, one image at a time, of ``static`` and of ``dynamic_for(i)`` on image
    ``i``, interleaved in blocks of ``block`` images: each model runs the block's images one after
    another, then the other model runs the same images. With ``block`` 1 the static model goes
    first on every image; with larger blocks the two take turns at going first."""
    totals = {"static": 0.0, "dynamic": 0.0}
    for turn, start in enumerate(range(0, len(x), block)):
        stop = min(start + block, len(x))
        first_static = block == 1 or turn % 2 == 0
        for key in ("static", "dynamic") if first_static else ("dynamic", "static"):
            for i in range(start, stop):
                totals[key] += timed(static if key == "static" else dynamic_for(i), x[i : i + 1])
    return {key: total / len(x) * 1e3 for key, total in totals.items()}


def decision_free(dyn, record: torch.Tensor):
    """For one image's decisions (its row of ``decision_record``), a call that runs only the
    backbone parts they select, with no exit head, gate or policy network; None for runtime
    models without such a form. Timing it bounds what any cheaper decision machinery could gain."""
    if isinstance(dyn, EarlyExitModel):
        segments = dyn.runners()[: int(record) + 1]

        def run(x):
            for segment in segments:
                x = segment(x)
            return x

        return run
    if isinstance(dyn, BlockSkipModel):
        keeps = [bool(v) for v in record.tolist()]
        return lambda x: dyn.run_fixed(x, keeps)
    return None


def without_corrections(dyn) -> list | None:
    """Runners of a block-skipping model's skipped forms with every skip correction taken out
    (the bare shortcut and whatever follows it, as without ``options.skip_correction``), built
    on copies; None for models without corrections. For timing only: the outputs are not the
    model's."""
    if not isinstance(dyn, BlockSkipModel) or not hasattr(dyn.dyn, "corrections"):
        return None
    forms = []
    for form in dyn.skipped_units:
        names = [name for name, m in form.named_modules() if isinstance(m, SkipCorrection)]
        if names:
            form = copy.deepcopy(form)
            for name in names:
                form.set_submodule(name, torch.nn.Identity())
        forms.append(form)
    return runners_for(forms)


def stand_ins_free(dyn, record: torch.Tensor, bare_forms: list):
    """For one image's decisions, the blocks it keeps and nothing else that the model inserts:
    no policy or gate, and its skipped blocks as bare shortcuts (``bare_forms``, from
    :func:`without_corrections`). Timed beside :func:`decision_free` it splits what the
    decisions leave over into the skip corrections' share and the kept blocks' own."""
    keeps = [bool(v) for v in record.tolist()]
    parts = (dyn.runners()[0], bare_forms)
    return lambda x: dyn.run_fixed(x, keeps, parts)


def full_depth(dyn):
    """The decisions-free call that runs the whole backbone (every segment, every block): timed
    against the static network it shows what the dynamic model's way of running the same layers
    costs or saves by itself (1.0: the same time), apart from anything skipped."""
    if isinstance(dyn, EarlyExitModel):
        return decision_free(dyn, torch.tensor(dyn.num_exits))
    if isinstance(dyn, BlockSkipModel):
        return decision_free(dyn, torch.ones(dyn.num_blocks, dtype=torch.bool))
    return None


def conversion_accuracy(folder: Path) -> dict:
    """The accuracy change the conversion's own report measured on its whole evaluation split
    (the timed images are a few hundred of them, too few to tell a fraction of a point)."""
    report = json.loads((folder / "report.json").read_text())
    return {
        "accuracy_change_points": 100 * (report["dynamic"]["accuracy"] - report["static"]["accuracy"]),
        "accuracy_split": report["splits"]["evaluation"],
        "accuracy_samples": report["evaluated_samples"],
    }


@torch.inference_mode()
def measure(
    folder: Path, images: int, rounds: int, batch: int, memory_format: str, device: str = "cpu", block: int = 25
) -> dict:
    fmt = FORMATS[memory_format]
    dyn = dynconvert.load(folder).eval().to(device=device, memory_format=fmt)
    # the reference: the network converted, or the last (largest) of the models combined
    static = build_model(dyn.recipe.model_configs()[-1]).eval().to(device=device, memory_format=fmt)
    data = load_conversion_data(dyn.recipe.data, dyn.preprocess, dyn.recipe.seed).evaluation
    x = normalize(data.images[:images], dyn.preprocess).to(device).contiguous(memory_format=fmt)
    routed = [dyn.route(x[i : i + batch]) for i in range(0, len(x), batch)]
    records = torch.cat([r.decisions for r in routed])
    flops_ratio = float(dyn.flops_of(records).mean()) / dyn.static_flops()
    # the batched rows time whole batches only: their FLOPs ratio is that of the images they ran
    n_batched = len(x) // batch * batch
    batched_flops_ratio = float(dyn.flops_of(records[:n_batched]).mean()) / dyn.static_flops()
    labels = data.labels[: len(x)].to(device)
    timed_accuracy = {
        "static": float(
            (torch.cat([static(x[i : i + batch]) for i in range(0, len(x), batch)]).argmax(1) == labels).float().mean()
        ),
        "dynamic": float((torch.cat([r.logits for r in routed]).argmax(1) == labels).float().mean()),
    }
    for model in (static, dyn):  # warm-up
        for i in range(20):
            model(x[i : i + 1])
        model(x[:batch])
    single = {"static": [], "dynamic": []}
    alternating = {"static": [], "dynamic": []}
    # the backbone-only calls, one per image, run the dynamic model's own weights, so each is timed
    # in a pass of its own (against the static model again) rather than next to the dynamic model,
    # whose weights it would warm
    backbone_only = {}
    free = [decision_free(dyn, r) for r in records[: len(x)]]
    if free[0] is not None:
        backbone_only["batch1_decisions_free"] = free
    bare_forms = without_corrections(dyn)
    if bare_forms is not None:
        backbone_only["batch1_stand_ins_free"] = [stand_ins_free(dyn, r, bare_forms) for r in records[: len(x)]]
    backbone_times = {name: {"static": [], "dynamic": []} for name in backbone_only}
    for calls in backbone_only.values():
        for i in range(20):
            calls[i](x[i : i + 1])
    whole = full_depth(dyn)
    depth = {"static": [], "dynamic": []} if whole is not None else None
    batched = {"static": [], "dynamic": []}
    stream = {"static": [], "dynamic": []}
    for _ in range(rounds):
        for key, ms in batch1_ms(static, lambda i: dyn, x, block).items():
            single[key].append(ms)
        for key, ms in batch1_ms(static, lambda i: dyn, x).items():
            alternating[key].append(ms)
        for name, calls in backbone_only.items():
            for key, ms in batch1_ms(static, calls.__getitem__, x, block).items():
                backbone_times[name][key].append(ms)
        if depth is not None:
            for key, ms in batch1_ms(static, lambda i: whole, x[:FULL_DEPTH_IMAGES], block).items():
                depth[key].append(ms)
    # a pass over the batches takes about a second: these rounds are cheap, and a batched pass is
    # noisier than a batch-1 one (a few calls, not hundreds), so it gets more of them
    for _ in range(rounds * BATCHED_ROUNDS_PER_ROUND):
        totals = {"static": 0.0, "dynamic": 0.0}
        for i in range(0, n_batched, batch):
            for key, model in (("static", static), ("dynamic", dyn)):
                totals[key] += timed(model, x[i : i + batch])
        for key in totals:
            batched[key].append(totals[key] / (n_batched // batch) * 1e3)
        if hasattr(dyn, "route_stream"):  # throughput mode: every segment in full batches
            stream["static"].append(sum(timed(static, x[i : i + batch]) for i in range(0, len(x), batch)) * 1e3)
            stream["dynamic"].append(timed(lambda images: dyn.route_stream(images, batch), x) * 1e3)
    result = {
        "model_dir": repo_relative(folder),
        "conversion": conversion_id(folder),
        "strategy": dyn.recipe.strategy,
        "model": "+".join(c.name for c in dyn.recipe.model_configs()),
        "data": dyn.recipe.data.path,
        "split": data.name,
        "images": len(x),
        "rounds": rounds,
        "batched_rounds": rounds * BATCHED_ROUNDS_PER_ROUND,
        "batch1_block": block,
        "memory_format": memory_format,
        "device": torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu",
        "timer": "CUDA events" if x.is_cuda else "time.perf_counter",
        "flops_ratio": flops_ratio,
        "accuracy_timed_images": timed_accuracy,
        "accuracy_change_points_timed_images": 100 * (timed_accuracy["dynamic"] - timed_accuracy["static"]),
        **conversion_accuracy(folder),
    }
    measured = [
        ("batch1", single, flops_ratio),
        ("batch1_alternating", alternating, flops_ratio),
        (f"batch{batch}", batched, batched_flops_ratio),
    ]
    measured += [(name, times, flops_ratio) for name, times in backbone_times.items()]
    if depth is not None:  # the whole backbone: the static network's FLOPs
        measured.append(("batch1_full_depth", depth, 1.0))
    if stream["dynamic"]:
        measured.append((f"stream{batch}", stream, flops_ratio))
    for name, times, flops in measured:
        s, d = statistics.median(times["static"]), statistics.median(times["dynamic"])
        ratio = d / s
        per_round = [dynamic / static for static, dynamic in zip(times["static"], times["dynamic"])]
        result[name] = {
            "static_ms": s,
            "dynamic_ms": d,
            "static_ms_range": [min(times["static"]), max(times["static"])],
            "dynamic_ms_range": [min(times["dynamic"]), max(times["dynamic"])],
            "time_ratio": ratio,
            "time_ratio_range": [min(per_round), max(per_round)],
            "time_ratio_over_flops_ratio": ratio / flops,
            "efficiency": flops / ratio,
            "flops_ratio": flops,
        }
    if hasattr(dyn, "segment_flops") and len(dyn.segments) == len(dyn.segment_flops):
        # where the time goes at batch 1: FLOP rate of each backbone segment
        segment_s, head_s = early_exit_latency(dyn, x[:8])
        result["segments_batch1"] = {
            "segment_ms": (segment_s * 1e3).tolist(),
            "segment_gflops_per_s": [f / s / 1e9 for f, s in zip(dyn.segment_flops, segment_s.tolist())],
            "head_and_decision_ms": (head_s * 1e3).tolist(),
        }
        # and in a batch: the same FLOP rates with every sample in every segment
        segment_ms = batch_segment_ms(dyn, x[:batch], rounds * BATCHED_ROUNDS_PER_ROUND)
        result[f"segments_batch{batch}"] = {
            "segment_ms": segment_ms,
            "segment_gflops_per_s": [f * batch / ms / 1e6 for f, ms in zip(dyn.segment_flops, segment_ms)],
        }
    return result


def batch_segment_ms(dyn, x: torch.Tensor, repeats: int) -> list[float]:
    """Median ms of each backbone segment of an early-exit model on the whole batch ``x``, the
    segments run in a chain ``repeats`` times (where early exit saves FLOPs and where it does not
    run at different rates)."""
    runners = dyn.runners()
    times = [[] for _ in runners]
    for _ in range(repeats):
        h = x
        for k, segment in enumerate(runners):
            seconds, h = timed_call(segment, h)
            times[k].append(seconds * 1e3)
    return [statistics.median(t) for t in times]


# the targets: time ratio at most this many times the FLOPs ratio
TARGETS = {"batch1": 1.15, "batch64": 1.25}


def plot(results: list[dict], path: Path, batch: int, where: str) -> None:
    """Bars of the FLOPs ratio and the two time ratios per model, with the time ratio each target
    allows marked over its bar and the accuracy change under the model's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = []
    for r in results:
        label = Path(r["model_dir"]).name.replace(f"-{r['model']}", "\n")
        if "accuracy_change_points" in r:
            label += f"\nacc. {r['accuracy_change_points']:+.2f} pt"
        labels.append(label)
    xs = range(len(results))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(results), 4.4), dpi=120)
    width = 0.26
    ax.bar([i - width for i in xs], [r["flops_ratio"] for r in results], width, label="FLOPs ratio")
    for offset, key, label in (
        (0, "batch1", "time ratio, batch 1"),
        (width, f"batch{batch}", f"time ratio, batch {batch}"),
    ):
        ax.bar([i + offset for i in xs], [r[key]["time_ratio"] for r in results], width, label=label)
        if key in TARGETS:
            allowed = [TARGETS[key] * r["flops_ratio"] for r in results]
            ax.hlines(
                allowed, [i + offset - width / 2 for i in xs], [i + offset + width / 2 for i in xs], colors="black"
            )
    ax.plot([], [], color="black", label=f"target: {' / '.join(map(str, TARGETS.values()))} x the FLOPs ratio")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("dynamic / static")
    ax.set_title(f"cifar_resnet56 on {where}:\nFLOPs and wall-clock ratios", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def where_measured(data: dict) -> str:
    """The device a result file was measured on, for the plot's title."""
    results = data["results"]
    if results and results[0].get("device", "cpu") != "cpu":
        return results[0]["device"]
    return f"{data['machine']['cpu']} ({data['machine']['cores']} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--block",
        type=int,
        default=25,
        help="batch 1: the two models take turns every this many images (each runs warm, as when it serves alone); "
        "the image-by-image alternation is measured as well",
    )
    parser.add_argument(
        "--memory-format",
        choices=list(FORMATS),
        default="contiguous",
        help="layout of images and conv weights, the same for the static and the dynamic model",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where both models run (default: the GPU where there is one)",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="measure nothing: redraw the PNG of this device and format from its JSON in bench/results",
    )
    args = parser.parse_args()
    name = "-".join(
        [
            "speed",
            *(["cuda"] if args.device == "cuda" else []),
            *([args.memory_format] if args.memory_format != "contiguous" else []),
        ]
    )
    if args.replot:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        plot(data["results"], RESULTS / f"{name}.png", args.batch, where_measured(data))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU visible to PyTorch on this machine")
    if args.images < args.batch:
        parser.error(f"--images {args.images} is fewer than one batch (--batch {args.batch}): give at least that many")
    folders = args.folders or sorted(p for p in OUT.iterdir() if (p / "model" / "meta.json").is_file())
    results = []
    for folder in folders:
        result = measure(folder, args.images, args.rounds, args.batch, args.memory_format, args.device, args.block)
        results.append(result)
        print(
            f"{result['strategy']:>10} {folder.name}: FLOPs {result['flops_ratio']:.3f}, time batch 1 "
            f"{result['batch1']['time_ratio']:.3f}, batch {args.batch} {result[f'batch{args.batch}']['time_ratio']:.3f}"
        )
    if args.device == "cuda":
        gpu = f"measured on {torch.cuda.get_device_name(0)}"
    elif torch.cuda.is_available():
        gpu = "not measured: --device cpu"
    else:
        gpu = "not measured: no GPU on this machine"
    if args.folders:  # the models named were re-measured; the others keep their rows
        results = with_earlier_rows(name, results)
    data = {"machine": machine(), "gpu": gpu, "memory_format": args.memory_format, "results": results}
    write_result(name, data)
    plot(results, RESULTS / f"{name}.png", args.batch, where_measured(data))


if __name__ == "__main__":
    main()
