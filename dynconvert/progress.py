"""Progress bars for long work; ``dynconvert -q`` (or :func:`set_quiet`) silences them."""

from __future__ import annotations

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Show (False) or hide (True) every progress bar started from now on."""
    global _quiet
    _quiet = quiet


def progress_bar(*args, **kwargs) -> tqdm:
    """A ``tqdm`` bar, hidden when quiet (otherwise tqdm's own defaults, TQDM_* variables included)."""
    if _quiet:
        kwargs["disable"] = True
    return tqdm(*args, **kwargs)
