"""What SkipNet and BlockDrop share: planning droppable blocks, building the runtime model,
training with the backbone frozen, and calibrating one bias on every keep-logit."""

from __future__ import annotations

import copy
import logging
import math

import torch

from dynconvert.errors import DynconvertError
from dynconvert.passes.analysis import is_channels_last, single_live_nodes
from dynconvert.passes.residual import find_units, full_form, shortcut_shape, skipped_form
from dynconvert.progress import progress_bar
from dynconvert.runtime.block_skip import BlockSkipModel, settled_decisions
from dynconvert.runtime.corrections import SkipCorrection, correction_rank
from dynconvert.toolkit import distributed
from dynconvert.toolkit.calibrate import bound_drops_from_best, drop_upper_bound
from dynconvert.toolkit.checkpoint import Checkpointer
from dynconvert.toolkit.choose import choose_point
from dynconvert.toolkit.costs import count_flops, node_flops
from dynconvert.toolkit.stage_loop import cosine_schedule, means, run_stage
from dynconvert.toolkit.trace import trace
from dynconvert.toolkit.train import batches, distillation_loss, freeze, map_batches, train_batches

ALL_OPEN = 1e4
SKIP_CORRECTIONS = ("linear", "none")

log = logging.getLogger(__name__)


def plan_units(model, recipe, example, exclude: list[str], replay: list[str] | None = None):
    """Trace and cut the network into units; return (gm, units, their input shapes)."""
    gm = trace(model, recipe.model.leaf_modules, example)
    units = find_units(gm, node_flops(gm, example))
    names = [u.name for u in units if u.droppable]
    unknown = [n for n in exclude if n not in names]
    if unknown:
        raise DynconvertError(
            f"options.exclude names {', '.join(unknown)}, which are no droppable blocks; blocks: {', '.join(names)}"
        )
    keep = set(replay) if replay is not None else {n for n in names if n not in exclude}
    for unit in units:
        if unit.droppable and unit.name not in keep:
            unit.add_node = None
    if not any(u.droppable for u in units):
        raise DynconvertError(
            f"found no residual block (shortcut(x) + residual(x)) to skip in this network{_why_no_units(gm)}"
        )
    return gm, units


def _why_no_units(gm) -> str:
    """What hid the blocks from the analysis, when the graph shows it."""
    cuts = [
        n
        for n in single_live_nodes(gm.graph)
        if n.op != "placeholder" and len(getattr(n.meta.get("tensor_meta"), "shape", ())) >= 3
    ]
    if len(cuts) <= 1:
        return (
            ": the traced graph has no point where a single tensor is alive (a value taken from the "
            "input, such as the batch size, stays alive throughout), so it cannot be cut into blocks"
        )
    opaque = sorted(
        {
            type(gm.get_submodule(n.target)).__name__
            for n in gm.graph.nodes
            if n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).children())
        }
    )
    if opaque:
        return f": blocks may hide inside modules traced as leaves ({', '.join(opaque)}), unseen by the graph"
    return ""


def build_block_skip_model(
    gm, units, example, make_controller, skip_correction: str = "none", settled: list[int] | None = None
) -> BlockSkipModel:
    """Full and skipped forms of each unit, their FLOPs, and the controller, as a runtime model.

    ``skip_correction="linear"`` gives each skipped form a learned correction in place of the
    residual branch (:class:`SkipCorrection`; its FLOPs count in the skipped form's).
    """
    full, skipped, full_flops, skipped_flops, input_shapes = [], [], [], [], []
    corrections = {}
    h = example
    for i, unit in enumerate(units):
        f = full_form(gm, unit)
        full_flops.append(count_flops(f, h))
        if unit.droppable:
            branch_flops = full_flops[-1] - count_flops(skipped_form(gm, unit), h)
            if branch_flops <= 0.0:
                # the shortcut path needs the residual branch too (a residual added to part of the
                # channels): skipping would compute everything anyway
                unit.add_node = None
        if unit.droppable and skip_correction == "linear":
            corrections[i] = _correction_for(gm, unit, branch_flops)
        s = skipped_form(gm, unit, corrections.get(i)) if unit.droppable else None
        skipped_flops.append(count_flops(s, h) if s is not None else 0.0)
        if s is not None:
            input_shapes.append(tuple(h.shape[1:]))
        full.append(f)
        skipped.append(s)
        with torch.no_grad():
            h = f(h)
    if not input_shapes:
        raise DynconvertError(
            "found no residual block whose skipping saves computation: in every block the shortcut path "
            "needs the residual branch too (a residual added to part of the channels, for instance)"
        )
    controller = make_controller(input_shapes)
    dyn = BlockSkipModel(full, skipped, full_flops, skipped_flops, controller, 0.0, corrections)
    with torch.no_grad():
        dyn.dyn.bias.fill_(1e4)
        dyn.controller_flops = count_flops(dyn.route, example) - dyn.static_flops()
        dyn.dyn.bias.zero_()
    saving = sum(f - k for f, k, d in zip(dyn.full_flops, dyn.skipped_flops, dyn.droppable) if d)
    if dyn.controller_flops >= saving:
        raise DynconvertError(
            f"the controller costs {dyn.controller_flops / 1e6:.3g} MFLOPs per image, more than skipping every "
            f"block would save ({saving / 1e6:.3g}): this network is too small for it; choose a smaller one "
            "(dynconvert --list-options STRATEGY) or another strategy"
        )
    if settled is not None:
        dyn.settled = list(settled)
    dyn.plan = {
        "replay": {"blocks": [u.name for u in units if u.droppable]},
        "units": [u.name for u in units],
        "droppable": [u.droppable for u in units],
        "controller_flops": dyn.controller_flops,
    }
    return dyn.eval()


def _correction_for(gm, unit, branch_flops: float) -> SkipCorrection:
    shape = shortcut_shape(gm, unit)
    if shape is None:
        raise DynconvertError(
            f"no shape is known for the shortcut of block {unit.name}; set options.skip_correction=none"
        )
    channels_last = is_channels_last(shape)
    return SkipCorrection(shape, channels_last, correction_rank(shape, channels_last, branch_flops))


def own_tuned_units(dyn: BlockSkipModel, indices: list[int]) -> None:
    """Give ``dyn`` its own copies of the units at ``indices`` (full and skipped forms sharing
    modules), so tuning them leaves the original network as it was, and register them under
    ``dyn.tuned`` so they are saved."""
    # skip corrections are dyn's already: the copies keep calling the same ones
    shared = {id(m): m for m in dyn.dyn.corrections.values()} if hasattr(dyn.dyn, "corrections") else {}
    for i in sorted(set(indices)):
        dyn.units[i], dyn.skipped_units[i] = copy.deepcopy((dyn.units[i], dyn.skipped_units[i]), dict(shared))
    dyn.register_tuned_units(indices)


def tunable_units(dyn: BlockSkipModel, prefixes: list[str], key: str) -> list[int]:
    """Indices of the units holding a parameter named by ``prefixes`` (empty: every unit);
    ``key`` is the recipe key that named them, for the error."""
    found, used = [], set()
    for i, unit in enumerate(dyn.units):
        for name, _ in unit.named_parameters():
            hits = [t for t in prefixes if name == t or name.startswith(t + ".")]
            used.update(hits)
            if hits or not prefixes:
                found.append(i)
    unknown = [t for t in prefixes if t not in used]
    if unknown:
        raise DynconvertError(f"{key} names {', '.join(unknown)}, which hold no backbone parameter")
    return sorted(set(found))


def expected_flops_ratio(dyn: BlockSkipModel, probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the expected FLOPs ratio under keep probabilities ``probs``."""
    return (dyn.sample_flops(probs) / dyn.static_flops()).mean()


def teacher_logits(dyn: BlockSkipModel, split, prep, recipe, checkpointer: Checkpointer | None = None) -> torch.Tensor:
    """The original network's logits on ``split``, computed once.

    With a ``checkpointer`` (the fit split, for training) the ranks of a torchrun share the
    work and the result is kept in the work folder for a resumed run.
    """
    if checkpointer is None:
        (logits,) = map_batches(
            dyn.forward_static, split, prep, recipe.data.batch_size, recipe.device, "teacher logits"
        )
        return logits
    (logits,) = checkpointer.cached(
        "teacher-logits",
        lambda: map_batches(
            dyn.forward_static, split, prep, recipe.data.batch_size, recipe.device, "teacher logits", shard=True
        ),
    )
    return logits


def calibrate_bias(
    dyn: BlockSkipModel,
    split,
    prep,
    recipe,
    offsets: list[float],
    static_logits: torch.Tensor | None = None,
    refine_rounds: int = 0,
) -> dict:
    """Sweep one offset added to every keep-logit; pick the operating point for the budget.

    ``static_logits``: the original network's logits on ``split`` when the backbone has been
    tuned since (default: computed now with :meth:`BlockSkipModel.forward_static`).
    ``refine_rounds``: rounds that fix the blocks the chosen point runs for every image, or for
    none (as :meth:`BlockSkipModel.settle` does), and sweep the offsets again over the blocks
    still decided per image; the budget then chooses among the points of every round. One
    offset for all blocks cannot tell a block the network needs from one it does without; a
    round lets the others be skipped more without skipping those. A refined point records its
    fixed blocks (``settled``).
    """
    cal = recipe.calibrate
    if static_logits is None:
        static_logits = teacher_logits(dyn, split, prep, recipe)
    static_pred = static_logits.argmax(1)
    reference = static_pred if cal.reference == "agreement" else split.labels
    static_hits = (static_pred == reference).float()
    sweep, hits, kept_at = [], [], []

    def measure(offset: float, settled: list[int]) -> None:
        dyn.dyn.bias.fill_(offset)
        dyn.settled = list(settled)
        preds, kept = _route_all(dyn, split, prep, recipe)
        hits.append(preds == reference)
        kept_at.append(kept)
        drop, bound = drop_upper_bound(static_hits - hits[-1].float())
        point = {"offset": offset, "accuracy_drop": drop, "accuracy_drop_bound": bound}
        point["flops_ratio"] = float(dyn.sample_flops(kept).mean()) / dyn.static_flops()
        if any(settled):
            point["settled"] = list(settled)
        sweep.append(point)

    def choose() -> tuple[dict, bool]:
        if cal.drop_from == "best":
            bound_drops_from_best(sweep, hits)
        return choose_point(sweep, cal.max_accuracy_drop, cal.flops_ratio, drop_from=cal.drop_from)

    free = [0] * dyn.num_blocks
    # the last offset opens every gate: the original network, always within any accuracy budget
    for offset in progress_bar([*offsets, ALL_OPEN], desc="calibrate", unit="offset"):
        measure(offset, free)
    swept = [free]
    for round_ in range(refine_rounds):
        chosen, _ = choose()
        settled = settled_decisions(kept_at[next(k for k, p in enumerate(sweep) if p is chosen)])
        if all(settled) or settled in swept:
            break
        swept.append(settled)
        # at the chosen offset itself, fixing what it never varies changes nothing
        again = [offset for offset in offsets if offset != chosen["offset"]]
        for offset in progress_bar(again, desc=f"calibrate, round {round_ + 2}", unit="offset"):
            measure(offset, settled)
    chosen, budget_met = choose()
    dyn.dyn.bias.fill_(chosen["offset"])
    dyn.settled = list(chosen.get("settled", free))
    if any(dyn.settled):
        dyn.plan["replay"]["settled"] = list(dyn.settled)
    return {
        "sweep": sweep,
        "chosen": chosen,
        "budget_met": budget_met,
        "calibration_static_accuracy": float((static_pred == split.labels).float().mean()),
        "calibration_reference": cal.reference,
    }


@torch.no_grad()
def _route_all(dyn, split, prep, recipe):
    preds, kept = [], []
    for images, _, _ in batches(split, prep, recipe.data.batch_size, recipe.device):
        d = dyn.route(images)
        preds.append(d.logits.argmax(1).cpu())
        kept.append(d.decisions.cpu())
    return torch.cat(preds), torch.cat(kept)


def settle_constant_decisions(dyn: BlockSkipModel, split, prep, recipe) -> dict:
    """Fix the blocks that run for every calibration sample, or for none, at the chosen operating
    point (``BlockSkipModel.settle``): their gates are no longer computed. Recorded in the plan, so
    ``load`` rebuilds the same model. Returns the settled blocks' names for the report."""
    _, kept = _route_all(dyn, split, prep, recipe)
    dyn.settle(kept)
    dyn.plan["replay"]["settled"] = list(dyn.settled)
    names = dyn.plan["replay"]["blocks"]
    return {
        "always_run": [n for n, s in zip(names, dyn.settled) if s > 0],
        "never_run": [n for n, s in zip(names, dyn.settled) if s < 0],
        "decided_per_sample": [n for n, s in zip(names, dyn.settled) if s == 0],
    }


def sweep_points_on_split(dyn, split, prep, recipe, sweep: list[dict]) -> list[dict]:
    """Accuracy and FLOPs ratio on ``split`` at ``evaluate.sweep_points`` points of the
    calibration sweep, evenly spread over its FLOPs ratios, and at its most accurate point
    (the point with every gate open is the static model, which the report measures anyway);
    for the plot and the loss against the best point.

    Each point is the one the calibration sweep measured, with the blocks it fixed (``settled``)
    and no others: blocks settled at the chosen point keep their decision at every offset and
    would turn the other points into ones the calibration never saw."""
    candidates = sorted((p for p in sweep if p["offset"] != ALL_OPEN), key=lambda p: p["flops_ratio"])
    if not candidates:
        return []
    picks = torch.linspace(0, len(candidates) - 1, recipe.evaluate.sweep_points).round().long().unique().tolist()
    most_accurate = candidates.index(min(candidates, key=lambda p: (p["accuracy_drop"], p["flops_ratio"])))
    picks = sorted({*picks, most_accurate})
    chosen, settled = float(dyn.dyn.bias[0]), list(dyn.settled)
    out = []
    try:
        for p in [candidates[k] for k in picks]:
            dyn.dyn.bias.fill_(p["offset"])
            dyn.settled = list(p.get("settled", [0] * dyn.num_blocks))
            preds, kept = _route_all(dyn, split, prep, recipe)
            point = {
                "offset": p["offset"],
                "accuracy": float((preds == split.labels).float().mean()),
                "flops_ratio": float(dyn.sample_flops(kept).mean()) / dyn.static_flops(),
            }
            if "settled" in p:
                point["settled"] = p["settled"]
            out.append(point)
    finally:
        dyn.dyn.bias.fill_(chosen)
        dyn.settled = settled
    return out


def trainable_parts(dyn: BlockSkipModel, tune: list[str]) -> tuple[list, list]:
    """Freeze the backbone but the modules named in ``tune``; return (the inserted parameters,
    the tuned backbone ones), all trainable."""
    backbone_params = {}
    for unit in [*dyn.units, *dyn.skipped_units]:  # names as in the network: "layer3.2.conv1.weight"
        backbone_params.update((id(p), p) for p in freeze(unit, tune))  # full and skipped forms share modules
    inserted = dyn.inserted_parameters()
    for param in inserted:  # the skipped forms share the corrections, which freezing just froze
        param.requires_grad_(True)
    return inserted, [p for p in backbone_params.values() if all(p is not q for q in inserted)]


def training_steps(epochs: int, samples: int, batch_size: int) -> int:
    """Optimizer steps in ``epochs`` epochs over ``samples`` in batches of ``batch_size`` (at least 1)."""
    return max(1, epochs * math.ceil(samples / batch_size))


def adamw_with_cosine(
    inserted: list, backbone: list, lr: float, train_config, epochs: int, samples: int, backbone_lr: float = 0.0
):
    """AdamW over the inserted parameters at ``lr`` and the tuned backbone ones at
    ``backbone_lr``, with a cosine schedule over ``epochs`` epochs of ``samples``;
    returns (optimizer, scheduler, every parameter it updates)."""
    groups = [{"params": inserted, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=train_config.weight_decay)
    scheduler = cosine_schedule(optimizer, training_steps(epochs, samples, train_config.batch_size))
    return optimizer, scheduler, [*inserted, *backbone]


def train_relaxed(
    dyn: BlockSkipModel,
    data,
    prep,
    recipe,
    target: float,
    cost_weight: float,
    tune: list[str],
    checkpointer: Checkpointer | None = None,
    backbone_lr: float = 0.0,
) -> list[dict]:
    """Relaxed training: hard decisions forward, straight-through gradients, Gumbel noise.

    Loss: cross-entropy + self-distillation from the static network + ``cost_weight`` times
    the squared distance of the expected FLOPs ratio to ``target``. ``checkpointer`` saves
    the training state at every epoch end and restores it when resuming.
    """
    cfg = recipe.train
    checkpointer = checkpointer or Checkpointer.disabled()
    inserted, backbone_params = trainable_parts(dyn, tune)
    teacher = teacher_logits(dyn, data.fit, prep, recipe, checkpointer)
    controller = dyn.dyn.controller
    controller.train()
    optimizer, scheduler, params = adamw_with_cosine(
        inserted, backbone_params, cfg.lr, cfg, cfg.epochs, len(data.fit), backbone_lr
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    progress = checkpointer.begin("gates", cfg.epochs, dyn, optimizer, scheduler, generator)

    def step(images, labels, index):
        logits, probs = dyn.forward_relaxed(images)
        cost = expected_flops_ratio(dyn, probs)
        loss = (
            distillation_loss(
                logits, labels, teacher[index].to(recipe.device), cfg.distill_temperature, cfg.distill_weight
            )
            + cost_weight * (cost - target) ** 2
        )
        return loss, {"flops_ratio": cost.item()}

    step = distributed.wrap_step(params, step, find_unused=bool(backbone_params))
    run_epochs(step, optimizer, scheduler, progress, checkpointer, data, prep, recipe, cfg.epochs, generator, "gates")
    distributed.broadcast_buffers(controller)
    controller.eval()
    dyn.eval()
    return progress.history


def run_epochs(
    step,
    optimizer,
    scheduler,
    progress,
    checkpointer,
    data,
    prep,
    recipe,
    epochs,
    generator,
    stage,
    extra=None,
    *,
    record=None,
    postfix=None,
    name: str | None = None,
    total_steps: int | None = None,
    min_shard: int = 1,
) -> None:
    """A training stage over the fit split (``stage_loop.run_stage``), from where ``progress`` stands.

    ``step(images, labels, index) -> (loss, statistics)`` gives the loss and per-sample means;
    by default each epoch's record holds their means over the epoch, under ``phase: stage``
    except for the ``"gates"`` stage, and the items of ``extra`` as given (``record(epoch,
    sums)`` replaces that). A global batch whose smallest share on a rank has fewer than
    ``min_shard`` samples is skipped (BatchNorm in a training policy needs two).
    """
    cfg = recipe.train

    def default_record(epoch, sums):
        head = {"epoch": epoch} if stage == "gates" else {"phase": stage, "epoch": epoch}
        return {**head, **(extra or {}), **means(sums)}

    def step_on(images, labels, index, n_global):
        return None if distributed.smallest_shard(n_global) < min_shard else step(images, labels, index)

    def batches_of(order, first):
        for (images, labels, index), n, n_global in image_batches(
            data.fit, prep, cfg.batch_size, recipe.device, order, first
        ):
            yield (images, labels, index, n_global), n, n_global

    run_stage(
        name or f"train {stage}",
        epochs,
        step_on,
        optimizer,
        scheduler,
        progress,
        checkpointer,
        lambda: torch.randperm(len(data.fit), generator=generator),
        batches_of,
        record or default_record,
        total_steps or training_steps(epochs, len(data.fit), cfg.batch_size),
        postfix or (lambda loss, stats: {"loss": f"{loss.item():.3f}", "flops": f"{stats['flops_ratio']:.2f}"}),
    )


def image_batches(split, prep, batch_size: int, device: str, order, first_batch: int):
    """Batches of ``split`` in ``order`` from ``first_batch`` on, as ``run_stage`` takes them:
    ``((images, labels, index), samples here, samples in the global batch)``."""
    for images, labels, index, n_global in train_batches(split, prep, batch_size, device, order, first_batch):
        yield (images, labels, index), len(labels), n_global
