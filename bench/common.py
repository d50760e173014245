"""Shared helpers of the benchmarks: where the assets are, what machine ran, running the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DYNCONVERT_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results"
OUT = REPO / "bench" / "out"
# reading a large process's memory map costs the kernel time: sample often enough to catch a
# peak that lasts a batch, seldom enough not to slow what is measured
SAMPLE_SECONDS = 1.0


def machine() -> dict:
    """A description of the machine the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_cli(args: list[str], out: Path, cold_cache: bool = True) -> tuple[dict, float]:
    """Run ``dynconvert ARGS --out OUT --force`` as a user would; return (report, wall seconds).

    With ``cold_cache`` the decoded-image cache starts empty, so decoding counts in the time.
    """
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        if cold_cache:
            env["DYNCONVERT_CACHE"] = cache
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "dynconvert.cli", *args, "--out", str(out), "--force"], check=True, env=env
        )
        seconds = time.perf_counter() - start
    return json.loads((out / "report.json").read_text()), seconds


def tree_memory(root: int) -> tuple[int, int]:
    """(PSS, RSS) in bytes, summed over ``root`` and all its descendants (from /proc)."""
    pss = rss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):  # the process ended while being read
            continue
    return pss, rss


def peak_memory(command: list[str], env: dict) -> tuple[int, int]:
    """(peak PSS, peak RSS sum) in bytes of the command's process tree."""
    process = subprocess.Popen(command, env=env)
    peak, done = [0, 0], threading.Event()

    def sample():
        while not done.is_set():
            for k, value in enumerate(tree_memory(process.pid)):
                peak[k] = max(peak[k], value)
            time.sleep(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"the conversion failed (exit {code}): {' '.join(command)}")
    return peak[0], peak[1]


def run_cli_with_memory(args: list[str], out: Path) -> tuple[dict, float, dict]:
    """``run_cli`` with an empty decoded-image cache, also sampling the memory of the whole
    process tree (``peak_memory``); returns (report, wall seconds, peak PSS and RSS sum in GB)."""
    command = [sys.executable, "-m", "dynconvert.cli", *args, "--out", str(out), "--force"]
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        pss, rss = peak_memory(command, {**os.environ, "DYNCONVERT_CACHE": cache})
        seconds = time.perf_counter() - start
    memory = {"peak_pss_gb": round(pss / 1e9, 3), "peak_rss_sum_gb": round(rss / 1e9, 3)}
    return json.loads((out / "report.json").read_text()), seconds, memory


def lite0_command(strategy: str, *extra: str) -> list[str]:
    """The CLI arguments converting EfficientNet-Lite0 (ImageNet-1k weights) on Tiny-ImageNet."""
    weights = SHARED / "models" / "imagenet" / "tf_efficientnet_lite0.safetensors"
    data = SHARED / "data" / "tiny-imagenet"
    return ["tf_efficientnet_lite0", "--strategy", strategy, "--weights", str(weights), "--data", str(data), *extra]


def accuracy_fields(report: dict) -> dict:
    """The figures every conversion row states: the split sizes, the static and dynamic accuracy,
    the loss against the static model and against the best point of the conversion's own sweep
    on the evaluation split (in points), and the FLOPs ratio."""
    return {
        "splits": report["splits"],
        "evaluated_samples": report["evaluated_samples"],
        "static_accuracy": report["static"]["accuracy"],
        "dynamic_accuracy": report["dynamic"]["accuracy"],
        "accuracy_change_points": 100 * report["accuracy_change"],
        "accuracy_drop_vs_best_point_points": 100 * report["accuracy_drop_vs_best_point"],
        "flops_ratio": report["flops_ratio"],
    }


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside (the same on every checkout)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO))
    except ValueError:
        return str(resolved)


def conversion_id(folder: Path) -> str:
    """A short fingerprint of the conversion in ``folder`` (of its ``report.json``): rows of two
    benches that name it timed the same conversion, not two that shared the folder in turn."""
    return hashlib.sha256((Path(folder) / "report.json").read_bytes()).hexdigest()[:12]


def with_earlier_rows(name: str, rows: list[dict], field: str = "results", key=None) -> list[dict]:
    """The rows of ``bench/results/NAME.json`` (list ``field``) with ``rows`` in them: a row of
    ``rows`` takes the place of the earlier row it replaces, the others follow at the end, so
    re-measuring some keeps the others' figures, each from its own run, and the tables' order.
    Rows are matched by ``key(row)``, by default the name of the model folder (``model_dir``).

    Every row names the processor it was measured on (``measured_on``): the new ones this
    machine's, earlier ones without it their file's, so a table of rows from several runs says
    where each came from."""
    key = key or (lambda r: Path(r["model_dir"]).name)
    here = machine()["cpu"]
    rows = [{**r, "measured_on": r.get("measured_on", here)} for r in rows]
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return rows
    measured = {key(r): r for r in rows}
    data = json.loads(path.read_text())
    there = data.get("machine", {}).get("cpu", "not recorded")
    earlier = [{**r, "measured_on": r.get("measured_on", there)} for r in data[field]]
    kept = [measured.pop(key(r), r) for r in earlier]
    return kept + [r for r in rows if key(r) in measured]


def write_result(name: str, data: dict) -> Path:
    """Write ``bench/results/NAME.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
