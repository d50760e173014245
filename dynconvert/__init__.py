"""dynconvert: convert pretrained static networks into dynamic ones that compute less on easy inputs."""

__version__ = "0.1.0"

from dynconvert.convert.pipeline import convert, convert_recipe  # noqa: E402
from dynconvert.convert.save import load_dynamic as load  # noqa: E402
from dynconvert.errors import DynconvertError  # noqa: E402
from dynconvert.export import export_onnx  # noqa: E402
from dynconvert.recipe import Recipe, build_recipe, builtin_recipe_names  # noqa: E402
from dynconvert.strategies import list_strategies, register_strategy  # noqa: E402

__all__ = [
    "DynconvertError",
    "Recipe",
    "__version__",
    "build_recipe",
    "builtin_recipe_names",
    "convert",
    "convert_recipe",
    "export_onnx",
    "list_strategies",
    "load",
    "register_strategy",
]
