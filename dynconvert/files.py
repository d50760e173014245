"""Writing files and folders so that an interrupted or failed write never leaves a half-written one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_on_success(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block completes.

    ``path``'s folder is created if needed. If the block raises, ``path`` keeps what it held and
    the temporary file is removed. The temporary name keeps ``path``'s suffix, so writers that
    infer the format from it (plots) still do.

    Example::

        with replaced_on_success("out/report.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path``, replacing it only once fully written."""
    with replaced_on_success(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def folder_replaced_on_success(folder: str | Path) -> Iterator[Path]:
    """An empty staging folder beside ``folder`` to write into; it replaces ``folder`` (a folder
    or a file) when the block completes.

    If the block raises, ``folder`` keeps what it held and the staging folder is removed. The
    previous ``folder`` is moved aside before the staging folder takes its name and only then
    deleted, so at no moment has the old content gone while the new one is still in staging.
    The names beside it are fixed (``.NAME.partial``, ``.NAME.previous``), so what a killed
    process left is found by the next write: a stale staging folder is deleted, and an old
    folder moved aside but never replaced is put back first.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial")
    previous = folder.with_name(f".{folder.name}.previous")
    _recover(folder, previous)
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
        if _exists(folder):
            os.replace(folder, previous)
            os.replace(staging, folder)
            _remove(previous)
        else:
            os.replace(staging, folder)
    finally:
        _remove(staging)


def _recover(folder: Path, previous: Path) -> None:
    """Undo what a write killed half-way through its swap left: the old folder moved aside and no
    new one in its place (put it back), or a stale copy of the old one beside the new (delete it)."""
    if not _exists(previous):
        return
    if _exists(folder):
        _remove(previous)
    else:
        os.replace(previous, folder)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    """Delete ``path`` whether it is a folder, a file or a link; nothing if it is not there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
