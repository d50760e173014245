"""Writing files so that an interrupted or failed write never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
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
