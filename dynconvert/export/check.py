"""The check after export: onnxruntime must give PyTorch's logits and the same decisions."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from dynconvert.errors import DynconvertError

TOLERANCE = 1e-4
log = logging.getLogger(__name__)


def ort_session(path, threads: int = 0):
    """An onnxruntime CPU session of the model at ``path`` (``threads`` 0: onnxruntime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # unused-initializer notices are not the user's concern
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_batches(
    images: torch.Tensor | None, random: int, input_size, seed: int = 0
) -> list[tuple[str, torch.Tensor]]:
    """What the check runs, as (source, batch) pairs: the first real images one by one, the
    rest in batches of 64, one batch of an odd size, then ``random`` standard-normal inputs."""
    batches = []
    if images is not None and len(images):
        batches += [("images", images[i : i + 1]) for i in range(min(8, len(images)))]
        batches += [("images", images[i : i + 64]) for i in range(8, len(images), 64)]
        batches.append(("images", images[:37]))
    if random:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((random, *input_size), generator=gen)
        batches.append(("random", noise[:1]))
        batches += [("random", noise[i : i + 32]) for i in range(1, random, 32)]
    return [(source, x) for source, x in batches if len(x)]


@torch.inference_mode()
def check_onnx(path, dyn: nn.Module, batches: list[tuple[str, torch.Tensor]]) -> dict:
    """Run ``batches`` through onnxruntime and through ``dyn.route``; compare.

    Returns the check's report. Raises :class:`DynconvertError` (with the report attached as
    ``exc.report``) when a logit differs by more than ``TOLERANCE`` times the largest logit
    (at least 1) or any decision differs.
    """
    session = ort_session(path)
    name = session.get_inputs()[0].name
    # float32 rounding grows with the logits' size: the tolerance is absolute up to logits of 1
    worst, scale, samples, mismatched = 0.0, 1.0, {}, []
    for source, x in batches:
        logits, decisions = session.run(None, {name: x.float().numpy()})
        routed = dyn.route(x)
        expected = routed.decisions.cpu().numpy()
        reference = routed.logits.float().cpu().numpy()
        diff = float(np.abs(logits - reference).max()) if logits.size else 0.0
        worst = max(worst, diff)
        scale = max(scale, float(np.abs(reference).max()) if reference.size else 0.0)
        samples[source] = samples.get(source, 0) + len(x)
        if decisions.shape != expected.shape or (decisions != expected).any():
            rows = np.nonzero((decisions != expected).reshape(len(x), -1).any(1))[0]
            mismatched.append({"source": source, "batch": len(x), "rows": rows.tolist()[:10]})
    report = {
        "passed": worst <= TOLERANCE * scale and not mismatched,
        "max_abs_logit_diff": worst,
        "tolerance": TOLERANCE * scale,
        "largest_logit": scale,
        "decisions_identical": not mismatched,
        "mismatched_batches": mismatched,
        "samples": samples,
        "batch_sizes": sorted({len(x) for _, x in batches}),
    }
    if not report["passed"]:
        what = f"max logit difference {worst:.3g} (tolerance {TOLERANCE * scale:.3g})"
        if mismatched:
            what += f"; decisions differ in {len(mismatched)} batch(es), e.g. {mismatched[0]}"
        exc = DynconvertError(f"the exported model does not behave like the PyTorch one: {what}")
        exc.report = report
        raise exc
    return report
