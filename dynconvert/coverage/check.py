"""The coverage check of one (timm model, strategy) pair: does automatic insertion work on it?

The model is built with random weights at a small input size. Five steps run in order through
the strategy's contract hooks (``dynconvert.strategies.base``); the first that fails is recorded:

1. ``prepare``: trace + plan + insert, as the pipeline calls the strategy.
2. ``invariance``: in the strategy's "everything on" form (``open_all_``) the dynamic model
   equals the original, and the FLOPs its decisions are charged are at least the original's.
3. ``train``: one optimiser step on the strategy's own training loss (``training_loss``) gives a
   finite loss, changes some inserted parameter (``dyn.*``) and leaves the backbone as it was.
4. ``hard``: with every decision that saves work taken (``take_all_``), the output has shape
   ``(batch, num_classes)``, is finite, and the decisions are charged no more FLOPs than the
   original (``tests/test_strategy_contract.py`` checks that they are charged what really ran).
5. ``save_load``: in a mixed state (``mixed_``), ``dynconvert.save`` then ``dynconvert.load``
   gives the same outputs and decisions: by the timm instance's architecture and arguments, or
   with ``model=base`` where the load asks for it (``details["loaded"]`` says which).

A strategy that finds nothing to insert on a network (a block-skipping strategy on a network
without a residual block) is "n/a", not a pass.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import traceback
import warnings

import torch

import dynconvert
from dynconvert.convert.pipeline import base_info
from dynconvert.coverage.catalogue import NUM_CLASSES, ModelSpec, build_base, spec_for
from dynconvert.errors import DynconvertError, NotApplicable
from dynconvert.recipe import build_recipe
from dynconvert.strategies import get_strategy
from dynconvert.toolkit.data import Preprocess

STEPS = ("prepare", "invariance", "train", "hard", "save_load")
NOT_APPLICABLE = "found no residual block"


class CheckFailed(Exception):
    """A step's own check failed (not an exception from the library)."""


def _close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> tuple[bool, float]:
    """Equal within ``rel`` of the reference's scale; returns (ok, max abs error / scale)."""
    if out.shape != ref.shape:
        return False, math.inf
    scale = float(ref.abs().max().clamp_min(1e-6))
    err = float((out - ref).abs().max()) if out.numel() else 0.0
    return err <= rel * scale + 1e-7, err / scale


def _flops(dyn, batch: torch.Tensor) -> float:
    """Mean FLOPs per sample the model's last decisions are charged."""
    return float(dyn.flops_of(dyn.last_decisions).mean())


def step_invariance(strategy, dyn, model, x: torch.Tensor) -> dict:
    strategy.open_all_(dyn)
    worst = 0.0
    for batch in (x, x[:1]):
        with torch.no_grad():
            ref, out = model(batch), dyn(batch)
        ok, err = _close(out, ref)
        worst = max(worst, err)
        if not ok:
            raise CheckFailed(
                f"dynamic output differs from the original at batch {len(batch)}: "
                f"max error {err:.2e} of the output scale"
            )
        if _flops(dyn, batch) < dyn.static_flops() * (1 - 1e-6):
            raise CheckFailed("with everything on, the decisions are charged less than the original network")
    return {"invariance_error": worst}


def step_train(strategy, dyn, model, x: torch.Tensor, prepared_state: dict) -> dict:
    dyn.load_inserted_state(prepared_state)  # as prepare left it: the hooks' extreme states block gradients
    params = [p for p in dyn.dyn.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    backbone = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the backbone frozen as the strategies' fit freezes it: no gradient, BatchNorm in eval mode
    frozen = [p for name, p in dyn.named_parameters() if not name.startswith("dyn.") and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    dyn.eval()
    dyn.dyn.train()
    y = torch.randint(0, NUM_CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    try:
        loss = strategy.training_loss(dyn, x, y)
        if loss is None:
            return {"loss": None, "params_changed": "nothing trained"}
        if not params:
            raise CheckFailed("a training loss but no trainable parameter under dyn.")
        if not torch.isfinite(loss):
            raise CheckFailed(f"training loss is {float(loss)}")
        optimizer = torch.optim.Adam(params, lr=1e-2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    finally:
        dyn.eval()
        for p in frozen:
            p.requires_grad_(True)
        for p in dyn.parameters():
            p.grad = None
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    if not changed:
        raise CheckFailed("no inserted parameter changed after one optimiser step (no gradient reached them)")
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, backbone[k])]
    if moved:
        raise CheckFailed(f"the training step changed the backbone ({moved[0]})")
    return {"loss": float(loss), "params_changed": f"{changed}/{len(params)}"}


def step_hard(strategy, dyn, x: torch.Tensor) -> dict:
    strategy.take_all_(dyn)
    for batch in (x, x[:1]):
        with torch.no_grad():
            out = dyn(batch)
        if tuple(out.shape) != (len(batch), NUM_CLASSES):
            raise CheckFailed(f"output shape {tuple(out.shape)}, expected {(len(batch), NUM_CLASSES)}")
        if not bool(torch.isfinite(out).all()):
            raise CheckFailed("non-finite output with every decision taken")
        # not "less": a cascade of one architecture with itself saves nothing by stopping early
        if _flops(dyn, batch) > dyn.static_flops() * (1 + 1e-6):
            raise CheckFailed("with every decision taken, the decisions are charged more than the original")
    return {}


def _compare_outputs(dyn, loaded, x: torch.Tensor) -> float:
    worst = 0.0
    with torch.no_grad():
        a, b = dyn(x), loaded(x)
    if not torch.equal(dyn.last_decisions, loaded.last_decisions):
        raise CheckFailed("the loaded model decides otherwise")
    ok, err = _close(b, a, rel=1e-5)
    worst = max(worst, err)
    if not ok:
        raise CheckFailed(f"loaded model's routed output differs: max error {err:.2e} of the output scale")
    return worst


def step_save_load(strategy, dyn, base, x: torch.Tensor) -> dict:
    """Save, then load as a user of the Python API would: by the timm instance's architecture
    and arguments alone, or with ``model=`` where those arguments cannot be read back."""
    strategy.mixed_(dyn)
    with tempfile.TemporaryDirectory(prefix="dynconvert-coverage-") as folder:
        dynconvert.save(dyn, folder)
        try:
            loaded, how = dynconvert.load(folder), "by architecture"
        except DynconvertError as exc:
            if "model=" not in str(exc):
                raise
            loaded, how = dynconvert.load(folder, model=base), "with model="
    worst = _compare_outputs(dyn, loaded, x)
    strategy.open_all_(dyn)
    strategy.open_all_(loaded)
    return {"load_error": max(worst, _compare_outputs(dyn, loaded, x)), "loaded": how}


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = "" if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: "
    return f"{name}{text}"


def _where(exc: BaseException) -> str | None:
    """The innermost frame of the traceback inside dynconvert, as ``file:line``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/dynconvert/" in f.filename]
    if not frames:
        return _where(exc.__cause__) if exc.__cause__ is not None else None
    f = frames[-1]
    return f"{f.filename.split('/dynconvert/', 1)[1]}:{f.lineno}"


def check_model(spec: ModelSpec | str, strategy_name: str, seed: int = 0) -> dict:
    """Run the five steps for one (model, strategy); return a JSON-able result record.

    The record has ``model``, ``family``, ``strategy``, ``size``, ``result`` (``"pass"``,
    ``"FAIL"`` or ``"n/a"``), ``step`` (the failing step, or None), ``reason`` (one line),
    ``where`` (the innermost dynconvert frame of an exception), ``details`` and ``seconds``.

    Example::

        record = check_model("test_resnet", "skipnet")
        assert record["result"] == "pass"
    """
    spec = spec if isinstance(spec, ModelSpec) else spec_for(spec)
    record = {
        "model": spec.name,
        "family": spec.family,
        "strategy": strategy_name,
        "size": spec.size,
        "timm_kwargs": dict(spec.kwargs),
        "result": "pass",
        "step": None,
        "reason": "",
        "where": None,
        "details": {},
        "seconds": 0.0,
    }
    started = time.perf_counter()
    step = "build"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a strategy that combines models gets as many differently seeded copies as it needs
            count = get_strategy(strategy_name).min_models
            models = []
            for i in range(count):
                torch.manual_seed(seed + 7 * i)
                models.append(build_base(spec))
            model, bases = models[-1], [copy.deepcopy(m) for m in models]
            x = torch.randn(3, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(seed + 1))
            step = "prepare"
            names = [spec.name] * count if count > 1 else spec.name
            overrides = ["model.pretrained=false", f"model.num_classes={NUM_CLASSES}"]
            recipe = build_recipe(None, names, strategy_name, overrides)
            strategy = get_strategy(strategy_name).from_options(recipe.options)
            prep = Preprocess.from_model(model)
            example = torch.randn(2, *prep.input_size)
            try:
                dyn = strategy.prepare(models, recipe, example, NUM_CLASSES)
            except DynconvertError as exc:
                if isinstance(exc, NotApplicable):
                    record.update(result="n/a", reason=str(exc).splitlines()[0][:160])
                    return record
                if NOT_APPLICABLE not in str(exc):
                    raise
                if spec.residual:
                    raise CheckFailed(f"{exc} (but the architecture has residual blocks)") from exc
                record.update(result="n/a", reason="no residual block to skip")
                return record
            dyn = dyn.eval()
            dyn.recipe, dyn.preprocess = recipe, prep
            # recorded as the pipeline records modules handed in (a save stores their weights)
            dyn.base_info = base_info(recipe.model_configs(), NUM_CLASSES, handed_in=bases)
            dyn.base_modules = bases
            record["details"]["inserted"] = dyn.describe()
            prepared_state = {k: v.clone() for k, v in dyn.inserted_state().items()}
            for name, run in (
                ("invariance", lambda: step_invariance(strategy, dyn, model, x)),
                ("train", lambda: step_train(strategy, dyn, model, x, prepared_state)),
                ("hard", lambda: step_hard(strategy, dyn, x)),
                ("save_load", lambda: step_save_load(strategy, dyn, bases if count > 1 else bases[0], x)),
            ):
                step = name  # what a failure is recorded under
                record["details"].update(run())
    except Exception as exc:  # the record is the point: every failure becomes a row
        record.update(result="FAIL", step=step, reason=_reason(exc), where=_where(exc))
        record["details"]["error"] = "".join(traceback.format_exception_only(type(exc), exc))[:2000]
    finally:
        record["seconds"] = round(time.perf_counter() - started, 2)
    return record


__all__ = ["STEPS", "check_model"]
