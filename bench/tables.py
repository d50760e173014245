"""Markdown tables of the benchmark results in bench/results/*.json (the README's table and
docs/results.md's).

python bench/tables.py [early_exit|skipnet|blockdrop|lite0|speed|speed-channels_last|speed-cuda|export|
                        summary|readme ...]
python bench/tables.py --write-readme   # README.md's table, between its results-table markers
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from common import REPO, RESULTS

VARIANT_LABELS = {"latency": ", latency-costed", "onnx-latency": ", costed in onnxruntime time"}


def early_exit(data: dict) -> str:
    rows = [
        "| data (test images) | static acc. | dynamic acc. | change | "
        "FLOPs ratio | exits taken (first ... full) | est. drop on calibration (95% bound) | conversion time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["runs"]:
        c = r["calibration_check"]
        bound = c.get("estimated_accuracy_drop_bound_95")
        rows.append(
            f"| {r['data']}{VARIANT_LABELS.get(r.get('variant'), '')} "
            f"({r['evaluated_samples']:,}) | {100 * r['static_accuracy']:.2f}% | "
            f"{100 * r['dynamic_accuracy']:.2f}% | {r['accuracy_change_points']:+.2f} pt | {r['flops_ratio']:.3f} | "
            f"{' / '.join(str(n) for n in r['exit_histogram'])} | {100 * c['estimated_accuracy_drop']:.2f} pt"
            f"{f' ({100 * bound:.2f})' if bound is not None else ''} | {r['conversion_seconds'] / 60:.1f} min |"
        )
    return "\n".join(rows)


def block_skip(data: dict) -> str:
    rows = [
        "| variant | static acc. | dynamic acc. | change | "
        "FLOPs ratio | blocks used (mean of total) | never run / input-dependent / always run | "
        "distinct policies | conversion time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["runs"]:
        rates = r.get("block_execution_rate", [])
        never = sum(rate == 0.0 for rate in rates)
        always = sum(rate == 1.0 for rate in rates)
        varying = len(rates) - never - always
        rows.append(
            f"| {r.get('gate') or r.get('variant')} | {100 * r['static_accuracy']:.2f}% | "
            f"{100 * r['dynamic_accuracy']:.2f}% | {r['accuracy_change_points']:+.2f} pt | {r['flops_ratio']:.3f} | "
            f"{r['blocks_used_mean']:.1f} of {r['blocks_total']} | {never} / {varying} / {always} | "
            f"{r['distinct_policies']} | {r['conversion_seconds'] / 60:.1f} min |"
        )
    return "\n".join(rows)


def lite0(data: dict) -> str:
    rows = [
        "| strategy | static acc. | dynamic acc. | change | loss vs best sweep point | FLOPs ratio | "
        "inserted MFLOPs | what it did | conversion time | peak memory (PSS / RSS sum) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["runs"]:
        done = r["dynamic"]
        if "exit_histogram" in done:
            did = "exits taken: " + " / ".join(str(n) for n in done["exit_histogram"])
        else:
            did = f"{done['blocks_used_mean']:.2f} of {done['blocks_total']} blocks"
            if same_blocks_for_every_image(r):
                did += ", the same for every image"
        rows.append(
            f"| {r['strategy']} | {100 * r['static_accuracy']:.2f}% | {100 * r['dynamic_accuracy']:.2f}% | "
            f"{r['accuracy_change_points']:+.2f} pt | {best_point(r)} | "
            f"{r['flops_ratio']:.3f} | {r['inserted_mflops']:.1f} | {did} | {r['conversion_seconds'] / 60:.1f} min | "
            f"{r['peak_pss_gb']:.2f} / {r['peak_rss_sum_gb']:.2f} GB |"
        )
    return "\n".join(rows)


def same_blocks_for_every_image(run: dict) -> bool:
    """Whether a block-skipping run's model made one decision for all images (a pruned network)."""
    return run.get("dynamic", {}).get("distinct_policies") == 1


def spread(ratio: dict, flops_ratio: float, digits: int = 3) -> str:
    """`` (low to high)`` of a quotient measured over several rounds, or nothing for one round;
    over the FLOPs ratio the measurement names for its own images, else ``flops_ratio``."""
    if "time_ratio_range" not in ratio:
        return ""
    flops_ratio = ratio.get("flops_ratio", flops_ratio)
    low, high = (r / flops_ratio for r in ratio["time_ratio_range"])
    return f" ({low:.{digits}f} to {high:.{digits}f})"


def accuracy_change(result: dict) -> str:
    """``+0.77 pt / +0.40 pt``: on the conversion's evaluation split, then on the timed images."""
    if "accuracy_change_points" not in result:
        return "not recorded in this run"
    return f"{result['accuracy_change_points']:+.2f} pt / {result['accuracy_change_points_timed_images']:+.2f} pt"


def quotient(result: dict, key: str, digits: int = 2) -> str:
    """The time/FLOPs quotient of one measurement of a speed row, or n/a where it was not taken."""
    measured = result.get(key)
    return f"{measured['time_ratio_over_flops_ratio']:.{digits}f}" if measured else "n/a"


def speed(data: dict) -> str:
    rows = [
        "| model folder | FLOPs ratio | accuracy change (test split / timed images) | time ratio, batch 1 | "
        "time/FLOPs, batch 1 (range over rounds) | time/FLOPs, batch 1, image by image | time/FLOPs, batch 1, "
        "decisions free | time/FLOPs, batch 1, stand-ins free | full depth / static, batch 1 | time ratio, batch 64 | "
        "time/FLOPs, batch 64 (range over rounds) | time/FLOPs, stream of 64s | static ms (batch 1 / 64) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["results"]:
        b1, b64 = r["batch1"], r["batch64"]
        depth = r.get("batch1_full_depth")
        full_depth = f"{depth['time_ratio']:.2f}" if depth else "n/a"
        if "batch1_block" in r:
            steady = f"{b1['time_ratio']:.3f} | {quotient(r, 'batch1')}{spread(b1, r['flops_ratio'], 2)}"
            alternating = quotient(r, "batch1_alternating")
        else:  # rows from before the turns of several images: batch 1 was timed image by image
            steady, alternating = "n/a | n/a", f"{b1['time_ratio_over_flops_ratio']:.2f}"
        rows.append(
            f"| {Path(r['model_dir']).name} | {r['flops_ratio']:.3f} | {accuracy_change(r)} | {steady} | "
            f"{alternating} | {quotient(r, 'batch1_decisions_free')} | {quotient(r, 'batch1_stand_ins_free')} | "
            f"{full_depth} | {b64['time_ratio']:.3f} | {b64['time_ratio_over_flops_ratio']:.2f}"
            f"{spread(b64, r['flops_ratio'], 2)} | "
            f"{quotient(r, 'stream64')} | {b1['static_ms']:.2f} / {b64['static_ms']:.1f} |"
        )
    return "\n".join(rows)


def export(data: dict) -> str:
    rows = [
        "| model folder | FLOPs ratio | form | time ratio, batch 1 | time/FLOPs, batch 1 (range over rounds) "
        "| time ratio, batch 64 "
        "| check: max logit diff, decisions | static ms, batch 1: prepared / plain export |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["results"]:
        ms = r["batch1"]["ms"]
        static_ms = f"{ms['static']:.2f} / {ms['static_plain']:.2f}" if "static_plain" in ms else f"{ms['static']:.2f}"
        for form in ("gather", "cond"):
            b1, b64, check = r["batch1"][form], r["batch64"][form], r["check"][form]
            label = f"{form} (default)" if form == r["default_form"] else form
            decisions = "identical" if check["decisions_identical"] else "DIFFER"
            rows.append(
                f"| {Path(r['model_dir']).name} | {r['flops_ratio']:.3f} | {label} | {b1['time_ratio']:.3f} | "
                f"{b1['time_ratio_over_flops_ratio']:.3f}{spread(b1, r['flops_ratio'])} | {b64['time_ratio']:.3f} | "
                f"{check['max_abs_logit_diff']:.1e}, {decisions} | {static_ms} |"
            )
    return "\n".join(rows)


def summary() -> str:
    """One row per conversion in speed.json: accuracy, FLOPs, and the time/FLOPs quotients in
    PyTorch (default memory format) and, where bench/export.py timed the same conversion, in
    onnxruntime (the strategy's default form)."""
    speed_rows = json.loads((RESULTS / "speed.json").read_text())["results"]
    exports = {Path(r["model_dir"]).name: r for r in json.loads((RESULTS / "export.json").read_text())["results"]}
    rows = [
        "| conversion | accuracy change | FLOPs ratio | time/FLOPs, PyTorch batch 1 (target 1.15) | "
        "PyTorch batch 1, image by image | PyTorch batch 64 (target 1.25) | onnxruntime batch 1 (target 1.2) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in speed_rows:
        name = Path(r["model_dir"]).name
        exported = exports.get(name)
        # the same folder may hold a later conversion than the one the other bench timed: rows
        # join only when they name the same conversion
        onnx = "not timed for this conversion"
        if exported is not None and exported.get("conversion") == r.get("conversion"):
            onnx = f"{exported['batch1'][exported['default_form']]['time_ratio_over_flops_ratio']:.2f}"
        rows.append(
            f"| {name} | {r['accuracy_change_points']:+.2f} pt | {r['flops_ratio']:.3f} | "
            f"{quotient(r, 'batch1')} | {quotient(r, 'batch1_alternating')} | {quotient(r, 'batch64')} | {onnx} |"
        )
    return "\n".join(rows)


# The README's table: one row per conversion, each read from its bench's JSON file (the default
# recipe's run of that strategy on that data) and joined with that conversion's row in
# the speed file of its data set (README_DATA). Another strategy's row is one more entry here.
README_ROWS = [
    ("early exit", "early_exit.json", "cifar10-jpeg", "early-exit"),
    ("SkipNet", "skipnet.json", "cifar10-jpeg", "skipnet"),
    ("BlockDrop", "blockdrop.json", "cifar10-jpeg", "blockdrop"),
    ("cascade ResNet-20 → 56", "cascade.json", "cifar10-jpeg", "cascade"),
    ("Lite0 early exit", "lite0.json", "tiny-imagenet", "early-exit"),
    ("Lite0 SkipNet", "lite0.json", "tiny-imagenet", "skipnet"),
    ("Lite0 BlockDrop", "lite0.json", "tiny-imagenet", "blockdrop"),
    ("Lite0 resolution cascade", "resolution.json", "tiny-imagenet", "resolution"),
]
# per data set: what its evaluation images are, and the speed file its conversions were timed in
# (the CIFAR models in PyTorch's default memory format; Lite0 channels-last, as a CPU runs it)
README_DATA = {
    "cifar10-jpeg": ("CIFAR-10 test images", "speed.json", "default memory format"),
    "tiny-imagenet": ("Tiny-ImageNet validation images (200-way)", "speed-channels_last.json", "channels-last"),
}
README_MARKERS = ("<!-- results-table:start -->", "<!-- results-table:end -->")


def default_run(data: dict, data_name: str, strategy: str) -> dict | None:
    """The default recipe's run of ``strategy`` on ``data_name`` in one bench's JSON file."""
    for r in data["runs"]:
        default = r.get("variant", "default") == "default"
        if (
            default
            and r.get("data", data.get("data")) == data_name
            and command_option(r["command"], "--strategy") == strategy
        ):
            return r
    return None


def command_option(command: str, option: str) -> str:
    """The value of ``option`` in the dynconvert command line a run recorded."""
    words = command.split()
    return words[words.index(option) + 1]


def timed_row(run: dict, timed: list[dict]) -> dict | None:
    """The row of the speed bench that timed the same conversion as ``run``: same strategy, model
    and data, and the same accuracy change on the whole evaluation split (both benches read it
    from the conversion's report.json); None when the conversion was not timed."""
    strategy = command_option(run["command"], "--strategy")
    model = run["command"].split()[1]
    data = Path(command_option(run["command"], "--data")).name
    for r in timed:
        # a cascade's speed row names its models joined by "+", its command the first one first
        timed_model = r["model"].split("+")[0]
        if (r["strategy"], timed_model, Path(r["data"]).name) == (strategy, model, data) and math.isclose(
            r.get("accuracy_change_points", math.nan), run["accuracy_change_points"], abs_tol=1e-9
        ):
            return r
    return None


def best_point(run: dict) -> str:
    """The loss against the most accurate point of the conversion's own sweep on the evaluation
    split, where the run recorded it (runs before the report had it did not)."""
    loss = run.get("accuracy_drop_vs_best_point_points")
    return "not recorded" if loss is None else f"{round(loss, 2) + 0.0:.2f} pt"  # no "-0.00"


def readme() -> str:
    """The README's one table (README_ROWS), then a line per data set naming its images, the
    files and the machines the figures come from."""
    rows = [
        "| conversion | static acc. | dynamic acc. | accuracy change | loss vs best sweep point | FLOPs ratio | "
        "time ratio, batch 1 | quotient, batch 1 | time ratio, batch 64 | quotient, batch 64 | conversion time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    sources: dict[str, dict] = {}
    for label, file, data_name, strategy in README_ROWS:
        data = json.loads((RESULTS / file).read_text())
        run = default_run(data, data_name, strategy)
        if run is None:
            continue
        speed_file = README_DATA[data_name][1]
        speed_data = json.loads((RESULTS / speed_file).read_text())
        timed = timed_row(run, speed_data["results"])
        source = sources.setdefault(data_name, {"files": {}, "machines": {}, "samples": set(), "timed": set()})
        source["files"][file] = None
        source["machines"].setdefault(run.get("measured_on", data["machine"]["cpu"]), {})[file] = None
        source["samples"].add(run["evaluated_samples"])
        times = "not timed | n/a | not timed | n/a"
        if timed is not None:
            source["machines"].setdefault(timed.get("measured_on", speed_data["machine"]["cpu"]), {})[speed_file] = None
            source["timed"].add(timed["images"])
            source["torch"] = speed_data["machine"]
            b1, b64 = timed["batch1"], timed["batch64"]
            times = (
                f"{b1['time_ratio']:.3f} | {b1['time_ratio_over_flops_ratio']:.2f} | "
                f"{b64['time_ratio']:.3f} | {b64['time_ratio_over_flops_ratio']:.2f}"
            )
        if same_blocks_for_every_image(run):
            label += " (fixed blocks)"
        rows.append(
            f"| {label} | {100 * run['static_accuracy']:.2f}% | {100 * run['dynamic_accuracy']:.2f}% | "
            f"{run['accuracy_change_points']:+.2f} pt | {best_point(run)} | {run['flops_ratio']:.3f} | {times} | "
            f"{run['conversion_seconds'] / 60:.1f} min |"
        )
    rows.append("")
    for data_name, source in sources.items():
        described, speed_file, layout = README_DATA[data_name]
        files = ", ".join(f"`bench/results/{file}`" for file in source["files"])
        machines = source["machines"]
        where = (
            next(iter(machines))
            if len(machines) == 1
            else "; ".join(f"{cpu} ({', '.join(used)})" for cpu, used in machines.items())
        )
        samples = " / ".join(f"{n:,}" for n in sorted(source["samples"]))
        timing = ""
        if source["timed"]:
            timer = source["torch"]
            first = " / ".join(str(n) for n in sorted(source["timed"]))
            timing = (
                f"; times: PyTorch {timer['torch']} on {timer['cores']} cores, {layout}, the first {first} of "
                f"those images (`bench/results/{speed_file}`)"
            )
        rows.append(
            f"{data_name}: all {samples} {described}, default recipes ({files}){timing}. Measured on {where}.\n"
        )
    return "\n".join(rows).rstrip()


def write_readme(path: Path = REPO / "README.md") -> None:
    """Replace what lies between README_MARKERS in ``path`` with readme()."""
    text = path.read_text()
    start, end = README_MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{path}: expected one {start} before one {end}")
    head, rest = text.split(start)
    tail = rest.split(end)[1]
    path.write_text(f"{head}{start}\n{readme()}\n{end}{tail}")


def provenance(data: dict) -> str:
    """Which processor the rows were measured on: one line, naming the rows when they differ."""
    rows = data.get("results") or data.get("runs") or []
    default = data.get("machine", {}).get("cpu", "not recorded")
    by_machine: dict[str, list[str]] = {}
    for r in rows:
        if "model_dir" in r:
            label = Path(r["model_dir"]).name
        elif "data" in r:  # early-exit runs: one per data set and variant
            label = Path(r["data"]).name + ("" if r.get("variant", "default") == "default" else f" {r['variant']}")
        else:
            label = r.get("gate") or r.get("variant", "?")
        by_machine.setdefault(r.get("measured_on", default), []).append(label)
    if len(by_machine) <= 1:
        return f"Measured on {next(iter(by_machine), default)}."
    return "Measured on " + "; ".join(f"{cpu}: {', '.join(labels)}" for cpu, labels in by_machine.items()) + "."


RENDER = {
    "early_exit": early_exit,
    "skipnet": block_skip,
    "blockdrop": block_skip,
    "lite0": lite0,
    "speed": speed,
    "speed-channels_last": speed,
    "speed-cuda": speed,
    "export": export,
}


def main() -> None:
    if sys.argv[1:] == ["--write-readme"]:
        write_readme()
        return
    for name in sys.argv[1:] or [*RENDER, "summary", "readme"]:
        if name in ("summary", "readme"):
            print(f"## {name}\n\n{summary() if name == 'summary' else readme()}\n")
            continue
        path = RESULTS / f"{name}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            print(f"## {name}\n\n{RENDER[name](data)}\n\n{provenance(data)}\n")


if __name__ == "__main__":
    main()
