"""The coverage check of one (timm model, strategy) pair: does automatic insertion work on it?

The model is built with random weights at a small input size. Five steps run in order; the
first that fails is recorded:

1. ``prepare``: trace + plan + insert, as ``convert_recipe`` calls the strategy.
2. ``invariance``: with no exit taken / every block kept, the dynamic model equals the original.
3. ``train``: one optimiser step on the inserted parameters (``dyn.*``) gives a finite loss and
   changes some of them, and leaves the backbone as it was (early exit: cross-entropy on every
   exit of ``forward_all``; SkipNet: ``forward_relaxed`` with the FLOPs cost term; BlockDrop:
   its ``reinforce_step`` with every block decided).
4. ``hard``: with every decision taken (everyone exits at the first exit / every block dropped),
   the output has shape ``(batch, num_classes)`` and is finite.
5. ``save_load``: ``dyn.save(folder)`` then ``dynconvert.load(folder, model=base)`` gives the same
   outputs on the same input.

A block-skipping strategy on a network without a residual block is "n/a", not a pass.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F

import dynconvert
from dynconvert.convert.data import Preprocess
from dynconvert.errors import DynconvertError
from dynconvert.recipe import build_recipe, strategy_config
from dynconvert.strategies import get_strategy

NUM_CLASSES = 10
STEPS = ("prepare", "invariance", "train", "hard", "save_load")
NOT_APPLICABLE = "found no residual block"


@dataclass(frozen=True)
class ModelSpec:
    """A timm model as the check builds it: name, family, input side and extra timm kwargs.

    ``residual`` says whether the architecture has residual blocks (read from its timm source):
    a block-skipping strategy that finds none is then a failure, not "n/a". None: unknown,
    trust the library.
    """

    name: str
    family: str
    size: int = 64
    kwargs: dict = field(default_factory=dict)
    residual: bool | None = True


def _spec(name: str, family: str, size: int = 64, residual: bool | None = True, **kwargs) -> ModelSpec:
    return ModelSpec(name, family, size, kwargs, residual)


def _vit(name: str, family: str, size: int = 64, **kwargs) -> ModelSpec:
    return ModelSpec(name, family, size, {"img_size": size, **kwargs})


# The smallest timm variant of each family, at a small input the architecture accepts.
MODELS: list[ModelSpec] = [
    _spec("resnet18", "ResNet"),
    _spec("resnet50", "ResNet"),
    _spec("resnetv2_50", "ResNet"),
    _spec("resnet18d", "ResNet-D"),
    _spec("resnet26d", "ResNet-D"),
    _spec("resnext26ts", "ResNeXt"),
    _spec("resnext50_32x4d", "ResNeXt"),
    _spec("seresnext26d_32x4d", "ResNeXt"),
    _spec("regnetx_002", "RegNet"),
    _spec("regnety_002", "RegNet"),
    _spec("mobilenetv2_050", "MobileNet"),
    _spec("mobilenetv3_small_050", "MobileNet"),
    _spec("mobilenetv4_conv_small", "MobileNet"),
    _spec("efficientnet_b0", "EfficientNet"),
    _spec("efficientnet_lite0", "EfficientNet"),
    _spec("efficientnetv2_rw_t", "EfficientNet"),
    _spec("convnext_atto", "ConvNeXt"),
    _spec("convnext_femto", "ConvNeXt"),
    _spec("convnextv2_atto", "ConvNeXt"),
    _vit("vit_tiny_patch16_224", "ViT/DeiT"),
    _vit("deit_tiny_patch16_224", "ViT/DeiT"),
    _vit("deit_tiny_distilled_patch16_224", "ViT/DeiT"),
    _vit("eva02_tiny_patch14_224", "ViT/DeiT", size=56),
    _vit("swin_tiny_patch4_window7_224", "Swin", window_size=4),
    _vit("swinv2_cr_tiny_224", "Swin", window_size=4),
    _vit("cait_xxs24_224", "other transformer"),
    _vit("xcit_nano_12_p16_224", "other transformer"),
    _vit("pit_ti_224", "other transformer"),
    _vit("levit_128s", "other transformer"),
    _vit("coat_lite_tiny", "other transformer"),
    _spec("pvt_v2_b0", "other transformer"),
    _spec("twins_pcpvt_small", "other transformer"),
    _spec("mobilevit_xxs", "hybrid conv-transformer"),
    _spec("edgenext_xx_small", "hybrid conv-transformer"),
    _spec("fastvit_t8", "hybrid conv-transformer"),
    _spec("efficientvit_b0", "hybrid conv-transformer"),
    _vit("mixer_s16_224", "MLP"),
    _vit("resmlp_12_224", "MLP"),
    _spec("poolformer_s12", "MetaFormer"),
    _spec("densenet121", "other CNN", residual=False),
    _spec("vgg11", "other CNN", residual=False),
    _spec("dla34", "other CNN"),
    _spec("ghostnet_100", "other CNN"),
    _spec("repvgg_a0", "other CNN"),
    _spec("cspresnet50", "other CNN"),
    _spec("ese_vovnet19b_dw", "other CNN", residual=False),
    _spec("rexnet_100", "other CNN"),
    _spec("lcnet_050", "other CNN", residual=False),
    _spec("hrnet_w18_small", "other CNN"),
    _spec("nf_resnet26", "other CNN"),
    _spec("inception_v3", "other CNN", size=96, residual=False),
]

# timm's own tiny test models; the MaxViT-style ones need an input their windows divide.
_TEST_SIZES = {"test_maxvit": 160, "test_coatnet": 160}
_TEST_IMG_SIZE = {"test_vit3", "test_vit_relpos"}


def timm_test_specs() -> list[ModelSpec]:
    """Every ``timm.list_models('test_*')`` model, family "timm test model"."""
    specs = []
    for name in timm.list_models("test_*"):
        size = _TEST_SIZES.get(name, 64)
        kwargs = {"img_size": size} if name in _TEST_IMG_SIZE else {}
        residual = not name.startswith("test_efficientnet")  # their blocks have no skip connection
        specs.append(ModelSpec(name, "timm test model", size, kwargs, residual))
    return specs


def all_specs() -> list[ModelSpec]:
    return MODELS + timm_test_specs()


def spec_for(name: str) -> ModelSpec:
    """The catalogued spec of ``name``, or a 64 px spec of family "other" for any timm name."""
    for spec in all_specs():
        if spec.name == name:
            return spec
    return ModelSpec(name, "other", residual=None)


class CheckFailed(Exception):
    """A step's own check failed (not an exception from the library)."""


def build_base(spec: ModelSpec) -> torch.nn.Module:
    """The random-init timm model in eval mode; its pretrained config states the small input size,
    so that ``Preprocess.from_model`` (used by convert and load) sees the size the check runs at."""
    model = timm.create_model(spec.name, pretrained=False, num_classes=NUM_CLASSES, **spec.kwargs).eval()
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = (3, spec.size, spec.size)
    model.pretrained_cfg = cfg
    return model


def _close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> tuple[bool, float]:
    """Equal within ``rel`` of the reference's scale; returns (ok, max abs error / scale)."""
    if out.shape != ref.shape:
        return False, math.inf
    scale = float(ref.abs().max().clamp_min(1e-6))
    err = float((out - ref).abs().max()) if out.numel() else 0.0
    return err <= rel * scale + 1e-7, err / scale


def _is_block_skip(dyn) -> bool:
    return hasattr(dyn.dyn, "bias") and hasattr(dyn, "route") and hasattr(dyn, "droppable")


def _is_early_exit(dyn) -> bool:
    return hasattr(dyn.dyn, "thresholds") and hasattr(dyn, "forward_all")


def _set_open(dyn) -> None:
    """No exit taken / every block kept."""
    if _is_early_exit(dyn):
        dyn.dyn.thresholds.fill_(2.0)
    else:
        dyn.dyn.bias.fill_(1e4)


def step_invariance(dyn, model, x: torch.Tensor) -> dict:
    _set_open(dyn)
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
        if _is_early_exit(dyn) and not bool((dyn.last_exits == dyn.num_exits).all()):
            raise CheckFailed("a sample exited early with thresholds at 2.0")
        if _is_block_skip(dyn) and not bool(dyn.last_kept.all()):
            raise CheckFailed("a block was skipped with every gate open")
    return {"invariance_error": worst}


def _training_loss(dyn, strategy_name: str, config, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of one training step, as the strategy's own training computes it where it can."""
    if _is_early_exit(dyn):
        _, exits = dyn.forward_all(x)
        return sum(F.cross_entropy(e, y) for e in exits) / len(exits)
    if strategy_name == "blockdrop":
        try:
            from dynconvert.strategies.blockdrop_training import reinforce_step
        except ImportError:
            reinforce_step = None
        if reinforce_step is not None:  # REINFORCE with the self-critical baseline, every block decided
            mask = torch.ones(dyn.num_blocks, dtype=torch.bool)
            loss, _, _ = reinforce_step(dyn, x, y, config, mask)
            return loss
    if hasattr(dyn, "forward_relaxed"):  # SkipNet: straight-through gates, cost term towards 0.6
        from dynconvert.strategies.block_skip_common import expected_flops_ratio

        logits, probs = dyn.forward_relaxed(x)
        return F.cross_entropy(logits, y) + 30.0 * (expected_flops_ratio(dyn, probs) - 0.6) ** 2
    # a controller without a relaxed pass: a loss on its keep-logits along the all-kept route
    controller, h, logits = dyn.dyn.controller, x, []
    state = controller.start(x)
    for unit, droppable in zip(dyn.units, dyn.droppable):
        if droppable:
            logit, state = controller.decide(len(logits), h, state)
            logits.append(logit)
        h = unit(h)
    return torch.sigmoid(torch.stack(logits, 1)).mean()


def step_train(dyn, model, strategy_name: str, config, x: torch.Tensor) -> dict:
    if _is_block_skip(dyn):
        dyn.dyn.bias.zero_()  # the bias after prepare; at +-1e4 the gates would get no gradient
    params = [p for p in dyn.dyn.parameters() if p.requires_grad]
    if not params:
        raise CheckFailed("no trainable parameter under dyn.")
    before = [p.detach().clone() for p in params]
    backbone = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the backbone frozen as the strategies' fit freezes it: no gradient, BatchNorm in eval mode
    frozen = [p for name, p in dyn.named_parameters() if not name.startswith("dyn.") and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    dyn.eval()
    dyn.dyn.train()
    optimizer = torch.optim.Adam(params, lr=1e-2)
    y = torch.randint(0, NUM_CLASSES, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    try:
        loss = _training_loss(dyn, strategy_name, config, x, y)
        if not torch.isfinite(loss):
            raise CheckFailed(f"training loss is {float(loss)}")
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


def _set_all_taken(dyn) -> None:
    """Everyone leaves at the first exit / every block dropped."""
    if _is_early_exit(dyn):
        dyn.dyn.thresholds.fill_(0.0)
    else:
        dyn.dyn.bias.fill_(-1e4)


def step_hard(dyn, x: torch.Tensor) -> dict:
    _set_all_taken(dyn)
    for batch in (x, x[:1]):
        with torch.no_grad():
            out = dyn(batch)
        if tuple(out.shape) != (len(batch), NUM_CLASSES):
            raise CheckFailed(f"output shape {tuple(out.shape)}, expected {(len(batch), NUM_CLASSES)}")
        if not bool(torch.isfinite(out).all()):
            raise CheckFailed("non-finite output with every decision taken")
        if _is_early_exit(dyn) and not bool((dyn.last_exits == 0).all()):
            raise CheckFailed("thresholds at 0 but not every sample left at the first exit")
        if _is_block_skip(dyn) and bool(dyn.last_kept.any()):
            raise CheckFailed("bias at -1e4 but some block ran")
    return {}


def _mixed_state(dyn) -> None:
    """A state that exercises the saved buffers: half the blocks kept, or exits past the first."""
    if _is_early_exit(dyn):
        n = dyn.num_exits
        dyn.dyn.thresholds.copy_(torch.tensor([2.0] * (n // 2) + [0.0] * (n - n // 2)))
    else:
        dyn.dyn.bias.copy_(torch.tensor([1e4 if i % 2 == 0 else -1e4 for i in range(dyn.num_blocks)]))


def _compare_outputs(dyn, loaded, x: torch.Tensor) -> float:
    worst = 0.0
    with torch.no_grad():
        pairs = [("routed output", dyn(x), loaded(x))]
        if _is_early_exit(dyn):
            if not torch.equal(dyn.last_exits, loaded.last_exits):
                raise CheckFailed("loaded model takes other exits")
            names = ["final logits"] + [f"exit {k} logits" for k in range(dyn.num_exits)]
            pairs += list(zip(names, dyn.forward_all_flat(x), loaded.forward_all_flat(x)))
        else:
            if not torch.equal(dyn.last_kept, loaded.last_kept):
                raise CheckFailed("loaded model keeps other blocks")
            if hasattr(dyn, "forward_relaxed"):
                for m in (dyn, loaded):
                    m.dyn.bias.zero_()
                (la, pa), (lb, pb) = dyn.forward_relaxed(x, noise=False), loaded.forward_relaxed(x, noise=False)
                pairs += [("relaxed logits", la, lb), ("keep probabilities", pa, pb)]
    for name, a, b in pairs:
        ok, err = _close(b, a, rel=1e-5)
        worst = max(worst, err)
        if not ok:
            raise CheckFailed(f"loaded model's {name} differs: max error {err:.2e} of the output scale")
    return worst


def step_save_load(dyn, base: torch.nn.Module, x: torch.Tensor) -> dict:
    _mixed_state(dyn)
    with tempfile.TemporaryDirectory(prefix="dynconvert-coverage-") as folder:
        dyn.save(folder)
        loaded = dynconvert.load(folder, model=base)
    return {"load_error": _compare_outputs(dyn, loaded, x)}


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
            torch.manual_seed(seed)
            model = build_base(spec)
            base = copy.deepcopy(model)
            x = torch.randn(3, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(seed + 1))
            step = "prepare"
            recipe = build_recipe(
                None, spec.name, strategy_name, ["model.pretrained=false", f"model.num_classes={NUM_CLASSES}"]
            )
            strategy = get_strategy(strategy_name)
            config = strategy_config(recipe, strategy)
            prep = Preprocess.from_model(model)
            example = torch.randn(2, *prep.input_size)
            try:
                dyn = strategy.prepare(model, recipe, config, example, NUM_CLASSES)
            except DynconvertError as exc:
                if NOT_APPLICABLE not in str(exc):
                    raise
                if spec.residual:
                    raise CheckFailed(f"{exc} (but the architecture has residual blocks)") from exc
                record.update(result="n/a", reason="no residual block to skip")
                return record
            dyn = dyn.eval()
            dyn.recipe, dyn.preprocess = recipe, prep
            dyn.base_info = {"model": spec.name, "weights": None, "weights_sha256": None, "num_classes": NUM_CLASSES}
            record["details"]["inserted"] = _inserted_summary(dyn)
            for name, run in (
                ("invariance", lambda: step_invariance(dyn, model, x)),
                ("train", lambda: step_train(dyn, model, strategy_name, config, x)),
                ("hard", lambda: step_hard(dyn, x)),
                ("save_load", lambda: step_save_load(dyn, base, x)),
            ):
                step = name  # what a failure is recorded under
                record["details"].update(run())
    except Exception as exc:  # the record is the point: every failure becomes a row
        record.update(result="FAIL", step=step, reason=_reason(exc), where=_where(exc))
        record["details"]["error"] = "".join(traceback.format_exception_only(type(exc), exc))[:2000]
    finally:
        record["seconds"] = round(time.perf_counter() - started, 2)
    return record


def _inserted_summary(dyn) -> str:
    params = sum(p.numel() for p in dyn.dyn.parameters())
    if _is_early_exit(dyn):
        fallback = dyn.plan.get("insertion", "").startswith("feature_info")
        return f"{dyn.num_exits} exits{' on feature_info stages (fallback)' if fallback else ''}, {params} params"
    if _is_block_skip(dyn):
        return f"{dyn.num_blocks} of {len(dyn.droppable)} units gated, {params} params"
    return f"{params} params"


__all__ = ["MODELS", "STEPS", "ModelSpec", "all_specs", "build_base", "check_model", "spec_for", "timm_test_specs"]
