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
    parser.add_argument(
        "model",
        nargs="*",
        help="a timm model name, e.g. resnet50 or cifar_resnet56 (several, cheapest first, for cascade)",
    )
    parser.add_argument("--strategy", default=None, help="early-exit (default), or another registered strategy")
    parser.add_argument(
        "--weights",
        nargs="+",
        help="local checkpoint(s), one per model (state dict or safetensors; 'state_dict'/'model' nesting "
        "and 'module.' prefixes are fine)",
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
    parser.add_argument(
        "--list-options", metavar="STRATEGY", help="list a strategy's options (options.*) with defaults and help"
    )
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
        from dynconvert.strategies import get_strategy

        if args.list_options:
            print(format_options(get_strategy(args.list_options)))
            return 0
        if not args.model:
            raise DynconvertError("name the model to convert: dynconvert MODEL [...] (see dynconvert --help)")
        overrides = list(args.overrides)
        for key, value in (
            ("data.path", args.data),
            ("device", args.device),
            ("seed", args.seed),
        ):
            if value is not None:
                overrides.insert(0, f"{key}={value}")
        model = args.model if len(args.model) > 1 else args.model[0]
        recipe = build_recipe(args.recipe, model, args.strategy, overrides, args.weights)
        out = Path(args.out) if args.out else default_output(recipe)
        if args.export == "onnx":
            hint = get_strategy(recipe.strategy).from_options(recipe.options).export_hint(recipe)
            if hint:
                logging.getLogger(__name__).info(hint)
        dyn = convert_recipe(recipe, out=out, force=args.force, resume=args.resume)
        if args.export == "onnx":
            from dynconvert.convert.export_model import export_onnx

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


def format_options(strategy) -> str:
    """The strategy's options as a table: ``options.NAME  TYPE  default  help``."""
    rows = strategy.describe_options()
    lines = [f"strategy {strategy.name}: set with --set options.NAME=VALUE or under options: in a recipe"]
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        lines.append(f"  {r['name']:<{width}}  {r['type']} = {r['default']!r}\n  {'':<{width}}  {r['help']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
