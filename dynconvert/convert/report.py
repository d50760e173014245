"""The conversion report: ``report.json`` and ``report.png`` (accuracy against FLOPs)."""

from __future__ import annotations

from pathlib import Path

from dynconvert.files import replaced_on_success
from dynconvert.toolkit.costs import FLOPS_DEFINITION


def build_report(static: dict, dynamic: dict, static_flops: float, splits: dict, extra: dict) -> dict:
    """Assemble the report dictionary from the static and dynamic evaluations.

    Besides the loss against the static model, the loss against the most accurate point of the
    conversion's own sweep on the evaluation split (``accuracy_drop_vs_best_point``): fitted
    parts can beat the original on a data set it was not trained on, which would hide what
    the decisions cost. Labelled points of that sweep (a cascade's models alone) are compared
    one by one (``accuracy_drop_vs_labelled``).
    """
    sweep = extra.get("sweep_on_evaluation") or []
    curve = [p["accuracy"] for p in sweep if "label" not in p]
    labelled = {p["label"]: p["accuracy"] - dynamic["accuracy"] for p in sweep if "label" in p}
    return {
        "static": {"accuracy": static["accuracy"], "flops": static_flops},
        "dynamic": {k: v for k, v in dynamic.items() if k not in ("samples", "decisions")},
        "accuracy_change": dynamic["accuracy"] - static["accuracy"],
        "accuracy_drop_vs_best_point": max([*curve, static["accuracy"]]) - dynamic["accuracy"],
        **({"accuracy_drop_vs_labelled": labelled} if labelled else {}),
        "flops_ratio": dynamic["flops"] / static_flops,
        "evaluated_samples": dynamic["samples"],
        "splits": splits,
        "flops_definition": FLOPS_DEFINITION,
        **extra,
    }


def plot_report(path: Path, report: dict, title: str) -> None:
    """Accuracy against FLOPs ratio: the sweep on calibration and evaluation data, the static
    model and the chosen operating point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    points = report.get("sweep_on_evaluation") or []
    curve = [p for p in points if "label" not in p]
    for p, marker in zip([p for p in points if "label" in p], "o^vD<>ph"):
        ax.plot([p["flops_ratio"]], [100 * p["accuracy"]], marker, color="tab:green", label=p["label"])
    if curve:
        ax.plot(
            [p["flops_ratio"] for p in curve],
            [100 * p["accuracy"] for p in curve],
            "-",
            color="tab:blue",
            label=f"sweep, {report['splits']['evaluation']} split",
        )
    cal = report.get("calibration", {}).get("sweep") or []
    base = report.get("calibration", {}).get("calibration_static_accuracy")
    if cal and base is not None:
        ax.plot(
            [p["flops_ratio"] for p in cal],
            [100 * (base - p["accuracy_drop"]) for p in cal],
            "--",
            color="tab:gray",
            label="sweep, calibration data (vs. reference)",
        )
    ax.plot([1.0], [100 * report["static"]["accuracy"]], "s", color="black", label="static model")
    ax.plot(
        [report["flops_ratio"]],
        [100 * report["dynamic"]["accuracy"]],
        "*",
        color="tab:red",
        markersize=14,
        label="chosen operating point",
    )
    ax.set_xlabel("FLOPs / static FLOPs (per sample, inserted modules included)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with replaced_on_success(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
