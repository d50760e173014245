"""Build the static network: a timm model by name, with timm's or local weights."""

from __future__ import annotations

import difflib
import hashlib
import logging
import pickle
import zipfile
from pathlib import Path

import timm
import torch
from torch import nn

import dynconvert.models  # noqa: F401  (registers the CIFAR ResNets)
from dynconvert.config import ModelConfig
from dynconvert.errors import DynconvertError

log = logging.getLogger(__name__)


def build_model(config: ModelConfig) -> nn.Module:
    """Create ``config.name`` with timm and load its weights (local file or timm's pretrained).

    Example::

        model = build_model(ModelConfig(name="cifar_resnet56", weights="resnet56.th"))
    """
    if not timm.is_model(config.name):
        close = difflib.get_close_matches(config.name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise DynconvertError(f"unknown model '{config.name}'{hint}")
    kwargs = {} if config.num_classes is None else {"num_classes": config.num_classes}
    use_hub = config.pretrained and not config.weights
    try:
        model = timm.create_model(config.name, pretrained=use_hub, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not use_hub:
            raise
        raise DynconvertError(
            f"could not fetch timm's pretrained weights for '{config.name}' ({type(exc).__name__}); "
            "pass a local checkpoint with --weights FILE"
        ) from None
    if config.weights:
        load_weights(model, config.weights)
    return model.eval()


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model``, strictly.

    Accepts a state dict, possibly nested under ``state_dict`` or ``model`` and possibly
    saved from ``nn.DataParallel`` (``module.`` prefixes); safetensors files too. Missing
    ``num_batches_tracked`` buffers are tolerated.
    """
    path = Path(path)
    if not path.is_file():
        raise DynconvertError(f"weights file '{path}' does not exist")
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise DynconvertError(
            f"weights '{path}' do not fit model: missing keys {_few(missing)}; unexpected keys {_few(unexpected)}. "
            "Is the checkpoint that of another architecture than the model named?"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise DynconvertError(
            f"weights '{path}' do not fit model: '{k}' has shape {tuple(state[k].shape)}, "
            f"the model expects {tuple(expected[k].shape)} ({len(wrong)} such keys)"
        )
    model.load_state_dict(state, strict=False)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a checkpoint file, unwrapping common nestings and prefixes."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise _unreadable(path, exc) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DynconvertError(f"weights file '{path}' holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


# what torch.save's legacy (pre-zip) format starts with: pickle protocol 2 and torch's magic number
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _unreadable(path: Path, exc: Exception) -> DynconvertError:
    """The error for a weights file that could not be read, saying what kind of file it is."""
    if path.suffix == ".safetensors":
        return DynconvertError(
            f"weights file '{path}' is not a readable safetensors file ({type(exc).__name__}: {exc})"
        )
    if not _saved_by_torch(path):
        return DynconvertError(
            f"weights file '{path}' is neither a PyTorch checkpoint (torch.save) nor a .safetensors file: "
            "pass the model's state dict saved with torch.save, or a safetensors file with the .safetensors suffix"
        )
    if isinstance(exc, pickle.UnpicklingError):  # torch.load with weights_only refuses anything but tensors
        return DynconvertError(
            f"weights file '{path}' holds Python objects besides tensors (a pickled model, training arguments, "
            "...), and unpickling them could run arbitrary code, so dynconvert does not. If you trust the file, "
            "save its state dict alone and pass that file: torch.save(torch.load(FILE, weights_only=False)"
            "['state_dict'], 'weights.pt') (or .state_dict() of a pickled model)"
        )
    return DynconvertError(f"weights file '{path}' could not be read ({type(exc).__name__}: {exc})")


def _saved_by_torch(path: Path) -> bool:
    """Whether the file is in one of torch.save's formats (a zip archive, or the legacy pickle stream)."""
    with open(path, "rb") as fh:
        if zipfile.is_zipfile(fh):
            return True
        fh.seek(0)
        return fh.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
