"""What a conversion records of a base network the user handed in as a module, and how a
saved conversion gets it back.

A timm model built by the user (``timm.create_model("resnet18", num_classes=10)``) is
recorded by its architecture and the arguments that shape it, and its weights are stored with
the conversion (they may exist nowhere else): loading rebuilds it without the user's help. A
module of the user's own cannot be rebuilt from a name; loading it needs ``model=``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dynconvert.errors import DynconvertError

# the pretrained-configuration fields the data preparation reads (a user may have changed them)
PREPROCESSING = ("input_size", "crop_pct", "mean", "std", "interpolation")


def timm_architecture(model: nn.Module) -> str | None:
    """The timm architecture name ``model`` was created as, or None for another module."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) and timm.is_model(name) else None


def _first_patch_embedding(model: nn.Module) -> nn.Module | None:
    """The first patch embedding of a transformer-style network (it fixes the input size)."""
    for module in model.modules():
        if hasattr(module, "img_size") and hasattr(module, "patch_size") and module is not model:
            return module
    return None


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model was built for when it accepts no other (a vision transformer's
    ``img_size``: its position embeddings are sized for it), else None."""
    embed = _first_patch_embedding(model)
    size = getattr(embed, "img_size", None)
    if size is None or not getattr(embed, "strict_img_size", True) or getattr(model, "dynamic_img_size", False):
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def shaping_args(model: nn.Module) -> dict:
    """The ``timm.create_model`` arguments that shape ``model`` and can be read back from it."""
    args = {}
    if isinstance(getattr(model, "num_classes", None), int):
        args["num_classes"] = model.num_classes
    size = fixed_input_size(model)
    if size is not None:
        args["img_size"] = list(size)
        patch = _first_patch_embedding(model).patch_size
        args["patch_size"] = list(patch) if isinstance(patch, (tuple, list)) else patch
    return args


def state_sha256(model: nn.Module) -> str:
    """Hex sha256 of a module's state (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_module(model: nn.Module, index: int) -> dict:
    """The base-model record of a module handed in: how to rebuild it and its state's hash."""
    architecture = timm_architecture(model)
    record = {"state_sha256": state_sha256(model), "class": type(model).__name__}
    if architecture is None:
        return {**record, "own_module": True}
    cfg = model.pretrained_cfg
    preprocessing = {k: cfg[k] for k in PREPROCESSING if k in cfg}
    return {
        **record,
        "model": architecture,
        "timm_args": shaping_args(model),
        "preprocessing": json.loads(json.dumps(preprocessing)),  # tuples as lists: what JSON gives back
        "stored_weights": f"base-{index}",
    }


def store_weights(model: nn.Module, record: dict, folder: Path) -> None:
    """Write the weights of a recorded timm module into ``folder`` (safetensors)."""
    # clones: tied weights share storage, which safetensors refuses to write twice
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / f"{record['stored_weights']}.safetensors"))


def rebuild(record: dict, folder: Path, input_size: tuple[int, ...] | None = None) -> nn.Module:
    """The base network a saved conversion records, from its architecture, arguments and
    weights; checked to take inputs of ``input_size`` (C, H, W: the conversion's), when given."""
    path = folder / f"{record['stored_weights']}.safetensors"
    if not path.is_file():
        raise DynconvertError(f"'{path}' is missing: the saved conversion is incomplete")

    def refuse(problem: str) -> DynconvertError:
        return DynconvertError(
            f"the {record['model']} rebuilt from {record['timm_args']} {problem}; it was created with other "
            "arguments: pass the base network, dynconvert.load(path, model=timm.create_model(...))"
        )

    try:
        model = timm.create_model(record["model"], pretrained=False, **record["timm_args"])
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise refuse(f"could not be created ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in record.get("preprocessing", {}).items()}
    model.pretrained_cfg = {**model.pretrained_cfg, **saved}
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise refuse(f"does not fit the stored weights ({_first_problem(exc)})") from None
    model.eval()
    if input_size is not None:
        try:
            with torch.no_grad():
                model(torch.zeros(1, *input_size))
        except Exception as exc:  # whatever the architecture raises: it was built for another input
            problem = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise refuse(f"does not take {input_size[-2]}x{input_size[-1]} inputs ({problem})") from None
    return model


def missing_module_error(folder: Path, records: list[dict]) -> DynconvertError:
    """The error for loading a conversion of the user's own module without ``model=``."""
    names = ", ".join(r.get("class") or r.get("model", "?") for r in records if r.get("own_module"))
    return DynconvertError(
        f"'{folder}' was converted from a module of your own ({names}), which cannot be rebuilt from a name: "
        "pass it, dynconvert.load(path, model=YourModule(...)) (a list of them for several)"
    )


def _first_problem(exc: RuntimeError) -> str:
    """The first line of ``load_state_dict``'s complaint that names keys or shapes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0])[:200] if lines else "weights do not fit"
