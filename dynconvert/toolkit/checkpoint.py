"""Checkpoints of a conversion's training, so that an interrupted run continues where it stopped.

A conversion writing to ``OUT`` keeps its work in ``OUT.resume/``: ``checkpoint.pt`` (inserted
state, optimizer, scheduler, random states, the loop's position and the histories of the
stages already done) written at every epoch end and when SIGINT or SIGTERM asks the run to
stop, and ``cache-*.pt`` (what the frozen backbone computed for training). The folder goes
away once the outputs are written. Every file is written to a temporary name and moved into
place, so a crash while writing leaves the previous checkpoint whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynconvert.errors import DynconvertError
from dynconvert.files import replaced_on_success
from dynconvert.toolkit import distributed
from dynconvert.toolkit.rowfile import RowFile

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved."""


def work_folder(out: Path) -> Path:
    """Where the checkpoints of a conversion writing to ``out`` live: ``OUT.resume`` beside it."""
    return out.with_name(out.name + ".resume")


@dataclass
class Progress:
    """Where one training loop stands.

    ``epoch``: the epoch in progress (``epochs`` when the loop is done); ``batch``: global
    batches of it done; ``order``: its sample order (None until drawn); ``step``: steps done
    over all epochs; ``totals``: sums for the epoch's record; ``history``: one record per
    finished epoch.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    order: torch.Tensor | None = None
    totals: dict[str, float] = field(default_factory=dict)
    history: list = field(default_factory=list)

    def epoch_order(self, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The sample order of the epoch in progress: the saved one mid-epoch, else ``draw()``."""
        if self.order is None:
            self.order = draw()
        return self.order

    def add(self, values: dict[str, float]) -> None:
        """Add ``values`` to the epoch's sums."""
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + value

    def end_epoch(self, record) -> None:
        """Record the finished epoch and move to the next."""
        self.history.append(record)
        self.epoch += 1
        self.batch = 0
        self.order = None
        self.totals = {}


@dataclass
class _Stage:
    name: str
    epochs: int
    dyn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    generator: torch.Generator
    progress: Progress


class Checkpointer:
    """Saves and restores the training loops' state in ``folder`` (nothing when it is None).

    Training loops call :meth:`begin` with what they train, :meth:`after_step` after every
    step (a safe point to stop at) and :meth:`end_epoch` after every epoch.
    """

    def __init__(self, folder: Path | None, recipe_sha256: str, resume: bool = False):
        self.folder = folder
        self.recipe_sha256 = recipe_sha256
        self.loaded = self._load() if resume and folder is not None else None
        self.finished: dict[str, list] = dict(self.loaded["finished"]) if self.loaded else {}
        self.stage: _Stage | None = None
        self.saved: str | None = self.loaded["description"] if self.loaded else None
        self.stop_signal: str | None = None
        self._in_loop = False

    @classmethod
    def disabled(cls) -> Checkpointer:
        """A checkpointer that saves nothing (conversions without an output folder)."""
        return cls(None, "")

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT

    def _load(self) -> dict | None:
        path = self.path
        if not path.is_file():
            log.info("no checkpoint in %s; starting from the beginning", self.folder)
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged zip or pickle
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise DynconvertError(
                f"checkpoint '{path}' is corrupt or truncated ({reason}); delete '{self.folder}' to start over"
            ) from None
        keys = {"format", "recipe_sha256", "stage", "progress", "finished", "model", "rng", "description"}
        if not isinstance(state, dict) or not keys <= state.keys() or state["format"] != FORMAT_VERSION:
            raise DynconvertError(
                f"checkpoint '{path}' is not a dynconvert checkpoint of format {FORMAT_VERSION}; "
                f"delete '{self.folder}' to start over"
            )
        if state["recipe_sha256"] != self.recipe_sha256:
            raise DynconvertError(
                f"checkpoint '{path}' was written for another recipe (sha256 {state['recipe_sha256'][:12]}, "
                f"this one {self.recipe_sha256[:12]}); resume with the same recipe, or run without --resume to "
                "start over"
            )
        if len(state["rng"]) != distributed.world_size():
            raise DynconvertError(
                f"checkpoint '{path}' was written by {len(state['rng'])} processes; "
                f"resume with as many, not {distributed.world_size()}"
            )
        log.info("resuming from %s (%s)", path, state["description"])
        return state

    def begin(
        self,
        name: str,
        epochs: int,
        dyn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        generator: torch.Generator | None = None,
    ) -> Progress:
        """Start training stage ``name``; return where it stands.

        Fresh unless resuming: then a stage the checkpoint has finished returns its history
        (``epoch == epochs``), and the stage the checkpoint was written in gets the saved
        state of ``dyn``, ``optimizer``, ``scheduler``, ``generator`` and the random states back.
        """
        if self.stage is not None and self.stage.name != name:
            # a copy: the stage's caller may extend the list it was given
            self.finished[self.stage.name] = list(self.stage.progress.history)
        progress = Progress()
        if name in self.finished:
            progress = Progress(epoch=epochs, history=list(self.finished[name]))
        elif self.loaded is not None and self.loaded["stage"] == name:
            progress = self._restore(dyn, optimizer, scheduler, generator)
            self.loaded = None
        self.stage = _Stage(name, epochs, dyn, optimizer, scheduler, generator, progress)
        self._in_loop = progress.epoch < epochs
        return progress

    def _restore(self, dyn, optimizer, scheduler, generator) -> Progress:
        state = self.loaded
        unexpected = dyn.load_state_dict(state["model"], strict=False).unexpected_keys
        if unexpected:
            raise DynconvertError(
                f"checkpoint '{self.path}' holds state the model does not have ({', '.join(unexpected[:3])}); "
                f"delete '{self.folder}' to start over"
            )
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if generator is not None and state.get("generator") is not None:
            generator.set_state(state["generator"])
        _set_rng_state(state["rng"][distributed.rank()])
        progress = Progress(**state["progress"])
        if not distributed.is_main():
            # the saved sums are over all ranks; rank 0 carries them on
            progress.totals = dict.fromkeys(progress.totals, 0.0)
        return progress

    def after_step(self, progress: Progress) -> None:
        """A safe point: when a signal asked to stop, save a checkpoint and raise
        :class:`TrainingInterrupted`."""
        if self.folder is None or not distributed.any_rank(self.stop_signal is not None):
            return
        self.save(progress, sum_totals=True)
        log.warning(
            "%s: stopped; checkpoint saved in %s (%s); run the same command with --resume to continue",
            self.stop_signal or "signal",
            self.folder,
            self.saved,
        )
        raise TrainingInterrupted

    def end_epoch(self, progress: Progress) -> None:
        """Save a checkpoint after an epoch (then, after the last, the stage is done)."""
        if self.stage is not None and progress.epoch >= self.stage.epochs:
            self._in_loop = False
        if self.folder is not None:
            self.save(progress)

    def save(self, progress: Progress, sum_totals: bool = False) -> None:
        """Write the stage's state (every rank calls it; rank 0 writes) atomically."""
        stage = self.stage
        rng = distributed.gather_objects(_rng_state())
        totals = distributed.sum_over_ranks(progress.totals) if sum_totals else progress.totals
        where = (
            f"{stage.name}, {progress.batch} batches into epoch {progress.epoch + 1} of {stage.epochs}"
            if progress.batch
            else f"{stage.name}, after epoch {progress.epoch} of {stage.epochs}"
        )
        if distributed.is_main():
            trainable = {n for n, p in stage.dyn.named_parameters() if p.requires_grad}
            state = {
                "format": FORMAT_VERSION,
                "recipe_sha256": self.recipe_sha256,
                "stage": stage.name,
                "description": where,
                "progress": {**asdict(progress), "totals": totals},
                "finished": self.finished,
                "model": {
                    k: v.detach().cpu()
                    for k, v in stage.dyn.state_dict().items()
                    if k.startswith("dyn.") or k in trainable
                },
                "optimizer": stage.optimizer.state_dict(),
                "scheduler": stage.scheduler.state_dict() if stage.scheduler is not None else None,
                "generator": stage.generator.get_state() if stage.generator is not None else None,
                "rng": rng,
            }
            _save_atomic(state, self.path)
        distributed.barrier()
        self.saved = where

    def cached(self, name: str, compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        """``compute()``, kept in the work folder so that a resumed run reads it back."""
        if self.folder is None:
            return compute()
        path = self.folder / f"cache-{name}.pt"
        if path.is_file():
            try:
                kept = torch.load(path, map_location="cpu", weights_only=True)
                if kept.get("recipe_sha256") == self.recipe_sha256:
                    log.info("read %s from %s", name, path)
                    return kept["tensors"]
            except Exception:  # a damaged cache is only lost time: compute it again
                log.warning("cache %s is unreadable; computing it again", path)
        tensors = compute()
        if distributed.is_main():
            _save_atomic({"recipe_sha256": self.recipe_sha256, "tensors": tensors}, path)
        distributed.barrier()
        return tensors

    def cached_rows(self, name: str, compute: Callable[[Path | None], list]) -> list:
        """``compute(folder)``, which writes ``RowFile``s into ``folder`` and returns them, kept in
        the work folder so that a resumed run opens them again; without a work folder, or when
        the ranks span machines (each would see only its own rows in its copy of the folder),
        ``compute(None)``, which keeps its results in memory."""
        if self.folder is None or not distributed.one_machine():
            return compute(None)
        folder = self.folder / f"cache-{name}"
        manifest = folder / "manifest.json"
        if manifest.is_file():
            try:
                kept = json.loads(manifest.read_text())
                if kept.get("recipe_sha256") == self.recipe_sha256:
                    files = [
                        RowFile(folder / f["file"], tuple(f["shape"]), f["dtype"], f["count"]) for f in kept["files"]
                    ]
                    if all(f.path.is_file() and f.path.stat().st_size == f.row_bytes * f.count for f in files):
                        log.info("read %s from %s", name, folder)
                        return files
            except (OSError, ValueError, KeyError, TypeError):  # a damaged cache is only lost time
                log.warning("cache %s is unreadable; computing it again", folder)
        if distributed.is_main():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        distributed.barrier()
        files = compute(folder)
        if distributed.is_main():
            listed = [
                {"file": f.path.name, "shape": list(f.shape), "dtype": f.dtype.name, "count": f.count} for f in files
            ]
            with replaced_on_success(manifest) as partial:
                partial.write_text(json.dumps({"recipe_sha256": self.recipe_sha256, "files": listed}))
        distributed.barrier()
        return files

    def describe(self) -> str:
        """What is kept, for an error message."""
        if self.folder is None or self.saved is None:
            return "no output was written"
        return f"no output was written; the last good checkpoint ({self.saved}) is kept in '{self.folder}'"

    def start_fresh(self) -> None:
        """Remove what an earlier run left in the work folder (a run not resuming)."""
        if self.folder is not None and distributed.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)
        distributed.barrier()

    def discard(self) -> None:
        """Remove the work folder once the outputs are written."""
        self.start_fresh()

    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[None]:
        """While training, SIGINT and SIGTERM ask the loop to stop at its next safe point
        (:meth:`after_step`); outside a loop, or at a second signal, they interrupt at once."""
        if self.folder is None or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_signal is not None or not self._in_loop:
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name
            log.warning("%s received: stopping after this step", self.stop_signal)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _save_atomic(obj, path: Path) -> None:
    with replaced_on_success(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # a checkpoint must survive the machine going down, not only the process


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
