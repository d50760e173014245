"""dynconvert: convert pretrained static networks into dynamic ones that compute less on easy inputs."""

from dynconvert.config import Recipe  # noqa: E402
from dynconvert.convert.export_model import export_onnx  # noqa: E402
from dynconvert.convert.pipeline import convert, convert_recipe  # noqa: E402
from dynconvert.convert.save import load_dynamic as load  # noqa: E402
from dynconvert.convert.save import save_dynamic as save  # noqa: E402
from dynconvert.errors import DynconvertError  # noqa: E402
from dynconvert.recipe import build_recipe, builtin_recipe_names  # noqa: E402
from dynconvert.runtime.dynamic import DynamicModel, Routed  # noqa: E402
from dynconvert.strategies import Strategy, get_strategy, list_strategies, register_strategy  # noqa: E402
from dynconvert.version import __version__  # noqa: E402

__all__ = [
    "DynamicModel",
    "DynconvertError",
    "Recipe",
    "Routed",
    "Strategy",
    "__version__",
    "build_recipe",
    "builtin_recipe_names",
    "convert",
    "convert_recipe",
    "export_onnx",
    "get_strategy",
    "list_strategies",
    "load",
    "register_strategy",
    "save",
]
