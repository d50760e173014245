"""Command line: flags become a Recipe, then one call into the conversion pipeline."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dynconvert.errors import DynconvertError
from dynconvert.progress import set_quiet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynconvert",
        description="Convert a pretrained static network into a dynamic one that computes less on easy inputs.",
    )
    parser.add_argument("model", help="a timm model name, e.g. resnet50 or cifar_resnet56")
    parser.add_argument("--strategy", default=None, help="early-exit (default), or another registered strategy")
    parser.add_argument(
        "--weights", help="local checkpoint (state dict; 'state_dict'/'model' nesting and 'module.' prefixes are fine)"
    )
    parser.add_argument("--data", help="local data folder (parquet, imagefolder) or a hub data set name")
    parser.add_argument("--recipe", help="built-in recipe name or YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.epochs=3 (repeatable)",
    )
    parser.add_argument("--out", help="output folder (default: ./dynconvert-out/MODEL-STRATEGY)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--export",
        choices=["onnx"],
        help="also export the converted model (OUT/model.onnx) and check it in onnxruntime (OUT/model.onnx.check.json)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted conversion to --out from its last checkpoint (OUT.resume/)",
    )
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dynconvert`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all
    quiet = args.quiet or not main_rank
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    set_quiet(quiet)
    try:
        from dynconvert.convert.pipeline import convert_recipe, default_output
        from dynconvert.recipe import build_recipe

        overrides = list(args.overrides)
        for key, value in (
            ("model.weights", args.weights),
            ("data.path", args.data),
            ("device", args.device),
            ("seed", args.seed),
        ):
            if value is not None:
                overrides.insert(0, f"{key}={value}")
        recipe = build_recipe(args.recipe, args.model, args.strategy, overrides)
        out = Path(args.out) if args.out else default_output(recipe)
        if args.export == "onnx":
            _hint_onnx_costs(recipe)
        dyn = convert_recipe(recipe, out=out, force=args.force, resume=args.resume)
        if args.export == "onnx":
            from dynconvert.export import export_onnx

            export_onnx(dyn, out / "model.onnx", overwrite=args.force)
    except DynconvertError as exc:
        if args.debug:
            raise
        print(f"dynconvert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynconvert: interrupted", file=sys.stderr)
        return 130
    finally:
        set_quiet(False)
    if not main_rank:
        return 0
    r = dyn.report
    print(
        f"{r['model']} {r['strategy']}: accuracy {100 * r['static']['accuracy']:.2f}% -> "
        f"{100 * r['dynamic']['accuracy']:.2f}%, FLOPs ratio {r['flops_ratio']:.3f} "
        f"on {r['evaluated_samples']} '{r['splits']['evaluation']}' images; written to {out}"
    )
    return 0


def _hint_onnx_costs(recipe) -> None:
    """Early exits priced in FLOPs alone or in PyTorch time, for a model exported to run in
    onnxruntime: say how to price them there (heads weigh more against its faster backbone)."""
    cal = recipe.calibrate
    if recipe.strategy != "early-exit":
        return
    if cal.cost == "flops" and not cal.head_overhead_mflops:
        priced = "FLOPs alone"
    elif cal.cost == "latency" and cal.latency_runtime == "pytorch":
        priced = "PyTorch time"
    else:
        return
    logging.getLogger(__name__).info(
        "exits are priced in %s; for a model that will run in onnxruntime, --set calibrate.cost=latency "
        "--set calibrate.latency_runtime=onnxruntime prices them in onnxruntime's time (docs/export.md)",
        priced,
    )


if __name__ == "__main__":
    sys.exit(main())
