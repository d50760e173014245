"""Export a dynamic model to ONNX with its per-sample decisions, then check it in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from dynconvert.errors import DynconvertError
from dynconvert.export.check import check_batches, check_onnx
from dynconvert.export.layout import prepare_layout
from dynconvert.files import replaced_on_success, write_json

log = logging.getLogger(__name__)
MAX_BATCH = 4096


def check_path(path: Path) -> Path:
    """Where the check's report of the model at ``path`` goes: ``PATH.check.json``."""
    return path.with_name(path.name + ".check.json")


def export_dynamic_onnx(
    dyn: nn.Module,
    graph: nn.Module,
    path: str | Path,
    *,
    images: torch.Tensor | None = None,
    random_inputs: int = 64,
    overwrite: bool = False,
) -> dict:
    """Export ``graph`` (the export form of ``dyn``, returning ``(logits, decisions)`` and naming
    them in ``graph.output_names``) to ONNX at ``path``, batch dimension dynamic, and check it
    against ``dyn.route`` on ``images`` (normalized; None: random inputs only) and
    ``random_inputs`` random inputs in onnxruntime. The report goes to ``PATH.check.json`` and is
    returned. ``dynconvert.export_onnx`` is the public entry, which picks the graph and images.

    Raises DynconvertError when a file exists and ``overwrite`` is false, when export fails, or
    when the check fails (then no model is written; the report still is).
    """
    path = Path(path)
    report_path = check_path(path)
    for existing in (path, report_path):
        if existing.exists() and not overwrite:
            raise DynconvertError(f"'{existing}' exists; pass overwrite=True (--force) to replace it")
    input_size = _input_size(dyn, images)
    example = images[:2] if images is not None and len(images) >= 2 else torch.randn(2, *input_size)
    with replaced_on_success(path) as tmp:  # a model that fails its check is not written
        export_module(graph, example, tmp, list(graph.output_names))
        batches = check_batches(images, random_inputs, input_size)
        try:
            report = check_onnx(tmp, dyn, batches)
        except DynconvertError as exc:
            write_json(report_path, {**_describe(dyn, graph), **exc.report})
            raise
        report = {**_describe(dyn, graph), **report}
        write_json(report_path, report)
    log.info("exported %s; check passed (max logit difference %.2g)", path, report["max_abs_logit_diff"])
    return report


def input_size_of(dyn: nn.Module, images: torch.Tensor | None) -> tuple[int, ...]:
    """The per-sample input shape: that of ``images``, else the one the model was converted at."""
    return _input_size(dyn, images)


def export_static_onnx(
    model: nn.Module, path: str | Path, example: torch.Tensor, *, overwrite: bool = False, prepare: bool = True
) -> Path:
    """Export a static network to ONNX (batch dimension dynamic, output ``logits``) the way
    ``dynconvert.export_onnx`` exports the dynamic ones: traced with torch.fx and prepared for
    onnxruntime's blocked convolution layout (see ``dynconvert.export.layout``), so the two
    are compared like for like. A network torch.fx cannot trace is exported as it is, and so
    is every network with ``prepare=False`` (torch.onnx.export alone, for comparison).

    Raises DynconvertError when ``path`` exists and ``overwrite`` is false, or when export fails.
    """
    from dynconvert.toolkit.trace import trace

    path = Path(path)
    if path.exists() and not overwrite:
        raise DynconvertError(f"'{path}' exists; pass overwrite=True to replace it")
    graph = model.eval()
    if prepare:
        try:
            graph = prepare_layout(trace(model))
        except DynconvertError as exc:
            log.warning("exporting %s without layout preparation: %s", type(model).__name__, exc)
    with replaced_on_success(path) as tmp:
        export_module(graph, example, tmp, ["logits"])
    return path


def export_module(graph: nn.Module, example: torch.Tensor, path: Path, output_names: list[str]) -> None:
    """Export ``graph`` (one input ``x``, batch dimension dynamic) to ONNX at ``path``, without the
    exporter's per-node records; raises DynconvertError when export fails."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                (example,),
                input_names=["x"],
                output_names=output_names,
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:
        raise DynconvertError(f"torch.onnx.export failed for {type(graph).__name__}: {exc}") from exc
    _strip_trace_metadata(program.model)
    program.save(str(path))


def _strip_trace_metadata(model) -> None:
    """Drop the exporter's per-node records (stack traces, the FX node's text, name scopes).

    Each ``If`` node records the whole subgraph it holds, so with nested exits these records
    made up nine tenths of the file (97 MB against 9 MB of weights for ResNet-56 with exits).
    """
    import onnx_ir

    for graph in (model.graph, *model.graph.subgraphs()):
        graph.metadata_props.clear()
    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
        node.doc_string = None


@contextlib.contextmanager
def _quiet_exporter():
    """Keep the exporter's progress lines and graph-pass notices (warnings included: empty
    attribute lists it builds itself) out of the user's log; failures still raise."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _input_size(dyn: nn.Module, images: torch.Tensor | None) -> tuple[int, ...]:
    if images is not None:
        return tuple(images.shape[1:])
    prep = getattr(dyn, "preprocess", None)
    if prep is None:
        raise DynconvertError("pass images=... : the model carries no input size (no preprocess)")
    return tuple(prep.input_size)


def _describe(dyn: nn.Module, graph: nn.Module) -> dict:
    import onnxruntime

    recipe = getattr(dyn, "recipe", None)
    return {
        "model": recipe.model.name if recipe is not None else type(dyn).__name__,
        "strategy": recipe.strategy if recipe is not None else None,
        "form": graph.form,
        "outputs": list(graph.output_names),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
