"""Coverage of the automatic insertion points across timm architectures, for every strategy.

    python bench/coverage.py [--models resnet18 vit_tiny_patch16_224 ...] [--strategies skipnet ...]

Each (model, strategy) pair is checked with random weights at a small input (see
``dynconvert/coverage/check.py``: prepare, invariance, one training step, hard decisions, save/load); the
first failing step is recorded. Writes docs/coverage.md and bench/results/coverage.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from common import REPO, RESULTS, machine
from tqdm.auto import tqdm

import dynconvert
from dynconvert.convert.save import versions
from dynconvert.coverage import all_specs, check_model, spec_for

DEFAULT_MD = REPO / "docs" / "coverage.md"
DEFAULT_JSON = RESULTS / "coverage.json"


# What the failures seen so far come from (diagnosed by hand); shown next to the matching group.
KNOWN_CAUSES = [
    (
        "but the architecture has residual blocks",
        "the residual additions are out of the analysis' sight: inside a module timm marks as not "
        "traceable (NF-Net's `NormFreeBlock` is an fx leaf), or between points where more than one "
        "value is alive (CoaT hands the feature size (H, W) from block to block next to the tokens)",
    ),
    (
        "the traced graph has no block ends",
        "no point of the traced graph has a single live tensor (CoaT hands the feature size (H, W) "
        "from block to block next to the tokens), so there is no place to cut",
    ),
    (
        "modified by an inplace operation",
        "the skipped form of a unit mutates its input: with the addition removed, the in-place "
        "activation after it (`ReLU(inplace=True)`) runs on the shortcut, which is the unit's input "
        "(`passes/residual.py: skipped_form`); `forward_relaxed` then runs the full form on the mutated "
        "tensor and autograd refuses",
    ),
    (
        "Expected gradient function to be set",
        "torch's `FlopCounterMode` (its module tracker) under `torch.no_grad` fails on a module input "
        "that is a view of a parameter (`AttentionPoolLatent`: `latent.expand(...)`, ViTs with "
        "`global_pool='map'`); `convert/costs.py` counts FLOPs under `no_grad` with parameters that require grad",
    ),
]


def known_cause(reason: str) -> str | None:
    return next((cause for key, cause in KNOWN_CAUSES if key in reason), None)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def run_checks(specs, strategies: list[str], timeout: int) -> list[dict]:
    """Every (model, strategy) pair, with a progress bar; a pair over ``timeout`` seconds fails."""
    records = []
    pairs = [(spec, strategy) for spec in specs for strategy in strategies]
    use_alarm = timeout > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
    with tqdm(pairs, desc="coverage", unit="check") as bar:
        for spec, strategy in bar:
            bar.set_postfix_str(f"{spec.name} {strategy}")
            if use_alarm:
                signal.alarm(timeout)
            try:
                record = check_model(spec, strategy)
            except _Timeout:
                record = {
                    "model": spec.name,
                    "family": spec.family,
                    "strategy": strategy,
                    "size": spec.size,
                    "timm_kwargs": dict(spec.kwargs),
                    "result": "FAIL",
                    "step": "timeout",
                    "reason": f"the check took more than {timeout} s",
                    "where": None,
                    "details": {},
                    "seconds": float(timeout),
                }
            finally:
                if use_alarm:
                    signal.alarm(0)
            if record["result"] == "FAIL":
                tqdm.write(f"FAIL {spec.name} {strategy} [{record['step']}]: {record['reason']}")
            records.append(record)
    return records


def summarize(records: list[dict], strategies: list[str]) -> dict:
    """Per strategy: passes, failures, not applicable, and the pass rate over the applicable pairs."""
    out = {}
    for strategy in strategies:
        counts = Counter(r["result"] for r in records if r["strategy"] == strategy)
        applicable = counts["pass"] + counts["FAIL"]
        out[strategy] = {
            "pass": counts["pass"],
            "fail": counts["FAIL"],
            "not_applicable": counts["n/a"],
            "applicable": applicable,
            "pass_rate": counts["pass"] / applicable if applicable else None,
        }
    return out


def _cell(text: str, limit: int = 170) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _input(record: dict) -> str:
    kwargs = ", ".join(f"{k}={v}" for k, v in record["timm_kwargs"].items())
    return f"{record['size']}px" + (f" ({kwargs})" if kwargs else "")


def render_markdown(records: list[dict], summary: dict, command: str, meta: dict) -> str:
    models = list(dict.fromkeys(r["model"] for r in records))
    strategies = list(summary)
    lines = [
        "# Coverage of automatic insertion points",
        "",
        "Every strategy on timm architectures with random weights at a small input. Each pair goes through",
        "five steps and the first failure is recorded:",
        "",
        "1. **prepare**: trace + plan + insert (`strategy.prepare`, as `convert_recipe` calls it);",
        "2. **invariance**: no exit taken / every block kept, the dynamic model equals the original",
        "   (within 1e-4 of the output scale, batch 3 and batch 1);",
        "3. **train**: one Adam step on the inserted parameters (`dyn.*`): finite loss, some inserted",
        "   parameter changed, backbone (parameters and BatchNorm statistics) unchanged;",
        "4. **hard**: every decision taken (all samples leave at the first exit / every block dropped):",
        "   output of shape (batch, 10), finite;",
        "5. **save_load**: `dynconvert.save(dyn, dir)` then `dynconvert.load(dir)` gives the same routed",
        "   outputs and decisions (and, for early exit, every head's logits). The base is recorded as the",
        "   Python API records a timm instance handed in (architecture, shaping arguments, preprocessing,",
        "   weights stored beside), so the load rebuilds it alone; where the instance was created with",
        "   arguments that cannot be read back from it, the load says to pass it and the check does",
        "   (`load(dir, model=base)`); the summary counts both.",
        "",
        "A block-skipping strategy on a network with no residual block is *n/a*, not a pass; on a network",
        "whose architecture has residual blocks (per its timm source) finding none is a failure.",
        "",
        "The base model's `pretrained_cfg['input_size']` is set to the check's input size: dynconvert",
        "reads the input size from the model's pretrained config, and saves it with the converted model",
        '(exit heads depend on the feature-map size). The "reason" column of a pass says what was',
        "inserted: exits, or gated units out of all units the network was cut into.",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"dynconvert {meta['versions']['dynconvert']}, torch {meta['versions']['torch']}, "
        f"timm {meta['versions']['timm']}; {len(models)} models, {meta['seconds']:.0f} s on {meta['machine']['cpu']}.",
        "",
        "## Summary",
        "",
        "| strategy | pass / applicable | pass rate | n/a | passes loaded by architecture alone |",
        "| --- | --- | --- | --- | --- |",
    ]
    for strategy, s in summary.items():
        rate = f"{100 * s['pass_rate']:.0f}%" if s["pass_rate"] is not None else "-"
        alone = sum(r["strategy"] == strategy and r["details"].get("loaded") == "by architecture" for r in records)
        lines.append(
            f"| {strategy} | {s['pass']} / {s['applicable']} | {rate} | {s['not_applicable']} | {alone} / {s['pass']} |"
        )
    lines += ["", "By family (passes / applicable per strategy):", ""]
    lines += ["| family | models | " + " | ".join(strategies) + " |", "| --- | --- |" + " --- |" * len(strategies)]
    by_family = defaultdict(list)
    for r in records:
        by_family[r["family"]].append(r)
    for family, rows in by_family.items():
        cells = []
        for strategy in strategies:
            mine = [r for r in rows if r["strategy"] == strategy]
            applicable = [r for r in mine if r["result"] != "n/a"]
            passed = sum(r["result"] == "pass" for r in applicable)
            cells.append(f"{passed} / {len(applicable)}" if applicable else "n/a")
        n_models = len({r["model"] for r in rows})
        lines.append(f"| {family} | {n_models} | " + " | ".join(cells) + " |")
    failures = [r for r in records if r["result"] == "FAIL"]
    if failures:
        lines += ["", "## Failures grouped by reason", ""]
        groups = defaultdict(list)
        for r in failures:
            groups[(r["step"], _group_key(r["reason"]))].append(f"{r['model']} ({r['strategy']})")
        for (step, reason), who in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- **{step}**: {_cell(reason, 200)} ({len(who)}): {', '.join(who)}")
            cause = known_cause(reason)
            if cause:
                lines.append(f"  - cause: {cause}.")
    lines += [
        "",
        "## Results",
        "",
        "| model | family | input | strategy | result | step | reason |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        step = r["step"] or ""
        reason = r["reason"] if r["result"] != "pass" else r["details"].get("inserted", "")
        if r["result"] == "FAIL" and r.get("where"):
            reason = f"{reason} (at {r['where']})"
        cells = [r["model"], r["family"], _input(r), r["strategy"], r["result"], step, _cell(reason)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _group_key(reason: str) -> str:
    """A failure reason without the numbers and names that differ between models."""
    import re

    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", reason)
    return reason[:160]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="timm model names (default: dynconvert.coverage.MODELS)")
    parser.add_argument("--strategies", nargs="+", help="strategy names (default: every registered strategy)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per (model, strategy); 0 for none")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--md", type=Path, default=DEFAULT_MD)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("timm").setLevel(logging.ERROR)

    strategies = args.strategies or dynconvert.list_strategies()
    for name in strategies:
        if name not in dynconvert.list_strategies():
            parser.error(f"unknown strategy {name!r}; registered: {', '.join(dynconvert.list_strategies())}")
    specs = [spec_for(name) for name in args.models] if args.models else all_specs()
    started = time.perf_counter()
    records = run_checks(specs, strategies, args.timeout)
    summary = summarize(records, strategies)
    command = "python " + " ".join(shlex.quote(a) for a in [_relative(sys.argv[0]), *sys.argv[1:]])
    meta = {"versions": versions(), "machine": machine(), "seconds": time.perf_counter() - started}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, **meta, "strategies": strategies, "summary": summary, "results": records}
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(render_markdown(records, summary, command, meta))
    for strategy, s in summary.items():
        rate = f"{100 * s['pass_rate']:.0f}%" if s["pass_rate"] is not None else "-"
        print(f"{strategy}: {s['pass']} / {s['applicable']} pass ({rate}), {s['not_applicable']} n/a")
    print(f"wrote {args.md} and {args.json}")


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return path


if __name__ == "__main__":
    main()
